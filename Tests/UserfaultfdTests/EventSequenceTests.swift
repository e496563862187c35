import CUserfaultfdTestSupport
import Glibc
import Testing
import Userfaultfd

/// The semantics of `uffd.events`: one consumer at a time, the end on close and on cancellation, nothing dropped.
@Suite("Event sequence")
struct EventSequenceTests {
    @Test(.timeLimit(.minutes(1)))
    func secondConcurrentIteratorThrows() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            let reader0 = readOnThread(mapping.page(0))
            var first = uffd.events.makeAsyncIterator()
            let fault0 = try await nextPageFault(&first)
            #expect(fault0.pageAddress == mapping.page(0))

            var second = uffd.events.makeAsyncIterator()
            do throws(UserfaultError) {
                let event = try await second.next()
                Issue.record("a second iterator got \(String(describing: event)) while the first is active")
            } catch {
                #expect(error.code == .concurrentIteration)
                #expect(error.operation == .iterate)
            }
            try uffd.zeroPage(mapping.pages(0))
            #expect(await reader0.value == 0)

            // The first iterator is unaffected and gets the next fault.
            let reader1 = readOnThread(mapping.page(1))
            let fault1 = try await nextPageFault(&first)
            #expect(fault1.pageAddress == mapping.page(1))
            try uffd.zeroPage(mapping.pages(1))
            #expect(await reader1.value == 0)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func iterationEndsAfterClose() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 1)
            try uffd.register(mapping.range, mode: .missing)
            let consumer = Task { () -> Int in
                var count = 0
                for try await _ in uffd.events { count += 1 }
                return count
            }
            try await Task.sleep(for: .milliseconds(100))
            uffd.close()
            let count = try await value(of: consumer, within: 10)
            #expect(count == 0, "the loop ends, with no event, once the userfaultfd is closed")
            #expect(uffd.isClosed)
            // A new iteration after close ends too, as the documentation says (it used to throw closed).
            var again = uffd.events.makeAsyncIterator()
            #expect(try await again.next() == nil)
            #expect(try await again.next() == nil)
        }
    }

    /// Iterating a userfaultfd closed before anyone iterated ends at once, without an error.
    @Test(.timeLimit(.minutes(1)))
    func iterationStartedAfterCloseEnds() async throws {
        let uffd = try UserfaultFD()
        uffd.close()
        var count = 0
        for try await _ in uffd.events { count += 1 }
        #expect(count == 0)
    }

    /// Events read while nobody iterated are still delivered to an iteration started after close, then it ends: the
    /// reader took them off the descriptor, and "no event is dropped" holds across close too.
    @Test(.timeLimit(.minutes(1)))
    func eventsReadBeforeCloseReachALaterIteration() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            try await startReaderAndLeaveIt(uffd, mapping)
            // A fault while nobody iterates: the reader keeps it; then the userfaultfd is closed (waking the thread).
            let reader1 = readOnThread(mapping.page(1))
            try await Task.sleep(for: .milliseconds(300))
            #expect(!reader1.isFinished)
            #expect(await waitReadable(uffd.fileDescriptor, seconds: 0.2) == false, "the message was already read into the buffer")
            uffd.close()
            #expect(await reader1.finishes(within: 10))
            var events = uffd.events.makeAsyncIterator()
            let event = try await events.next()
            guard case .pageFault(let fault)? = event else {
                Issue.record("expected the fault read before close, got \(String(describing: event))")
                return
            }
            #expect(fault.pageAddress == mapping.page(1))
            #expect(try await events.next() == nil)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func closeWakesTheFaultingThreadAndEndsIteration() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 1)
            try uffd.register(mapping.range, mode: .missing)
            let reader = readOnThread(mapping.address)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.address)
            // Closing wakes the reader, which retries as ordinary memory (zeros) instead of staying blocked.
            uffd.close()
            #expect(await reader.finishes(within: 10))
            #expect(await reader.value == 0)
            #expect(try await events.next() == nil)
            #expect(try await events.next() == nil, "an ended iterator stays ended")
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func cancellingTheConsumerEndsIteration() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 1)
            try uffd.register(mapping.range, mode: .missing)
            let consumer = Task { () -> String? in
                var iterator = uffd.events.makeAsyncIterator()
                return try await iterator.next().map { "\($0)" }
            }
            try await Task.sleep(for: .milliseconds(100))
            consumer.cancel()
            let outcome = try await value(of: consumer, within: 10)
            #expect(outcome == .some(nil), "cancellation ends the iteration with nil")
            #expect(!uffd.isClosed, "cancellation does not close the userfaultfd")

            // A later iteration picks up: the next fault is delivered to it.
            let reader = readOnThread(mapping.address)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.address)
            try uffd.zeroPage(mapping.range)
            #expect(await reader.value == 0)
        }
    }

    /// Starts the reader with a first iteration that takes a fault on page 0 (resolved with zeros), then lets the
    /// iterator go: from here on the reader takes messages off the descriptor while nobody iterates.
    func startReaderAndLeaveIt(_ uffd: UserfaultFD, _ mapping: TestMapping) async throws {
        let reader0 = readOnThread(mapping.page(0))
        do {
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.page(0))
        }
        try uffd.zeroPage(mapping.pages(0))
        #expect(await reader0.value == 0)
    }

    @Test(.timeLimit(.minutes(1)))
    func eventsReadWhileNobodyIteratesAreKept() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 3)
            try uffd.register(mapping.range, mode: .missing)
            try await startReaderAndLeaveIt(uffd, mapping)

            // Two faults while nobody iterates: the reader takes them off the descriptor and keeps them.
            let reader1 = readOnThread(mapping.page(1))
            let reader2 = readOnThread(mapping.page(2))
            try await Task.sleep(for: .milliseconds(300))
            #expect(!reader1.isFinished && !reader2.isFinished)
            #expect(await waitReadable(uffd.fileDescriptor, seconds: 0.2) == false,
                    "the messages were already read into the buffer")

            var events = uffd.events.makeAsyncIterator()
            var pages: Set<UInt> = []
            for _ in 0..<2 {
                let fault = try await nextPageFault(&events)
                pages.insert(fault.pageAddress)
                try uffd.zeroPage(MemoryRange(start: fault.pageAddress, length: uffd.pageSize))
            }
            #expect(pages == [mapping.page(1), mapping.page(2)])
            #expect(await reader1.value == 0)
            #expect(await reader2.value == 0)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func manyThreadsManyPagesNothingDropped() async throws {
        try await withFaultWatchdog(seconds: 30) { scope in
            let uffd = try scope.makeUFFD(required: .threadID)
            let pageCount = 32
            let mapping = try scope.makeMapping(pages: pageCount)
            try uffd.register(mapping.range, mode: .missing)
            let pageSize = uffd.pageSize
            // Four threads read every page, each in its own order, so several threads fault on the same pages.
            let readers = (0..<4).map { worker in
                OffPoolThread(name: "uffd-test-reader-\(worker)") { () -> [UInt8] in
                    (0..<pageCount).map { step in
                        let index = worker % 2 == 0 ? (step + worker * 5) % pageCount : (pageCount - 1 - step + worker) % pageCount
                        return cuffd_test_read_byte(UnsafeRawPointer(bitPattern: mapping.address + UInt(index * pageSize + worker)))
                    }
                }
            }
            var events = uffd.events.makeAsyncIterator()
            var served = Set<UInt>()
            var duplicates = 0
            while served.count < pageCount {
                let fault = try await nextPageFault(&events)
                #expect(mapping.range.contains(fault.address))
                #expect(fault.threadID != nil)
                let index = Int(fault.pageAddress - mapping.address) / pageSize
                var source = sourcePage(UInt8(index + 1))
                do throws(UserfaultError) {
                    try uffd.copy(from: &source, to: fault.pageAddress, length: pageSize)
                    served.insert(fault.pageAddress)
                } catch {
                    guard error.code == .pageExists else { throw error }
                    duplicates += 1
                    try uffd.wake(MemoryRange(start: fault.pageAddress, length: pageSize))
                }
            }
            for (worker, reader) in readers.enumerated() {
                let bytes = await reader.value
                let expected = (0..<pageCount).map { step in
                    UInt8((worker % 2 == 0 ? (step + worker * 5) % pageCount : (pageCount - 1 - step + worker) % pageCount) + 1)
                }
                #expect(bytes == expected, "reader \(worker)")
            }
            #expect(served.count == pageCount, "served \(served.count) pages (\(duplicates) duplicate messages woken)")
        }
    }
}
