import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import UserfaultfdBenchSupport
import Userfaultfd

extension ResolutionTests {
    /// Requirement 1: what 8 dedicated threads read at random from a 64 MiB LazyRegion is exactly the provider's data,
    /// for an immediate provider (memory), a file, and asynchronous providers that really suspend.
    @Suite("Content matches the provider")
    struct Content {
        enum ProviderKind: String, CaseIterable, Sendable, CustomTestStringConvertible {
            /// MemoryProvider: served inside the event handler.
            case memory
            /// FileProvider over a temp file of the same bytes.
            case file
            /// An async ClosureProvider that awaits Task.sleep before filling.
            case asyncTaskSleep
            /// An async ClosureProvider that awaits a continuation resumed by DispatchQueue.global().asyncAfter.
            case asyncDispatch

            var testDescription: String { rawValue }
        }

        enum Readahead: String, CaseIterable, Sendable, CustomTestStringConvertible {
            case none, adaptiveDefault
            var policy: ReadaheadPolicy { self == .none ? .none : .default }
            var testDescription: String { rawValue }
        }

        static let threads = 8
        static let accessesPerThread = 3000

        @Test(.timeLimit(.minutes(3)), arguments: ProviderKind.allCases, Readahead.allCases)
        func randomAccessFromManyThreads(kind: ProviderKind, readahead: Readahead) async throws {
            let source = SeededBytes.big
            let length = source.count
            let pageSize = systemPageSize
            let pageCount = length / pageSize
            let expectedSums = pageChecksums(of: source)
            var file: ScratchFile?
            defer { file?.remove() }

            let provider: any PageProvider
            switch kind {
            case .memory:
                provider = MemoryProvider(source)
            case .file:
                file = try ScratchFile(bytes: source, name: "uffd-res-content")
                provider = try FileProvider(path: file!.path)
            case .asyncTaskSleep:
                provider = ClosureProvider(size: length) { buffer, offset in
                    try await Task.sleep(for: .microseconds(5))
                    return .bytes(fillBuffer(buffer, from: source, at: offset))
                }
            case .asyncDispatch:
                provider = ClosureProvider(size: length) { buffer, offset in
                    await dispatchSleep(microseconds: 5)
                    return .bytes(fillBuffer(buffer, from: source, at: offset))
                }
            }

            try await withFaultWatchdog(seconds: 150) { scope in
                try await withWatchedRegion(scope, length: length, provider: provider,
                                            options: .init(readahead: readahead.policy)) { region in
                    let base = UInt(bitPattern: region.baseAddress)
                    // 8 dedicated threads, each with its own seeded generator, read a byte at a random offset (checked
                    // against the source) and then checksum the whole page it fell in.
                    let workers = (0..<Self.threads).map { worker in
                        OffPoolThread(name: "uffd-res-random-\(worker)") { () -> [String] in
                            var generator = SplitMix64(seed: 0xc0ffee &+ UInt64(worker) &* 7919)
                            var problems: [String] = []
                            for _ in 0..<Self.accessesPerThread {
                                let offset = Int(generator.next() % UInt64(length))
                                let byte = cuffd_test_read_byte(UnsafeRawPointer(bitPattern: base + UInt(offset)))
                                if byte != source[offset], problems.count < 5 {
                                    problems.append("byte at \(offset): \(byte), expected \(source[offset])")
                                }
                                let page = offset / pageSize
                                let sum = cuffd_res_checksum(UnsafeRawPointer(bitPattern: base + UInt(page * pageSize)), pageSize)
                                if sum != expectedSums[page], problems.count < 5 {
                                    problems.append("checksum of page \(page) differs")
                                }
                            }
                            return problems
                        }
                    }
                    for (index, worker) in workers.enumerated() {
                        guard let problems = await finished(worker, within: 120, "random reader \(index)", releasing: region.uffd) else { continue }
                        #expect(problems.isEmpty, "reader \(index): \(problems)")
                    }

                    // Then every page, from one more dedicated thread (the pages not touched yet fault now).
                    let verifier = OffPoolThread(name: "uffd-res-verify") { () -> [Int] in
                        var bad: [Int] = []
                        for page in 0..<pageCount {
                            let sum = cuffd_res_checksum(UnsafeRawPointer(bitPattern: base + UInt(page * pageSize)), pageSize)
                            if sum != expectedSums[page] { bad.append(page) }
                        }
                        return bad
                    }
                    if let bad = await finished(verifier, within: 120, "verifier", releasing: region.uffd) {
                        #expect(bad.isEmpty, "\(bad.count) pages differ from the source, first \(bad.prefix(8))")
                    }
                    let identical = source.withUnsafeBytes { memcmp(region.baseAddress, $0.baseAddress!, length) == 0 }
                    #expect(identical, "the region's bytes differ from the source")

                    let stats = await region.settledStatistics
                    // Every page copied exactly once: clusters never overlap, and a racing fault joins or is woken.
                    #expect(stats.pagesCopied == pageCount, "\(stats)")
                    #expect(stats.bytesCopied == length, "\(stats)")
                    #expect(stats.zeroPages == 0, "\(stats)")
                    #expect(stats.providerErrors == 0, "\(stats)")
                    #expect(stats.unservedFaults == 0, "\(stats)")
                    // Each fault message started a read, joined one, or found its page present (reads started by
                    // asynchronous readahead answer no fault).
                    #expect(stats.faults == stats.providerReads - stats.readaheadReads + stats.deduplicatedFaults
                                + stats.alreadyPresentFaults, "\(stats)")
                    switch readahead {
                    case .none:
                        #expect(stats.providerReads == pageCount, "one read per page without readahead: \(stats)")
                        #expect(stats.faults >= pageCount, "\(stats)")
                    case .adaptiveDefault:
                        #expect(stats.providerReads < pageCount, "readahead should batch pages: \(stats)")
                    }
                    #expect(!scope.fired)
                }
            }
        }
    }
}
