import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd

extension ResolutionTests {
    /// Requirements 2 and 3: concurrent faults on one page share one provider read; a page resolved by someone else
    /// while the provider works keeps that content and its waiters are woken.
    @Suite("Races")
    struct Races {
        /// A slow async provider: records each call; reads covering `gatedOffset` wait for `gate`.
        static func gatedProvider(size: Int, source: [UInt8], gatedPage: Int, gate: ProviderGate, log: CallLog,
                                  entered: CallCounter) -> ClosureProvider {
            let pageSize = systemPageSize
            return ClosureProvider(size: size) { buffer, offset in
                log.record(offset, buffer.count)
                if offset <= gatedPage * pageSize && gatedPage * pageSize < offset + buffer.count {
                    entered.increment()
                    await gate.wait()
                }
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
        }

        @Test(.timeLimit(.minutes(1)))
        func twoThreadsOnOnePageShareOneProviderRead() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 8 * pageSize, seed: 2)
            let gate = ProviderGate(), log = CallLog(), entered = CallCounter()
            let provider = Self.gatedProvider(size: source.count, source: source, gatedPage: 3, gate: gate, log: log,
                                              entered: entered)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: .none)) { region in
                    let first = readByteOnThread(region, at: 3 * pageSize + 17)
                    let second = readByteOnThread(region, at: 3 * pageSize + 4000)
                    // Both fault messages have been read (the provider is held, so neither was resolved).
                    let bothArrived = await pollUntil { region.statistics.faults >= 2 }
                    #expect(bothArrived, "\(region.statistics)")
                    #expect(!first.isFinished && !second.isFinished, "a thread returned while the provider was held")
                    gate.open()
                    #expect(await finished(first, releasing: region.uffd) == source[3 * pageSize + 17])
                    #expect(await finished(second, releasing: region.uffd) == source[3 * pageSize + 4000])
                    #expect(log.count(at: 3 * pageSize) == 1, "provider calls: \(log.all)")
                    #expect(log.covering(3 * pageSize) == 1, "provider calls: \(log.all)")
                    #expect(entered.current == 1)
                    let stats = await region.settledStatistics
                    #expect(stats.deduplicatedFaults >= 1, "\(stats)")
                    #expect(stats.providerReads == 1, "\(stats)")
                    #expect(stats.pagesCopied == 1, "\(stats)")
                    #expect(firstDifference(regionBytes(region, offset: 3 * pageSize, count: pageSize), Array(source[3 * pageSize..<4 * pageSize])) == nil)
                }
            }
        }

        enum OwnResolution: String, CaseIterable, Sendable { case copy, zeroPage }

        /// Requirement 3: resolve the page ourselves (without waking) while the resolver's read is in flight. The
        /// resolver's copy then meets EEXIST: our bytes stay, and the resolver wakes the thread.
        @Test(.timeLimit(.minutes(1)), arguments: OwnResolution.allCases)
        func pageResolvedByOthersWhileTheProviderReads(how: OwnResolution) async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 8 * pageSize, seed: 3)
            let gate = ProviderGate(), log = CallLog(), entered = CallCounter()
            let provider = Self.gatedProvider(size: source.count, source: source, gatedPage: 5, gate: gate, log: log,
                                              entered: entered)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: .none)) { region in
                    let pageAddress = UInt(bitPattern: region.baseAddress) + UInt(5 * pageSize)
                    let reader = readByteOnThread(region, at: 5 * pageSize + 99)
                    #expect(await pollUntil { entered.current == 1 }, "the provider was never asked for the page")

                    // Our own content, different from the provider's, installed without waking the thread.
                    let mine = [UInt8](repeating: 0xA5, count: pageSize)
                    switch how {
                    case .copy:
                        let copied = try mine.withUnsafeBytes {
                            try region.uffd.copy(from: $0.baseAddress!, to: pageAddress, length: pageSize, mode: .dontWake)
                        }
                        #expect(copied == pageSize)
                    case .zeroPage:
                        let mapped = try region.uffd.zeroPage(MemoryRange(start: pageAddress, length: pageSize), wake: false)
                        #expect(mapped == pageSize)
                    }
                    // Nobody woke the thread yet.
                    try await Task.sleep(for: .milliseconds(50))
                    #expect(!reader.isFinished, "the thread was woken before the resolver finished")

                    gate.open()
                    let expected: UInt8 = how == .copy ? 0xA5 : 0
                    #expect(await finished(reader, releasing: region.uffd) == expected, "the resolver's wake after EEXIST released the thread")
                    let page = regionBytes(region, offset: 5 * pageSize, count: pageSize)
                    #expect(firstDifference(page, how == .copy ? mine : [UInt8](repeating: 0, count: pageSize)) == nil,
                            "the kernel never overwrites a present page")
                    let stats = await region.settledStatistics
                    #expect(stats.pagesCopied == 0, "the resolver did not install this page: \(stats)")
                    #expect(stats.latency.count == 1, "the waiter was counted as woken: \(stats)")
                    #expect(stats.providerErrors == 0, "\(stats)")
                    // The resolver now knows the page is present: a prefetch asks the provider nothing more.
                    try await region.prefetch(5 * pageSize..<6 * pageSize)
                    #expect(log.count == 1, "provider calls: \(log.all)")
                    #expect(firstDifference(regionBytes(region, offset: 5 * pageSize, count: pageSize), page) == nil)
                }
            }
        }

        /// A page in the middle of a readahead cluster resolved by someone else while the read is in flight: the
        /// resolver's copy stops there (EAGAIN with partial progress, then EEXIST), skips it and installs the rest.
        @Test(.timeLimit(.minutes(1)))
        func pageInTheMiddleOfAClusterResolvedByOthers() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 8 * pageSize, seed: 4)
            let gate = ProviderGate(), log = CallLog(), entered = CallCounter()
            let provider = Self.gatedProvider(size: source.count, source: source, gatedPage: 0, gate: gate, log: log,
                                              entered: entered)
            let fourPages = ReadaheadPolicy.adaptive(initial: 4 * pageSize, maximum: 4 * pageSize)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: fourPages)) { region in
                    let base = UInt(bitPattern: region.baseAddress)
                    let reader = readByteOnThread(region, at: 10)
                    #expect(await pollUntil { entered.current == 1 })
                    #expect(log.all == [ProviderCall(offset: 0, count: 4 * pageSize)], "one cluster of 4 pages: \(log.all)")
                    let mine = [UInt8](repeating: 0x5A, count: pageSize)
                    try mine.withUnsafeBytes {
                        _ = try region.uffd.copy(from: $0.baseAddress!, to: base + UInt(2 * pageSize), length: pageSize)
                    }
                    gate.open()
                    #expect(await finished(reader, releasing: region.uffd) == source[10])
                    // Pages 1 and 3 were installed by the same resolution: reading them faults no more.
                    let faultsBefore = await region.settledStatistics.faults
                    let rest = touchPagesOnThread(region, pages: [1, 2, 3])
                    #expect(await finished(rest, releasing: region.uffd) == [source[pageSize], 0x5A, source[3 * pageSize]])
                    #expect(await region.settledStatistics.faults == faultsBefore, "\(region.statistics)")
                    #expect(firstDifference(regionBytes(region, offset: 0, count: 2 * pageSize), Array(source[0..<2 * pageSize])) == nil)
                    #expect(firstDifference(regionBytes(region, offset: 2 * pageSize, count: pageSize), mine) == nil)
                    #expect(firstDifference(regionBytes(region, offset: 3 * pageSize, count: pageSize), Array(source[3 * pageSize..<4 * pageSize])) == nil)
                    #expect(await region.settledStatistics.pagesCopied == 3, "\(region.statistics)")
                }
            }
        }
    }
}
