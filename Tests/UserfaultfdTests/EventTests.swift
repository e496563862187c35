import CUserfaultfdTestSupport
import Glibc
import Synchronization
import Testing
import Userfaultfd

/// Every event kind, triggered for real and read through `uffd.events`.
///
/// Non-fault events put the thread that caused them to sleep until the event is read, so fork, mremap, madvise and
/// munmap run on dedicated threads while the test consumes the events.
@Suite("Events")
struct EventTests {
    // MARK: Page faults

    @Test(.timeLimit(.minutes(1)))
    func missingReadAndWriteFaults() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            var events = uffd.events.makeAsyncIterator()

            let reader = readOnThread(mapping.page(0) + 0x10)
            let read = try await nextPageFault(&events)
            #expect(read.kind == .missing)
            #expect(!read.isWrite)
            #expect(read.flags == 0)
            #expect(read.pageAddress == mapping.page(0))
            #expect(read.address == mapping.page(0), "without EXACT_ADDRESS the kernel reports the page")
            #expect(read.threadID == nil, "no thread id without the feature")
            try uffd.zeroPage(mapping.pages(0))
            #expect(await reader.value == 0)

            let writer = writeOnThread(mapping.page(1) + 0x20, 0xee)
            let write = try await nextPageFault(&events)
            #expect(write.kind == .missing)
            #expect(write.isWrite)
            #expect(write.flags & 1 == 1)
            #expect(write.pageAddress == mapping.page(1))
            var source = sourcePage(0)
            try uffd.copy(from: &source, to: write.pageAddress, length: uffd.pageSize)
            #expect(await writer.finishes(within: 10))
            #expect(peek(mapping.page(1) + 0x20) == 0xee)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func threadIDIsTheFaultingThread() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .threadID)
            let mapping = try scope.makeMapping(pages: 1)
            try uffd.register(mapping.range, mode: .missing)
            let reader = OffPoolThread { () -> (tid: Int32, byte: UInt8) in
                let tid = cuffd_test_gettid()
                return (tid, cuffd_test_read_byte(UnsafeRawPointer(bitPattern: mapping.address)))
            }
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            var source = sourcePage(0x12)
            try uffd.copy(from: &source, to: fault.pageAddress, length: uffd.pageSize)
            let (tid, byte) = await reader.value
            #expect(byte == 0x12)
            #expect(fault.threadID == tid)
            #expect(tid != cuffd_test_gettid())
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func exactAddressKeepsTheInPageOffset() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .exactAddress)
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            let reader = readOnThread(mapping.page(1) + 0x123)
            var events = uffd.events.makeAsyncIterator()
            let fault = try await nextPageFault(&events)
            #expect(fault.address == mapping.page(1) + 0x123)
            #expect(fault.pageAddress == mapping.page(1))
            try uffd.zeroPage(mapping.pages(1))
            #expect(await reader.value == 0)
        }
    }

    // MARK: Fork

    @Test(.timeLimit(.minutes(1)))
    func forkDeliversChildUserfaultfd() async throws {
        try await withFaultWatchdog(seconds: 30) { scope in
            let uffd = try scope.makeUFFD(required: .eventFork)
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            let target = mapping.page(1) + 321
            let expected: UInt8 = 0x6b

            // fork() sleeps in the kernel until the FORK event is read: a dedicated thread.
            let forker = OffPoolThread(name: "uffd-test-fork") {
                cuffd_test_fork_toucher(UnsafeRawPointer(bitPattern: target), expected, 30)
            }
            // FORK events are process-wide: a fork by a test running in parallel queues one too, before or after ours.
            // Serve every child as its event arrives, for the whole test: a loop that stops when our fork() returns can
            // stop with our event read by the reader but not yet consumed here, and our child then waits forever.
            // The consumer and the servers run on the userfaultfds' own queues, never on the cooperative pool: forks by
            // other tests (on pool threads too) sleep until this userfaultfd's reader has read their FORK events, and
            // the reader starts with the consumer's first `next()`.
            let served = ServedFaults()
            let page = mapping.page(1), pageSize = uffd.pageSize
            let consumer = Task(executorPreference: uffd.eventExecutor) {
                var events = uffd.events.makeAsyncIterator()
                while let event = try await events.next() {  // ends when this task is cancelled
                    guard case .fork(let child) = event else {
                        Issue.record("expected a fork event, got \(event)")
                        continue
                    }
                    scope.track(child)
                    #expect(child.fileDescriptor != uffd.fileDescriptor)
                    #expect(child.enabledFeatures == uffd.enabledFeatures)
                    // Our child touches the page: the fault arrives on its userfaultfd, at the same address. Serve it
                    // into the child's address space (other tests' children never fault there).
                    let server = Task(executorPreference: child.eventExecutor) {
                        var childEvents = child.events.makeAsyncIterator()
                        guard let fault = try? await nextPageFault(&childEvents), fault.pageAddress == page else { return }
                        served.faults.withLock { $0.append(fault) }
                        var source = sourcePage(expected)
                        _ = try? child.copy(from: &source, to: fault.pageAddress, length: pageSize)
                    }
                    served.children.withLock { $0.append((child, server)) }
                }
            }
            let pid = await forker.value
            try #require(pid > 0, "fork failed: \(String(cString: strerror(errno)))")
            scope.track(child: pid)
            let status = await waitForChild(pid, seconds: 20)
            if status != nil { scope.reaped(child: pid) }
            consumer.cancel()
            _ = await consumer.result
            let children = served.children.withLock { $0 }
            #expect(!children.isEmpty, "our fork's event was read")
            for (child, _) in children { child.close() }  // ends the servers' iterations
            for (_, server) in children { await server.value }
            let faults = served.faults.withLock { $0 }
            #expect(faults.count == 1, "exactly one child faulted on the page")
            if let fault = faults.first {
                #expect(fault.kind == .missing)
                #expect(!fault.isWrite)
            }
            #expect(status == 0, "the child exits 0 when it read the served byte (3: wrong byte, -N: signal N)")

            // The parent's page was not touched: it is still missing here.
            var own = sourcePage(0x01)
            try uffd.copy(from: &own, to: mapping.page(1), length: uffd.pageSize)
            #expect(peek(target) == 0x01)
        }
    }

    // MARK: Remap, remove, unmap

    @Test(.timeLimit(.minutes(1)))
    func remapByMremap() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .eventRemap)
            let mapping = try scope.makeMapping(pages: 2)
            let reserved = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            var first = sourcePage(0x21)
            try uffd.copy(from: &first, to: mapping.page(0), length: uffd.pageSize)

            let (from, to, length) = (mapping.address, reserved.address, mapping.length)
            let mover = OffPoolThread(name: "uffd-test-mremap") { () -> UInt in
                UInt(bitPattern: cuffd_test_mremap_fixed(
                    UnsafeMutableRawPointer(bitPattern: from), length, UnsafeMutableRawPointer(bitPattern: to)))
            }
            var events = uffd.events.makeAsyncIterator()
            let event = try await nextEvent(&events)
            guard case .remap(let eventFrom, let eventTo, let eventLength) = event else {
                Issue.record("expected a remap event, got \(event)")
                return
            }
            #expect(eventFrom == from)
            #expect(eventTo == to)
            #expect(eventLength == length)
            #expect(await mover.value == to)
            mapping.markUnmapped()

            // The content moved, and the registration with it: the missing page faults at its new address.
            #expect(peek(reserved.page(0)) == 0x21)
            let reader = readOnThread(reserved.page(1) + 5)
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == reserved.page(1))
            var second = sourcePage(0x22)
            try uffd.copy(from: &second, to: fault.pageAddress, length: uffd.pageSize)
            #expect(await reader.value == 0x22)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func removeByMadviseDontNeed() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .eventRemove)
            let mapping = try scope.makeMapping(pages: 3)
            try uffd.register(mapping.range, mode: .missing)
            var source = sourcePage(0x31, pages: 3)
            try uffd.copy(from: &source, to: mapping.address, length: mapping.length)

            let address = mapping.page(1)
            let length = 2 * uffd.pageSize
            let advisor = OffPoolThread(name: "uffd-test-madvise") {
                madvise(UnsafeMutableRawPointer(bitPattern: address), length, MADV_DONTNEED)
            }
            var events = uffd.events.makeAsyncIterator()
            let event = try await nextEvent(&events)
            guard case .remove(let range) = event else {
                Issue.record("expected a remove event, got \(event)")
                return
            }
            #expect(range == mapping.pages(1, count: 2))
            #expect(await advisor.value == 0)

            // The range stays registered: the dropped page faults again.
            #expect(peek(mapping.page(0)) == 0x31)
            let reader = readOnThread(mapping.page(2))
            let fault = try await nextPageFault(&events)
            #expect(fault.pageAddress == mapping.page(2))
            try uffd.zeroPage(mapping.pages(2))
            #expect(await reader.value == 0)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func unmapByMunmap() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .eventUnmap)
            let mapping = try scope.makeMapping(pages: 3)
            try uffd.register(mapping.range, mode: .missing)
            // Whatever happens, don't leave page 0 registered with EVENT_UNMAP: tear-down unmaps it.
            defer { try? uffd.unregister(mapping.pages(0)) }

            let address = mapping.page(1)
            let length = 2 * uffd.pageSize
            let unmapper = OffPoolThread(name: "uffd-test-munmap") {
                munmap(UnsafeMutableRawPointer(bitPattern: address), length)
            }
            var events = uffd.events.makeAsyncIterator()
            let event = try await nextEvent(&events)
            guard case .unmap(let range) = event else {
                Issue.record("expected an unmap event, got \(event)")
                return
            }
            #expect(range == mapping.pages(1, count: 2))
            #expect(await unmapper.value == 0)
            // Pages 1-2 are no longer ours: another test may map (and register) them at once, so this test must not
            // touch them again, not even with an ioctl (UFFDIO_COPY accepts any registered VMA of the process).
            // Tear-down unmaps page 0 only.
            mapping.markUnmapped()
            let page0 = mapping.page(0)
            let pageSize = uffd.pageSize
            scope.onTearDown { munmap(UnsafeMutableRawPointer(bitPattern: page0), pageSize) }
            // Page 0 is still registered.
            var source = sourcePage(1)
            try uffd.copy(from: &source, to: mapping.page(0), length: uffd.pageSize)
            #expect(peek(mapping.page(0)) == 1)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func resolvingWhileAnEventIsUnreadIsTryAgain() async throws {
        try await withFaultWatchdog { scope in
            let uffd = try scope.makeUFFD(required: .eventRemove)
            let mapping = try scope.makeMapping(pages: 2)
            try uffd.register(mapping.range, mode: .missing)
            let address = mapping.page(1)
            let pageSize = uffd.pageSize
            // Nobody reads events yet (the reader starts with the first iteration), so the REMOVE stays pending.
            let advisor = OffPoolThread(name: "uffd-test-madvise") {
                madvise(UnsafeMutableRawPointer(bitPattern: address), pageSize, MADV_DONTNEED)
            }
            #expect(await waitReadable(uffd.fileDescriptor, seconds: 10))
            var source = sourcePage(0x44)
            expectUserfaultError(.tryAgain(bytesCompleted: 0)) { () throws(UserfaultError) in
                try uffd.copy(from: &source, to: mapping.page(0), length: pageSize)
            }
            let zero = expectUserfaultError(.tryAgain(bytesCompleted: 0)) { () throws(UserfaultError) in
                try uffd.zeroPage(mapping.pages(0))
            }
            #expect(zero?.errno == EAGAIN)
            #expect(!advisor.isFinished, "madvise waits for its event to be read")

            var events = uffd.events.makeAsyncIterator()
            let event = try await nextEvent(&events)
            guard case .remove(let range) = event else {
                Issue.record("expected a remove event, got \(event)")
                return
            }
            #expect(range == mapping.pages(1))
            #expect(await advisor.value == 0)
            // Read: the ioctls work again.
            try uffd.copy(from: &source, to: mapping.page(0), length: pageSize)
            #expect(peek(mapping.page(0)) == 0x44)
        }
    }
}

/// What the fork test's consumer and per-child tasks share: every forked child's userfaultfd with its server, and the
/// faults served.
private final class ServedFaults: Sendable {
    let faults = Mutex<[PageFault]>([])
    let children = Mutex<[(UserfaultFD, Task<Void, Never>)]>([])
}
