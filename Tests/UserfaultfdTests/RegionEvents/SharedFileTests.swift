import Glibc
import Testing
import Userfaultfd

extension RegionEventTests {
    /// A second shared-memory region over the file a first one filled (a second VM restoring the same snapshot): every
    /// page is mapped from the page cache with MINOR faults, never asked of the provider, and a sequential reader takes
    /// one fault per readahead window, not one per page. Pages nobody filled still come from the provider.
    @Test(.timeLimit(.minutes(1)))
    func secondRegionOverTheSameFileMapsItsPagesInWindows() async throws {
        let pageSize = Self.pageSize
        let pages = 256
        let source = SeededBytes.make(count: pages * pageSize, seed: 513)
        let firstCalls = CallLog(), secondCalls = CallLog()
        try await withFaultWatchdog(seconds: 30) { scope in
            try await LazyRegion.with(length: source.count, provider: Self.counted(source, firstCalls), backing: .sharedMemory) { first in
                scope.track(first.uffd)
                let file = try #require(first.sharedFile)
                // The first region fills pages 0..<192 only.
                let filled = 192 * pageSize
                let head = await finished(copyOnThread(first, offset: 0, length: filled), releasing: first.uffd)
                #expect(head.map { firstDifference($0, Array(source[..<filled])) } == .some(nil))

                try await LazyRegion.with(length: source.count, provider: Self.counted(source, secondCalls),
                                          backing: .sharedMemory, sharedFile: file) { second in
                    scope.track(second.uffd)
                    let bytes = await finished(copyOnThread(second, offset: 0, length: source.count), releasing: second.uffd)
                    #expect(bytes.map { firstDifference($0, source) } == .some(nil))
                    let statistics = await second.settledStatistics
                    #expect(statistics.minorFaults >= 1 && statistics.minorFaults < 192 / 4,
                            "192 filled pages mapped in windows: \(statistics)")
                    #expect(secondCalls.all.allSatisfy { $0.offset >= filled }, "only unfilled pages were read: \(secondCalls.all)")
                    #expect(secondCalls.count >= 1)
                }
            }
        }
    }

    /// A shared file shorter than the region, or given with anonymous backing, is refused with a typed error.
    @Test func sharedFileMustFitAndNeedsSharedBacking() async throws {
        let file = try SharedMemoryFile(length: 4 * Self.pageSize)
        for (length, backing) in [(8 * Self.pageSize, LazyRegion.Backing.sharedMemory), (4 * Self.pageSize, .anonymous)] {
            await #expect(throws: UserfaultError.self) {
                _ = try await LazyRegion(length: length, provider: ZeroProvider(), backing: backing, sharedFile: file)
            }
        }
    }
}
