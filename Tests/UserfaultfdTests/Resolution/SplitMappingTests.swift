import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import Userfaultfd

extension ResolutionTests {
    /// A resolving ioctl fails as a whole (`ENOENT`) when its range crosses the end of a mapping, and a registered
    /// range can be several mappings: `mprotect`, `mlock2(MLOCK_ONFAULT)` or `madvise(MADV_HUGEPAGE)` on part of it
    /// splits its VMA (the parts stay registered). A readahead cluster over such a split must still be installed, and
    /// every thread waiting on it woken.
    @Suite("Split mappings")
    struct SplitMappings {
        enum Split: String, CaseIterable, Sendable {
            /// The middle pages read-only.
            case mprotect
            /// The middle pages marked for transparent huge pages.
            case hugepage

            func apply(to pointer: UnsafeMutableRawPointer, length: Int) -> Int32 {
                switch self {
                case .mprotect: Glibc.mprotect(pointer, length, PROT_READ)
                case .hugepage: Glibc.madvise(pointer, length, MADV_HUGEPAGE)
                }
            }
        }

        enum Content: String, CaseIterable, Sendable {
            /// The provider's bytes: installed with UFFDIO_COPY.
            case bytes
            /// The provider says zeros: installed with UFFDIO_ZEROPAGE.
            case zeros
        }

        /// 16 pages, pages 6..<10 split off: three mappings. A fault at page 5 (just before the split) brings in pages
        /// 5..<13 (an 8-page initial window), across all three; while the read is held, threads fault at page 8 (the
        /// middle mapping) and 11 (the last) and join it. Once the read returns, all three threads get their data.
        /// Before the fix the install failed with ENOENT and nobody was woken: every thread hung until the watchdog.
        @Test(.timeLimit(.minutes(1)), arguments: Split.allCases, Content.allCases)
        func clusterAcrossASplitMappingWakesEveryThread(split: Split, content: Content) async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 16 * pageSize, seed: 1201)
            let gate = ProviderGate(), log = CallLog(), entered = CallCounter()
            let provider = ClosureProvider(size: source.count) { buffer, offset in
                log.record(offset, buffer.count)
                entered.increment()
                await gate.wait()
                if content == .zeros { return .zeros }
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            let options = FaultResolver.Options(
                readahead: .adaptive(initial: 8 * pageSize, maximum: 8 * pageSize, asynchronous: false))
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider, options: options) { region in
                    #expect(split.apply(to: region.baseAddress + 6 * pageSize, length: 4 * pageSize) == 0,
                            "\(split): \(String(cString: strerror(errno)))")
                    let offsets = [5 * pageSize + 11, 8 * pageSize + 22, 11 * pageSize + 33]
                    let first = readByteOnThread(region, at: offsets[0])
                    #expect(await pollUntil { entered.current == 1 }, "the provider was never asked")
                    let others = offsets.dropFirst().map { readByteOnThread(region, at: $0) }
                    #expect(await pollUntil { region.statistics.faults >= 3 }, "\(region.statistics)")
                    #expect(log.all == [ProviderCall(offset: 5 * pageSize, count: 8 * pageSize)],
                            "one read for the cluster 5..<13, which the other faults join: \(log.all)")
                    gate.open()
                    for (thread, offset) in zip([first] + others, offsets) {
                        let byte = await finished(thread, within: 5, "the reader of page \(offset / pageSize)",
                                                  releasing: region.uffd)
                        #expect(byte == (content == .zeros ? 0 : source[offset]), "page \(offset / pageSize)")
                    }
                    let stats = await region.settledStatistics
                    let installed = content == .zeros ? stats.zeroPages : stats.pagesCopied
                    #expect(installed == 8, "the whole cluster is installed, each mapping's part: \(stats)")
                    #expect(stats.providerErrors == 0, "\(stats)")
                    #expect(await firstElement(of: region.errors, within: 0.1) == nil)
                    if content == .bytes {
                        #expect(firstDifference(regionBytes(region, offset: 5 * pageSize, count: 8 * pageSize),
                                                Array(source[5 * pageSize..<13 * pageSize])) == nil)
                    }
                }
            }
        }

        /// Pages that cannot be installed even one at a time (here unregistered, so `ENOENT` for each; a cgroup at its
        /// limit gives `ENOMEM` the same way) do not stop the rest: a cluster over pages 5..<13 whose pages 6..<10 were
        /// unregistered installs pages 5 and 10..<13, wakes the threads on pages 5 and 11 with their data, and reports
        /// the failure once, with the failure policy's resolution.
        @Test(.timeLimit(.minutes(1)))
        func pagesRefusedEvenAloneAreReportedAndTheRestIsServed() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 16 * pageSize, seed: 1202)
            let gate = ProviderGate(), entered = CallCounter()
            let provider = ClosureProvider(size: source.count) { buffer, offset in
                entered.increment()
                await gate.wait()
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            let options = FaultResolver.Options(
                readahead: .adaptive(initial: 8 * pageSize, maximum: 8 * pageSize, asynchronous: false),
                failurePolicy: .zeroFill)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider, options: options) { region in
                    let base = UInt(bitPattern: region.baseAddress)
                    try region.uffd.unregister(MemoryRange(start: base + UInt(6 * pageSize), length: 4 * pageSize))
                    let offsets = [5 * pageSize + 11, 11 * pageSize + 33]
                    let first = readByteOnThread(region, at: offsets[0])
                    #expect(await pollUntil { entered.current == 1 }, "the provider was never asked")
                    let second = readByteOnThread(region, at: offsets[1])
                    #expect(await pollUntil { region.statistics.faults >= 2 }, "\(region.statistics)")
                    gate.open()
                    for (thread, offset) in zip([first, second], offsets) {
                        let byte = await finished(thread, within: 5, "the reader of page \(offset / pageSize)",
                                                  releasing: region.uffd)
                        #expect(byte == source[offset], "page \(offset / pageSize)")
                    }
                    let error = await firstElement(of: region.errors, within: 2)
                    #expect(error?.range == MemoryRange(start: base + UInt(5 * pageSize), length: 8 * pageSize))
                    #expect(error?.resolution == .zeroFill)
                    #expect((error?.underlying as? UserfaultError)?.code == .notRegistered, "\(String(describing: error))")
                    let stats = await region.settledStatistics
                    #expect(stats.pagesCopied == 4, "pages 5, 10, 11 and 12: \(stats)")
                    #expect(stats.zeroPages == 0, "the pages threads waited on have their data: \(stats)")
                }
            }
        }
    }
}
