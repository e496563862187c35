import Testing
import Userfaultfd

extension ResolutionTests {
    /// `region.errors` serves several observers: each access is a stream of its own, and one observer that stops
    /// (here a timed wait that gives up, which cancels its iteration) ends only its own stream.
    @Suite("Error observers")
    struct ErrorObservers {
        /// Fails every read, resolved as zeros: one RegionError per faulted page.
        static let failing = ClosureProvider(size: 1 << 20, immediate: { _, offset in throw InjectedFailure(offset: offset) })

        @Test(.timeLimit(.minutes(1)))
        func twoObserversSeeOneErrorAndACancelledOneEndsOnlyItself() async throws {
            let pageSize = systemPageSize
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 8 * pageSize, provider: Self.failing,
                                            options: .init(readahead: .none, failurePolicy: .zeroFill)) { region in
                    let first = region.errors
                    let second = region.errors
                    // A third observer gives up before anything fails: its iteration is cancelled.
                    #expect(await firstElement(of: region.errors, within: 0.05) == nil)

                    guard let bytes = await finished(copyOnThread(region, offset: 3 * pageSize, length: pageSize),
                                                     releasing: region.uffd) else { return }
                    #expect(bytes == [UInt8](repeating: 0, count: pageSize))
                    let failedPage = MemoryRange(start: region.address + UInt(3 * pageSize), length: pageSize)

                    let seenByFirst = await firstElement(of: first, within: 5)
                    let seenBySecond = await firstElement(of: second, within: 5)
                    #expect(seenByFirst?.range == failedPage, "the first observer sees the failure: \(String(describing: seenByFirst))")
                    #expect(seenBySecond?.range == failedPage, "the second observer sees it too: \(String(describing: seenBySecond))")
                    #expect(seenBySecond?.underlying as? InjectedFailure == InjectedFailure(offset: 3 * pageSize))
                    #expect(seenBySecond?.resolution == .zeroFill)
                    // Each saw it once; and nothing was kept for a later observer, since two were watching.
                    #expect(await firstElement(of: first, within: 0.05) == nil)
                    #expect(await firstElement(of: second, within: 0.05) == nil)
                    #expect(await firstElement(of: region.errors, within: 0.05) == nil)
                }
            }
        }
    }
}
