import Testing
import Userfaultfd

/// `PAGEMAP_SCAN` with a result vector smaller than the number of written runs: the kernel stops when the vector is
/// full and says where in `walk_end`; a scan that did not resume from there would lose the pages after it (unreported,
/// and not re-armed either, so reported a round late).
@Suite("Pagemap scanner")
struct PagemapScannerTests {
    @Test(.timeLimit(.minutes(1)), arguments: [1, 3, 512])
    func aScanThatFillsItsVectorResumesWhereItStopped(capacity: Int) async throws {
        let pageCount = 64
        let patterns: [[Int]] = [
            Array(stride(from: 0, to: pageCount, by: 2)),  // 32 runs of one page
            Array(0..<5) + [7] + Array(9..<12) + Array(40..<64),  // 4 runs, one of them long
            Array(stride(from: 1, to: pageCount, by: 3)),
        ]
        try await withFaultWatchdog(seconds: 30) { scope in
            let mapping = try scope.makeMapping(pages: pageCount)
            let tracker = try DirtyTracker(range: mapping.range, engine: .asyncScan)  // registers WP_ASYNC
            scope.track(tracker.uffd)
            try await tracker.start()
            let scanner = try PagemapScanner(pid: nil, regionCapacity: capacity)
            for (round, pattern) in patterns.enumerated() {
                #expect(await DirtyTrackerTests.write(pattern, at: mapping.address, threads: 2, value: UInt8(round + 1)))
                let ranges = try scanner.writtenPages(in: mapping.range, rearm: true)
                #expect(DirtyTrackerTests.pages(ranges, from: mapping.address) == Set(pattern), "round \(round), capacity \(capacity)")
                let runs = pattern.indices.filter { $0 == 0 || pattern[$0 - 1] + 1 != pattern[$0] }.count
                #expect(ranges.count == runs, "maximal runs, merged across resumed calls: \(ranges)")
                // Every reported page was re-armed, the ones after a full vector too.
                #expect(try scanner.writtenPages(in: mapping.range, rearm: true).isEmpty, "round \(round), capacity \(capacity)")
            }
            await tracker.stop()
        }
    }
}
