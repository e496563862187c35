import Testing
import Userfaultfd

extension ResolutionTests {
    /// Readahead follows several interleaved sequential streams, as glibc's `memcpy` of a large buffer makes (it reads
    /// four far-apart parts in turn, and copies from the end when source and destination share their page offset):
    /// each stream grows its own window, forwards or backwards, so the faults stay far fewer than the pages.
    @Suite("Readahead streams")
    struct ReadaheadStreams {
        /// One thread walks `streams` equal parts of a region in turn (page 0 of each part, then page 1 of each, ...;
        /// or from each part's last page down).
        @Test(.timeLimit(.minutes(1)), arguments: [1, 2, 4, 8], [false, true])
        func interleavedStreamsEachGetReadahead(streams: Int, backwards: Bool) async throws {
            let pageSize = systemPageSize, partPages = 512
            let regionPages = streams * partPages
            let source = SeededBytes.make(count: regionPages * pageSize, seed: UInt64(60 + streams))
            let provider = MemoryProvider(source)
            let steps = backwards ? Array((0..<partPages).reversed()) : Array(0..<partPages)
            let order = steps.flatMap { step in (0..<streams).map { $0 * partPages + step } }
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: regionPages * pageSize, provider: provider,
                                            options: .init(readahead: .default)) { region in
                    guard let firstBytes = await finished(touchPagesOnThread(region, pages: order), releasing: region.uffd) else {
                        return
                    }
                    #expect(firstBytes == order.map { source[$0 * pageSize] })
                    let stats = await region.settledStatistics
                    // One stream alone doubles from 1 page to 256 (1 MiB): 9 faults per 511 pages, then one per
                    // window. Each of the interleaved streams must do about as well: far below one fault per page.
                    #expect(stats.faults <= streams * 16, "\(streams) streams (backwards: \(backwards)) over \(regionPages) pages: \(stats)")
                    #expect(stats.pagesCopied == regionPages, "\(stats)")
                }
            }
        }

        /// A stream going backwards over a provider that reads in blocks (a remote object): every read is whole,
        /// aligned blocks, and no block is read twice.
        @Test(.timeLimit(.minutes(1)))
        func backwardsStreamsReadWholeBlocksOnce() async throws {
            let pageSize = systemPageSize, blockPages = 16, blocks = 8
            let source = SeededBytes.make(count: blocks * blockPages * pageSize, seed: 70)
            let log = CallLog()
            let provider = ClosureProvider(size: source.count, preferredReadSize: blockPages * pageSize) { buffer, offset in
                log.record(offset, buffer.count)
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: .adaptive(maximum: blockPages * pageSize))) { region in
                    let order = Array((0..<blocks * blockPages).reversed())
                    guard let firstBytes = await finished(touchPagesOnThread(region, pages: order), releasing: region.uffd) else {
                        return
                    }
                    #expect(firstBytes == order.map { source[$0 * pageSize] })
                    let calls = log.all.sorted { $0.offset < $1.offset }
                    let block = blockPages * pageSize
                    #expect(calls.allSatisfy { $0.offset % block == 0 && $0.count % block == 0 }, "reads not in whole blocks: \(calls)")
                    #expect(zip(calls, calls.dropFirst()).allSatisfy { $0.offset + $0.count <= $1.offset }, "a block read twice: \(calls)")
                    #expect(calls.map(\.count).reduce(0, +) == source.count, "\(calls)")
                }
            }
        }
    }
}
