import Glibc
import Testing
import Userfaultfd

/// Lengths, sizes and offsets near the integer limits, from callers and providers: each entry point answers with a
/// typed ``UserfaultError`` (``UserfaultError/Code/invalidArgument``) or works, and nothing traps on the arithmetic
/// (rounding to pages, offsets past a provider's end).
@Suite("Lengths near the integer limits")
struct LengthLimitTests {
    /// 2^63 − 808 (the size that overflowed page rounding), Int.max, the last length that still fits one page below it.
    static let hugeLengths = [Int.max - 807, Int.max, Int.max - systemPageSize + 2]
    static let nonPositiveLengths = [0, -1, Int.min]

    static func isInvalidArgument(_ error: any Error) -> Bool {
        (error as? UserfaultError)?.code == .invalidArgument
    }

    @Test(arguments: hugeLengths + nonPositiveLengths)
    func anonymousMemoryRejectsTheLength(length: Int) {
        #expect(throws: UserfaultError.self) { _ = try AnonymousMemory(length: length) }
        do {
            _ = try AnonymousMemory(length: length)
        } catch {
            #expect(error.code == .invalidArgument, "\(error)")
        }
    }

    @Test(arguments: hugeLengths + nonPositiveLengths)
    func sharedMemoryFileRejectsTheLength(length: Int) {
        do {
            _ = try SharedMemoryFile(length: length)
            Issue.record("a \(length)-byte shared memory file was made")
        } catch {
            #expect(error.code == .invalidArgument, "\(error)")
        }
    }

    @Test(.timeLimit(.minutes(1)), arguments: hugeLengths)
    func lazyRegionRejectsTheLength(length: Int) async {
        await #expect(performing: { _ = try await LazyRegion(length: length, provider: ZeroProvider()) },
                      throws: Self.isInvalidArgument)
        await #expect(performing: {
            _ = try await LazyRegion(length: length, provider: ZeroProvider(), backing: .sharedMemory)
        }, throws: Self.isInvalidArgument)
    }

    /// A provider that says it holds `size` bytes, every one 0x5a.
    struct SizedProvider: PageProvider {
        let size: Int?
        func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
            buffer.fill(0x5a, in: 0..<buffer.count)
            return .bytes(buffer.count)
        }
    }

    /// A provider larger than any region (its size near Int.max) is fine: the region is served from it.
    @Test(.timeLimit(.minutes(1)), arguments: [Int.max, Int.max - 807])
    func aProviderOfNearlyIntMaxBytesServesTheRegion(size: Int) async throws {
        try await withFaultWatchdog(seconds: 20) { scope in
            try await LazyRegion.with(length: 4 * systemPageSize, provider: SizedProvider(size: size)) { region in
                scope.track(region.uffd)
                try await region.prefetch(0..<4 * systemPageSize)
                #expect(region.withUnsafeBytes { $0[3 * systemPageSize + 1] } == 0x5a)
            }
        }
    }

    /// Provider offsets that are negative or run past Int.max with the range, and provider sizes below zero.
    @Test(.timeLimit(.minutes(1)))
    func serveRejectsOffsetsThatDoNotFit() async throws {
        let memory = try AnonymousMemory(length: 4 * systemPageSize)
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        try uffd.register(memory.range, mode: .missing)
        for offset in [-1, Int.min, Int.max - systemPageSize, Int.max] {
            let resolver = FaultResolver(uffd: uffd)
            await #expect(performing: {
                try await resolver.serve(memory.range, provider: SizedProvider(size: nil), providerOffset: offset)
            }, throws: Self.isInvalidArgument)
        }
        // A negative size is no data at all: pages read as zero (and nothing traps computing how much is left).
        try await FaultResolver(uffd: uffd).serve(memory.range, provider: SizedProvider(size: Int.min), providerOffset: Int.max - 4 * systemPageSize)
    }

    /// Ranges near the top of the address space (UInt64.max): prefetch answers with a typed error for a range that
    /// wraps around, instead of trapping while rounding it to pages.
    @Test(.timeLimit(.minutes(1)))
    func prefetchRejectsARangeThatWraps() async throws {
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let resolver = FaultResolver(uffd: uffd)
        for range in [MemoryRange(start: UInt(UInt64.max) - 10, length: 5), MemoryRange(start: UInt(UInt64.max) - 10, length: 64),
                      MemoryRange(start: 4096, length: Int.max), MemoryRange(start: 4096, length: -1)] {
            await #expect(performing: { try await resolver.prefetch(range) }, throws: Self.isInvalidArgument)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func lazyRegionPrefetchOutsideTheRegionIsATypedError() async throws {
        try await LazyRegion.with(length: systemPageSize, provider: ZeroProvider()) { region in
            for range in [-1..<10, 0..<(systemPageSize + 1), (Int.max - 1)..<Int.max] {
                await #expect(performing: { try await region.prefetch(range) }, throws: Self.isInvalidArgument)
            }
        }
    }

    @Test func expandingARangeAtTheTopOfTheAddressSpaceSaturates() {
        let range = MemoryRange(start: UInt.max - 10, length: 5)
        let expanded = range.expandedToPages(of: 4096)
        #expect(expanded.start == UInt.max & ~4095)
        #expect(expanded.length == 4095, "clamped to the last page boundary below the end of the address space")
    }
}
