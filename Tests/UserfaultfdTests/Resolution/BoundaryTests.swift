import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd

extension ResolutionTests {
    /// Requirements 4 and 5: the end of the provider's data, and readahead's limits.
    @Suite("Data end and readahead")
    struct Boundaries {
        enum Readahead: String, CaseIterable, Sendable, CustomTestStringConvertible {
            case none, adaptiveDefault
            var policy: ReadaheadPolicy { self == .none ? .none : .default }
            var testDescription: String { rawValue }
        }

        /// A provider that serves `source`, records each call, and notes every call that reaches past `source.count`.
        static func recordingProvider(_ source: [UInt8], log: CallLog, violations: CallLog) -> ClosureProvider {
            let size = source.count
            return ClosureProvider(size: size) { buffer, offset in
                log.record(offset, buffer.count)
                if offset < 0 || offset >= size || offset + buffer.count > size { violations.record(offset, buffer.count) }
                await dispatchSleep(microseconds: 20)
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
        }

        /// Requirement 4: 3 pages + 100 bytes of data in a region of 8 pages.
        @Test(.timeLimit(.minutes(1)), arguments: Readahead.allCases)
        func bytesPastTheDataReadZeroAndAreNeverAskedFor(readahead: Readahead) async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 3 * pageSize + 100, seed: 40)
            let log = CallLog(), violations = CallLog()
            let provider = Self.recordingProvider(source, log: log, violations: violations)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 8 * pageSize, provider: provider,
                                            options: .init(readahead: readahead.policy)) { region in
                    // Every byte of the 8 pages, in order, from a dedicated thread.
                    guard let bytes = await finished(copyOnThread(region, offset: 0, length: 8 * pageSize), releasing: region.uffd) else { return }
                    #expect(firstDifference(Array(bytes[..<source.count]), source) == nil)
                    let tail = bytes[source.count...]
                    #expect(tail.allSatisfy { $0 == 0 }, "first nonzero past the data at \(tail.firstIndex { $0 != 0 } ?? -1)")
                    #expect(violations.all.isEmpty, "calls reaching past the data (\(source.count) bytes): \(violations.all)")
                    #expect(!log.all.isEmpty)
                    #expect(log.all.allSatisfy { $0.offset % pageSize == 0 }, "\(log.all)")
                    let stats = await region.settledStatistics
                    // The 4 pages past the data are zero pages, never copies.
                    #expect(stats.pagesCopied == 4, "\(stats)")
                    #expect(stats.zeroPages == 4, "\(stats)")
                    if readahead == .none {
                        #expect(stats.faults == 8, "\(stats)")
                        #expect(log.all.map(\.offset) == [0, pageSize, 2 * pageSize, 3 * pageSize], "\(log.all)")
                        #expect(log.all.last?.count == 100, "the last read is clipped to the data: \(log.all)")
                    }
                }
            }
        }

        /// Requirement 4 with the library's own providers: a file and a memory provider of 3 pages + 100 bytes.
        @Test(.timeLimit(.minutes(1)), arguments: ["file", "memory"])
        func libraryProvidersEndWithZeros(kind: String) async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 3 * pageSize + 100, seed: 41)
            let file = try ScratchFile(bytes: source, name: "uffd-res-partial")
            defer { file.remove() }
            let provider: any PageProvider = kind == "file" ? try FileProvider(path: file.path) : MemoryProvider(source)
            #expect(provider.size == source.count)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 8 * pageSize, provider: provider) { region in
                    // Touch the far end first, then the partial page, then the rest.
                    let touch = touchPagesOnThread(region, pages: [7, 3, 5, 0, 1, 2, 4, 6])
                    guard await finished(touch, releasing: region.uffd) != nil else { return }
                    let bytes = regionBytes(region, offset: 0, count: 8 * pageSize)
                    #expect(firstDifference(Array(bytes[..<source.count]), source) == nil)
                    #expect(bytes[source.count...].allSatisfy { $0 == 0 })
                }
            }
        }

        /// Requirement 5: a sequential walk with default readahead over 300 pages of which the data covers 200 pages +
        /// 50 bytes, with pages in the middle already resolved by us with other bytes.
        @Test(.timeLimit(.minutes(1)), arguments: Readahead.allCases)
        func readaheadStaysInsideAndNeverOverwrites(readahead: Readahead) async throws {
            let pageSize = systemPageSize
            let regionPages = 300
            let source = SeededBytes.make(count: 200 * pageSize + 50, seed: 50)
            let ours: [Int: UInt8] = [50: 0xE1, 51: 0xE2, 120: 0xE3, 250: 0xE4]
            let log = CallLog(), violations = CallLog()
            let provider = Self.recordingProvider(source, log: log, violations: violations)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: regionPages * pageSize, provider: provider,
                                            options: .init(readahead: readahead.policy)) { region in
                    let base = UInt(bitPattern: region.baseAddress)
                    for (page, byte) in ours {
                        let bytes = [UInt8](repeating: byte, count: pageSize)
                        try bytes.withUnsafeBytes {
                            _ = try region.uffd.copy(from: $0.baseAddress!, to: base + UInt(page * pageSize), length: pageSize)
                        }
                    }
                    guard let firstBytes = await finished(touchPagesOnThread(region, pages: Array(0..<regionPages)), releasing: region.uffd) else { return }
                    #expect(firstBytes.count == regionPages)

                    for page in 0..<regionPages {
                        let bytes = regionBytes(region, offset: page * pageSize, count: pageSize)
                        let expected: [UInt8]
                        if let byte = ours[page] {
                            expected = [UInt8](repeating: byte, count: pageSize)
                        } else {
                            let start = min(page * pageSize, source.count), end = min((page + 1) * pageSize, source.count)
                            expected = Array(source[start..<end]) + [UInt8](repeating: 0, count: pageSize - (end - start))
                        }
                        #expect(firstDifference(bytes, expected) == nil, "page \(page)\(ours[page] != nil ? " (ours)" : "") differs")
                        if bytes != expected { break }
                    }

                    let calls = log.all
                    #expect(violations.all.isEmpty, "calls reaching past the data: \(violations.all)")
                    #expect(calls.allSatisfy { $0.offset >= 0 && $0.offset + $0.count <= regionPages * pageSize }, "\(calls)")
                    // No byte was asked for twice.
                    let sorted = calls.sorted { $0.offset < $1.offset }
                    #expect(zip(sorted, sorted.dropFirst()).allSatisfy { $0.offset + $0.count <= $1.offset }, "overlapping reads: \(sorted)")
                    let stats = await region.settledStatistics
                    let touched = regionPages - ours.count
                    switch readahead {
                    case .adaptiveDefault:
                        #expect(stats.faults < touched / 4, "readahead should bring pages in ahead of the walk: \(stats)")
                        #expect(calls.contains { $0.count > pageSize }, "\(calls)")
                    case .none:
                        #expect(stats.faults == touched, "\(stats)")
                        #expect(calls.allSatisfy { $0.count <= pageSize }, "\(calls)")
                        #expect(calls.count == 201 - ours.keys.filter { $0 <= 200 }.count, "\(calls)")
                    }
                    // Data pages not ours are copies, pages past the data are zero pages.
                    #expect(stats.pagesCopied == 201 - 3, "\(stats)")
                    #expect(stats.zeroPages == 99 - 1, "\(stats)")
                }
            }
        }
    }
}
