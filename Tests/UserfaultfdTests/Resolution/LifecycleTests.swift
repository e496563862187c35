import CUserfaultfdTestSupport
import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd

extension ResolutionTests {
    /// Requirements 8, 9, 11, 12: cancellation, the cooperative pool, prefetch, and the edges.
    @Suite("Lifecycle, pool, prefetch, edges")
    struct Lifecycle {
        /// Holds the region a detached body publishes to the test.
        final class RegionBox: Sendable {
            private let value = Mutex<LazyRegion?>(nil)
            func set(_ region: LazyRegion) { value.withLock { $0 = region } }
            var region: LazyRegion? { value.withLock { $0 } }
        }

        /// Requirement 8: cancelling the task around `LazyRegion.with` while 4 threads wait on a provider that never
        /// answers releases them all (zeros, the default cancellation resolution) and the task finishes.
        @Test(.timeLimit(.minutes(1)))
        func cancellingTheScopeReleasesEveryWaitingThread() async throws {
            let pageSize = systemPageSize
            let calls = CallLog(), cancelled = CallCounter()
            let provider = ClosureProvider(size: 16 * pageSize) { buffer, offset in
                calls.record(offset, buffer.count)
                await awaitCancellation()
                cancelled.increment()
                throw CancellationError()
            }
            try await withFaultWatchdog(seconds: 30) { scope in
                let box = RegionBox()
                let task = Task { () -> [UInt8] in
                    try await LazyRegion.with(length: 16 * pageSize, provider: provider,
                                              options: .init(readahead: .none, providerTimeout: nil)) { region in
                        scope.track(region.uffd)
                        box.set(region)
                        let threads = (0..<4).map { readByteOnThread(region, at: $0 * 3 * pageSize + 11) }
                        var values: [UInt8] = []
                        for thread in threads { values.append(await thread.value) }
                        return values
                    }
                }
                let allWaiting = await pollUntil { (box.region?.statistics.faults ?? 0) == 4 && calls.count == 4 }
                #expect(allWaiting, "\(String(describing: box.region?.statistics)), calls \(calls.all)")
                task.cancel()
                let values = try await value(of: task, within: 20)
                #expect(values == [0, 0, 0, 0], "every thread released with zeros")
                #expect(await pollUntil(within: 5) { cancelled.current == 4 }, "the provider reads in flight were cancelled")
                if let stats = box.region?.statistics {
                    #expect(stats.faults == 4, "\(stats)")
                    #expect(stats.pagesCopied == 0, "\(stats)")
                }
            }
        }

        enum ProviderWait: String, CaseIterable, Sendable, CustomTestStringConvertible {
            /// `try await Task.sleep(for: .milliseconds(1))`.
            case taskSleep
            /// A continuation resumed by `DispatchQueue.global().asyncAfter` after 1 ms.
            case dispatchContinuation
            var testDescription: String { rawValue }
        }

        /// Requirement 9: 16 tasks of the global concurrent executor (2 threads here) each fault a different page of a
        /// region whose provider awaits asynchronous work; 50 times. Resolution must not need a pool thread.
        @Test(.timeLimit(.minutes(2)), arguments: ProviderWait.allCases)
        func faultsFromEveryPoolThreadStillResolve(wait: ProviderWait) async throws {
            let pageSize = systemPageSize
            let pages = 16
            let iterations = 50
            let provider = ClosureProvider(size: pages * pageSize) { buffer, offset in
                switch wait {
                case .taskSleep: try await Task.sleep(for: .milliseconds(1))
                case .dispatchContinuation: await dispatchSleep(microseconds: 1000)
                }
                // Every byte of page p is p + 1.
                for index in stride(from: 0, to: buffer.count, by: pageSize) {
                    buffer.fill(UInt8(truncatingIfNeeded: (offset + index) / pageSize + 1),
                                in: index..<min(index + pageSize, buffer.count))
                }
                return .bytes(buffer.count)
            }
            // If resolution needed the pool this would deadlock: the watchdog then closes the userfaultfd, which wakes
            // the pool threads (they read zeros) and records the failure.
            try await withFaultWatchdog(seconds: 90) { scope in
                for iteration in 0..<iterations {
                    if scope.fired { break }
                    let region = try await LazyRegion(length: pages * pageSize, provider: provider,
                                                      options: .init(readahead: .none))
                    scope.track(region.uffd)
                    let base = UInt(bitPattern: region.baseAddress)
                    let values = await withTaskGroup(of: (Int, UInt8).self) { group in
                        for page in 0..<pages {
                            group.addTask {
                                // Runs on a cooperative-pool thread and blocks it in the kernel until resolved.
                                (page, cuffd_test_read_byte(UnsafeRawPointer(bitPattern: base + UInt(page * pageSize + 7))))
                            }
                        }
                        var values = [UInt8](repeating: 0, count: pages)
                        for await (page, value) in group { values[page] = value }
                        return values
                    }
                    let expected = (1...pages).map { UInt8($0) }
                    #expect(values == expected, "iteration \(iteration): \(values)")
                    let lastBytes = (0..<pages).map { regionBytes(region, offset: ($0 + 1) * pageSize - 1, count: 1)[0] }
                    #expect(lastBytes == expected, "iteration \(iteration): \(lastBytes)")
                    let stats = await region.settledStatistics
                    #expect(stats.pagesCopied == pages, "iteration \(iteration): \(stats)")
                    #expect(stats.faults == pages, "one fault per task: iteration \(iteration): \(stats)")
                    await region.close()
                    if stats.pagesCopied != pages { break }
                }
            }
        }

        /// Pages given back with MADV_DONTNEED fault again; the resolver must serve them again (refetch, the default) or
        /// with zeros (`afterRemove: .zeroFill`), not take them for present and wake the thread into the same fault.
        @Test(.timeLimit(.minutes(1)), arguments: [RemovedPagePolicy.refetch, .zeroFill])
        func discardedPagesAreServedAgain(policy: RemovedPagePolicy) async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 8 * pageSize, seed: 90)
            let calls = CallLog()
            let provider = ClosureProvider(size: source.count) { buffer, offset in
                calls.record(offset, buffer.count)
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            try await withFaultWatchdog(seconds: 20) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: .none, afterRemove: policy)) { region in
                    #expect(await finished(readByteOnThread(region, at: 2 * pageSize + 1), releasing: region.uffd) == source[2 * pageSize + 1])
                    // Give page 2 back, as an allocator or a balloon would (from a dedicated thread: with EVENT_REMOVE
                    // the call waits until the resolver read the event).
                    let base = UInt(bitPattern: region.baseAddress)
                    let discard = OffPoolThread(name: "uffd-res-discard") {
                        madvise(UnsafeMutableRawPointer(bitPattern: base + UInt(2 * pageSize)), pageSize, MADV_DONTNEED)
                    }
                    #expect(await finished(discard, releasing: region.uffd) == 0)
                    let again = await finished(copyOnThread(region, offset: 2 * pageSize, length: pageSize), within: 10,
                                               "the second touch of a discarded page", releasing: region.uffd)
                    switch policy {
                    case .refetch:
                        #expect(again.map { firstDifference($0, Array(source[2 * pageSize..<3 * pageSize])) == nil } == true)
                        #expect(calls.count(at: 2 * pageSize) == 2, "\(calls.all)")
                    case .zeroFill:
                        #expect(again.map { firstDifference($0, [UInt8](repeating: 0, count: pageSize)) == nil } == true)
                        #expect(calls.count(at: 2 * pageSize) == 1, "\(calls.all)")
                    }
                }
            }
        }

        /// Requirement 11: prefetched pages are present; touching them faults no more.
        @Test(.timeLimit(.minutes(1)))
        func prefetchedPagesDoNotFault() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 64 * pageSize, seed: 110)
            let calls = CallLog()
            let provider = ClosureProvider(size: source.count) { buffer, offset in
                calls.record(offset, buffer.count)
                try await Task.sleep(for: .microseconds(200))
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider) { region in
                    try await region.prefetch(0..<16 * pageSize)
                    // An unaligned range covers the pages it touches: 20 and 21.
                    try await region.prefetch(20 * pageSize + 100..<21 * pageSize + 1)
                    let callsAfterPrefetch = calls.count
                    #expect(callsAfterPrefetch >= 1)
                    #expect(await region.settledStatistics.faults == 0, "\(region.statistics)")
                    guard let bytes = await finished(copyOnThread(region, offset: 0, length: 16 * pageSize), releasing: region.uffd) else { return }
                    #expect(firstDifference(bytes, Array(source[0..<16 * pageSize])) == nil)
                    guard let more = await finished(touchPagesOnThread(region, pages: [20, 21]), releasing: region.uffd) else { return }
                    #expect(more == [source[20 * pageSize], source[21 * pageSize]])
                    #expect(await region.settledStatistics.faults == 0, "prefetched pages faulted: \(region.statistics)")
                    #expect(calls.count == callsAfterPrefetch)
                    #expect(firstDifference(regionBytes(region, offset: 20 * pageSize, count: 2 * pageSize), Array(source[20 * pageSize..<22 * pageSize])) == nil)
                    // A page not prefetched does fault (the counter is live).
                    #expect(await finished(readByteOnThread(region, at: 40 * pageSize + 1), releasing: region.uffd) == source[40 * pageSize + 1])
                    #expect(await region.settledStatistics.faults == 1, "\(region.statistics)")
                    // Prefetching what is present asks nothing.
                    try await region.prefetch(0..<16 * pageSize)
                    #expect(await region.settledStatistics.faults == 1)
                }
            }
        }

        /// Requirement 11: a prefetch whose provider fails throws the failure (a RegionError, as documented).
        @Test(.timeLimit(.minutes(1)), arguments: [FailurePolicy.zeroFill, .poison])
        func prefetchOfAFailingProviderThrows(policy: FailurePolicy) async throws {
            let pageSize = systemPageSize
            let provider = ClosureProvider(size: 8 * pageSize) { _, offset in
                await dispatchSleep(microseconds: 100)
                throw InjectedFailure(offset: offset)
            }
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 8 * pageSize, provider: provider,
                                            options: .init(failurePolicy: policy)) { region in
                    do {
                        try await region.prefetch(pageSize..<3 * pageSize)
                        Issue.record("prefetch of a failing provider returned")
                    } catch let error as RegionError {
                        #expect(error.underlying as? InjectedFailure == InjectedFailure(offset: pageSize), "\(error)")
                        #expect(error.resolution == policy)
                    } catch {
                        Issue.record("prefetch threw \(type(of: error)) \(error), expected a RegionError")
                    }
                    #expect(await region.settledStatistics.providerErrors == 1, "\(region.statistics)")
                }
            }
        }

        /// Requirement 12: a zero-length (or negative) region is refused. The initializer's throw is typed: `error` is a
        /// `UserfaultError` without a cast (this stops compiling if it goes back to `any Error`).
        @Test(arguments: [0, -4096])
        func emptyRegionThrows(length: Int) async {
            do {
                _ = try await LazyRegion(length: length, provider: ZeroProvider())
                Issue.record("a LazyRegion of \(length) bytes was created")
            } catch {
                let typed: UserfaultError = error
                #expect(typed.code == .invalidArgument, "\(typed)")
            }
            await #expect(throws: UserfaultError.self) {
                try await LazyRegion.with(length: length, provider: ZeroProvider()) { _ in
                    Issue.record("body ran")
                }
            }
        }

        /// Requirement 12: serving a range that overlaps one already served throws; an adjacent one does not.
        @Test(.timeLimit(.minutes(1)))
        func overlappingServeThrows() async throws {
            let pageSize = systemPageSize
            try await withFaultWatchdog(seconds: 30) { scope in
                let uffd = try scope.makeUFFD()
                let mapping = try scope.makeMapping(pages: 8)
                try uffd.register(mapping.range, mode: .missing)
                let resolver = FaultResolver(uffd: uffd)
                try await resolver.serve(mapping.pages(0, count: 4), provider: ZeroProvider())
                try await resolver.serve(mapping.pages(4, count: 2), provider: ZeroProvider())
                for clash in [mapping.pages(2, count: 4), mapping.pages(0, count: 8), mapping.pages(5, count: 1), mapping.pages(3)] {
                    do {
                        try await resolver.serve(clash, provider: ZeroProvider())
                        Issue.record("serving \(clash) over served ranges did not throw")
                    } catch let error as UserfaultError {
                        #expect(error.code == .invalidArgument, "\(error)")
                    } catch {
                        Issue.record("threw \(error), expected a UserfaultError")
                    }
                }
                // Unaligned ranges are refused too.
                do {
                    try await resolver.serve(MemoryRange(start: mapping.page(6) + 1, length: pageSize), provider: ZeroProvider())
                    Issue.record("an unaligned range was served")
                } catch let error as UserfaultError {
                    #expect(error.code == .invalidArgument, "\(error)")
                } catch {
                    Issue.record("threw \(error), expected a UserfaultError")
                }
                // And on a LazyRegion's own resolver.
                try await withWatchedRegion(scope, length: 4 * pageSize, provider: ZeroProvider()) { region in
                    do {
                        try await region.resolver.serve(MemoryRange(start: region.range.start + UInt(pageSize), length: pageSize),
                                                        provider: ZeroProvider())
                        Issue.record("serving part of a LazyRegion twice did not throw")
                    } catch let error as UserfaultError {
                        #expect(error.code == .invalidArgument, "\(error)")
                    } catch {
                        Issue.record("threw \(error), expected a UserfaultError")
                    }
                }
            }
        }

        /// Requirement 12: a fault in registered memory nobody serves is resolved with a zero page (the thread does not
        /// hang) and counted.
        @Test(.timeLimit(.minutes(1)))
        func unservedFaultGetsAZeroPage() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 4 * pageSize, seed: 120)
            try await withFaultWatchdog(seconds: 30) { scope in
                let uffd = try scope.makeUFFD()
                let mapping = try scope.makeMapping(pages: 8)
                try uffd.register(mapping.range, mode: .missing)
                let resolver = FaultResolver(uffd: uffd)
                try await resolver.serve(mapping.pages(0, count: 4), provider: MemoryProvider(source))
                try resolver.start()
                #expect(await finished(readOnThread(mapping.page(6) + 9), releasing: uffd) == 0)
                #expect(firstDifference(mapping.bytes(page: 6), [UInt8](repeating: 0, count: pageSize)) == nil)
                #expect(await finished(readOnThread(mapping.page(1) + 9), releasing: uffd) == source[pageSize + 9])
                let stats = resolver.statistics
                #expect(stats.unservedFaults == 1, "\(stats)")
                #expect(stats.faults == 2, "\(stats)")
                await resolver.cancel()
            }
        }

        /// A provider whose preferred read size is larger than the readahead maximum (here 4 MiB with the default
        /// 1 MiB): clusters are aligned to it, and the data must still arrive intact.
        @Test(.timeLimit(.minutes(1)))
        func preferredReadSizeLargerThanTheReadaheadMaximum() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 8 << 20, seed: 130)
            let calls = CallLog()
            let provider = ClosureProvider(size: source.count, preferredReadSize: 4 << 20) { buffer, offset in
                calls.record(offset, buffer.count)
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider) { region in
                    let pages = [0, 5, 300, 1023, 1024, 2047]
                    guard let bytes = await finished(touchPagesOnThread(region, pages: pages), releasing: region.uffd) else { return }
                    #expect(bytes == pages.map { source[$0 * pageSize] })
                    for page in pages {
                        #expect(firstDifference(regionBytes(region, offset: page * pageSize, count: pageSize),
                                                Array(source[page * pageSize..<(page + 1) * pageSize])) == nil, "page \(page)")
                    }
                    #expect(calls.all.allSatisfy { $0.offset + $0.count <= source.count }, "\(calls.all)")
                }
            }
        }
    }
}
