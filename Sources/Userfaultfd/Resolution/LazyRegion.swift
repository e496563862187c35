/// Memory whose pages come from a ``PageProvider`` the first time they are touched.
///
/// An anonymous mapping of any length (rounded up to whole pages), registered for MISSING faults with a userfaultfd of
/// its own and served by its own ``FaultResolver``. Use it like any other memory: reads and writes from any thread
/// fault the pages in on first touch.
///
/// ```swift
/// try await LazyRegion.with(length: 1 << 30, provider: FileProvider(path: "disk.img")) { region in
///     let header = region.withUnsafeBytes { Array($0.prefix(512)) }
/// }
/// ```
///
/// Two forms:
/// - structured, ``with(length:provider:options:_:)``: everything is released when the closure returns; cancelling the
///   calling task resolves every pending and later fault at once (``FaultResolver/Options/cancellation``, zeros by
///   default) so no thread stays blocked in the region;
/// - owned, ``init(length:provider:options:)`` with ``close()``.
///
/// A thread that touches the region blocks in the kernel until its page is resolved. The resolver never needs a thread
/// of Swift's cooperative pool, so touching it from async code is safe even when every pool thread faults at once.
public final class LazyRegion: Sendable {
    private let memory: AnonymousMemory
    /// The userfaultfd that reports this region's faults.
    public let uffd: UserfaultFD
    /// The resolver that serves them.
    public let resolver: FaultResolver
    /// Bytes asked for (the mapping is rounded up to whole pages; the extra bytes read as the provider says).
    public let count: Int

    /// Maps `length` bytes served by `provider` and starts serving faults.
    /// - Throws: ``UserfaultError`` when the length is not positive, or the mapping, userfaultfd or registration fails.
    public init(length: Int, provider: any PageProvider, options: FaultResolver.Options = .init()) async throws {
        guard length > 0 else {
            throw UserfaultError(.invalidArgument, operation: .register, detail: "a LazyRegion needs a positive length, got \(length)")
        }
        memory = try AnonymousMemory(length: length, noReserve: true)
        // REMOVE events: a page given back with MADV_DONTNEED faults again, and the resolver must know it is gone
        // (otherwise it takes the fault for one on a present page, wakes the thread, and the thread faults again forever).
        uffd = try UserfaultFD(optionalFeatures: [.threadID, .eventRemove])
        count = length
        do {
            try uffd.register(memory.range, mode: .missing)
            resolver = FaultResolver(uffd: uffd, options: options)
            try await resolver.serve(memory.range, provider: provider)
            try resolver.start()
        } catch {
            uffd.close()
            memory.unmap()
            throw error
        }
    }

    /// Runs `body` with a region of `length` bytes served by `provider`, and releases it when `body` returns or throws.
    ///
    /// Cancelling the calling task while threads wait on faults resolves them at once (see
    /// ``FaultResolver/Options/cancellation``), so `body` can finish.
    public static func with<Result: Sendable>(
        length: Int,
        provider: any PageProvider,
        options: FaultResolver.Options = .init(),
        _ body: (LazyRegion) async throws -> Result
    ) async throws -> Result {
        let region = try await LazyRegion(length: length, provider: provider, options: options)
        do {
            let result = try await withTaskCancellationHandler {
                try await body(region)
            } onCancel: {
                Task(executorPreference: region.uffd.eventExecutor) { await region.resolver.cancel() }
            }
            await region.close()
            return result
        } catch {
            await region.close()
            throw error
        }
    }

    deinit {
        uffd.close()
        memory.unmap()
    }

    /// Stops serving, resolves whatever is still pending (``FaultResolver/Options/cancellation``), closes the userfaultfd
    /// and unmaps the memory. No thread may use the region afterwards.
    public func close() async {
        await resolver.cancel()
        uffd.close()
        memory.unmap()
    }

    /// The first byte.
    public var baseAddress: UnsafeMutableRawPointer { memory.pointer }

    /// The region's address range (whole pages).
    public var range: MemoryRange { memory.range }

    /// Gives `body` the region's `count` bytes to read. Touching a page faults it in.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: memory.pointer, count: count))
    }

    /// Gives `body` the region's `count` bytes to read and write. Touching a page faults it in.
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeMutableRawBufferPointer(start: memory.pointer, count: count))
    }

    /// Resolves the bytes in `range` (offsets into the region) ahead of access, without blocking a thread.
    public func prefetch(_ range: Range<Int>) async throws {
        precondition(range.lowerBound >= 0 && range.upperBound <= memory.length, "prefetch range outside the region")
        guard !range.isEmpty else { return }
        try await resolver.prefetch(MemoryRange(start: memory.address + UInt(range.lowerBound), length: range.count))
    }

    /// The resolver's counters: faults, pages copied, zero pages, bytes, dedup joins, provider errors, latency.
    public var statistics: ResolverStatistics { resolver.statistics }

    /// Provider failures, as the failure policy resolves them.
    public var errors: AsyncStream<RegionError> { resolver.errors }
}
