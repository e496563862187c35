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
/// - structured, ``with(length:provider:options:backing:tracking:sharedFile:_:)``: everything is released when the
///   closure returns; cancelling the calling task resolves every pending and later fault at once
///   (``FaultResolver/Options/cancellation``, zeros by default) so no thread stays blocked in the region;
/// - owned, ``init(length:provider:options:backing:tracking:sharedFile:)`` with ``close()``.
///
/// A thread that touches the region blocks in the kernel until its page is resolved. The resolver never needs a thread
/// of Swift's cooperative pool, so touching it from async code is safe even when every pool thread faults at once.
public final class LazyRegion: Sendable {
    /// What memory backs the region.
    public enum Backing: Sendable, Hashable {
        /// Private anonymous memory; faults are resolved with `UFFDIO_COPY`.
        case anonymous
        /// A shared-memory file (memfd, ``sharedFile``) mapped `MAP_SHARED` and registered MISSING + MINOR: a fault is
        /// resolved by writing the page into the file's page cache once, then mapping that page with `UFFDIO_CONTINUE`.
        /// Other mappings of the file (another process, a VM) see the same pages, and a page already in the page cache
        /// is mapped without asking the provider again (a MINOR fault).
        case sharedMemory
    }

    private let mapping: RegionMapping
    /// The userfaultfd that reports this region's faults.
    public let uffd: UserfaultFD
    /// The resolver that serves them.
    public let resolver: FaultResolver
    /// Bytes asked for (the mapping is rounded up to whole pages; the extra bytes read as the provider says).
    public let count: Int
    /// The shared-memory file holding the pages, for ``Backing/sharedMemory`` (map its ``SharedMemoryFile/fileDescriptor``
    /// elsewhere to share them); `nil` for anonymous memory.
    public let sharedFile: SharedMemoryFile?
    /// The dirty-tracking engine the region was set up for (`tracking:`), or `nil`. See ``DirtyTracker/init(region:)``.
    public let trackingEngine: DirtyTrackingEngine?
    private let originalRange: MemoryRange

    /// Maps `length` bytes served by `provider` and starts serving faults.
    ///
    /// The userfaultfd asks for REMOVE, REMAP and UNMAP events (when offered), so the region follows its memory's life:
    /// pages given back with `MADV_DONTNEED` are asked for again on next touch (or are zeros, per
    /// ``FaultResolver/Options/afterRemove``), `mremap(2)` moves it (see ``currentRanges``), `munmap(2)` ends resolution
    /// for that range. With ``FaultResolver/Options/serveForkedChildren`` it also asks for FORK (and throws without it).
    ///
    /// - Parameters:
    ///   - length: the region's size in bytes (positive), rounded up to whole pages.
    ///   - provider: where the pages come from: page 0 of the region is the provider's byte 0.
    ///   - options: the resolver's options (readahead, concurrency, failure policy, cancellation).
    ///   - backing: anonymous memory (default) or a shared-memory file (MINOR faults, ``Backing/sharedMemory``).
    ///   - sharedFile: with ``Backing/sharedMemory``, map this file instead of a new one — typically another region's
    ///     ``sharedFile`` (a second VM restoring the same snapshot): pages already in its page cache are mapped on first
    ///     touch with MINOR faults and `UFFDIO_CONTINUE`, the provider is asked only for the others. At least `length`
    ///     bytes long.
    ///   - tracking: also register for write protection and install pages write-protected, so that a ``DirtyTracker``
    ///     made with ``DirtyTracker/init(region:)`` can report the pages written (with this engine).
    /// - Throws: ``UserfaultError`` when the length is not positive, or the mapping, userfaultfd or registration fails
    ///   (``UserfaultError/Code/unsupportedFeatures(_:)`` when the kernel lacks what the backing or tracking needs).
    public init(
        length: Int, provider: any PageProvider, options: FaultResolver.Options = .init(),
        backing: Backing = .anonymous, tracking: DirtyTrackingEngine? = nil, sharedFile: SharedMemoryFile? = nil
    ) async throws(UserfaultError) {
        let existingFile = sharedFile
        guard length > 0 else {
            throw UserfaultError(.invalidArgument, operation: .register, detail: "a LazyRegion needs a positive length, got \(length)")
        }
        if let existingFile {
            guard backing == .sharedMemory else {
                throw UserfaultError(.invalidArgument, operation: .register, detail: "a shared file needs backing .sharedMemory")
            }
            guard existingFile.length >= length else {
                throw UserfaultError(.invalidArgument, operation: .register,
                                     detail: "the shared file holds \(existingFile.length) bytes, the region needs \(length)")
            }
        }
        var required: UserfaultFeatures = []
        // REMOVE events: a page given back with MADV_DONTNEED faults again, and the resolver must know it is gone
        // (otherwise it takes the fault for one on a present page, wakes the thread, and the thread faults again forever).
        // REMAP and UNMAP: without them a moved mapping loses its registration, and an unmapped one is not forgotten.
        var optional: UserfaultFeatures = [.threadID, .eventRemove, .eventRemap, .eventUnmap]
        var mode: RegistrationMode = [.missing]
        var options = options
        if options.serveForkedChildren { required.insert(.eventFork) }
        if backing == .sharedMemory {
            required.formUnion([.missingShmem, .minorShmem])
            mode.insert(.minor)
        }
        if let tracking {
            required.insert(tracking == .asyncScan ? .wpAsync : .pagefaultFlagWP)
            if backing == .sharedMemory { required.insert(.wpHugetlbfsShmem) } else { required.insert(.wpUnpopulated) }
            optional.formUnion(tracking.features)
            mode.insert(.writeProtect)
            options.installWriteProtected = true
        }
        var file: SharedMemoryFile?
        if backing == .sharedMemory {
            // Not `existingFile ?? SharedMemoryFile(...)`: `??` rethrows untyped, which would lose the error's type.
            if let existingFile { file = existingFile } else { file = try SharedMemoryFile(length: length, name: "LazyRegion") }
        }
        if let file {
            let mappedLength = existingFile == nil ? file.length : try wholePages(length, operation: .register, of: "a LazyRegion")
            mapping = RegionMapping(owning: MemoryRange(
                start: try SharedMemoryFile.mapShared(descriptor: file.fileDescriptor, length: mappedLength), length: mappedLength))
        } else {
            mapping = try RegionMapping.anonymous(length: length, noReserve: true)
        }
        originalRange = mapping.current[0].range
        self.sharedFile = file
        trackingEngine = tracking
        count = length
        do {
            uffd = try UserfaultFD(requiredFeatures: required, optionalFeatures: optional)
        } catch {
            mapping.unmapAll()
            throw error
        }
        do {
            try uffd.register(originalRange, mode: mode)
            resolver = FaultResolver(uffd: uffd, options: options)
            try await resolver.serve(originalRange, provider: provider, providerOffset: 0, pageSize: nil, sharedFile: file)
            await resolver.follow(mapping)
            try resolver.start()
        } catch {
            uffd.close()
            mapping.unmapAll()
            throw error
        }
    }

    /// Runs `body` with a region of `length` bytes served by `provider`, and releases it when `body` returns or throws.
    ///
    /// Cancelling the calling task while threads wait on faults resolves them at once (see
    /// ``FaultResolver/Options/cancellation``), so `body` can finish.
    ///
    /// - Throws: ``UserfaultError`` when setting the region up fails (as
    ///   ``init(length:provider:options:backing:tracking:sharedFile:)``), or whatever `body` throws, unchanged — which is
    ///   why this one throws `any Error`: `body`'s errors are yours, and wrapping them would hide their type.
    public static func with<Result: Sendable>(
        length: Int,
        provider: any PageProvider,
        options: FaultResolver.Options = .init(),
        backing: Backing = .anonymous,
        tracking: DirtyTrackingEngine? = nil,
        sharedFile: SharedMemoryFile? = nil,
        _ body: (LazyRegion) async throws -> Result
    ) async throws -> Result {
        let region = try await LazyRegion(length: length, provider: provider, options: options, backing: backing,
                                          tracking: tracking, sharedFile: sharedFile)
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
        releaseMemory()
    }

    /// Unregisters what is still mapped (so unmapping it raises no UNMAP event that nobody would read: the unmapping
    /// thread would sleep until the userfaultfd is closed), closes the userfaultfd, then unmaps.
    private func releaseMemory() {
        for piece in mapping.current { try? uffd.unregister(piece.range) }
        uffd.close()
        mapping.unmapAll()
    }

    /// Stops serving, resolves whatever is still pending (``FaultResolver/Options/cancellation``), closes the userfaultfd
    /// and unmaps the memory (where it is now, after any `mremap`). No thread may use the region afterwards.
    public func close() async {
        await resolver.cancel()
        releaseMemory()
    }

    /// The first byte: where the region's first page is now. It follows `mremap(2)` of the region once the resolver
    /// has applied the REMAP event (the moving thread is released as soon as the event is read, so for a moment right
    /// after `mremap` returns this can still be the old address: use what `mremap` returned). If the first page was
    /// unmapped, this is the address the region was created at, which is no longer the region's.
    public var baseAddress: UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(bitPattern: mapping.baseAddress ?? originalRange.start)!
    }

    /// ``baseAddress`` as a number, for ranges and page math (the kernel's and ``MemoryRange``'s currency).
    public var address: UInt { UInt(bitPattern: baseAddress) }

    /// The region's address range (whole pages) starting at ``baseAddress``. After a partial move or unmap, see
    /// ``currentRanges``.
    public var range: MemoryRange { MemoryRange(start: UInt(bitPattern: baseAddress), length: originalRange.length) }

    /// Where the region's pages are now: each run as its address range and the offset in the region of its first byte.
    /// One run of the whole region until the application moves (`mremap`) or unmaps (`munmap`) part of it; an
    /// unmapped part is no longer listed (and no longer served).
    public var currentRanges: [(range: MemoryRange, offset: Int)] {
        mapping.current.map { ($0.range, $0.firstPage * systemPageSize) }
    }

    /// Gives `body` the region's `count` bytes to read. Touching a page faults it in.
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: baseAddress, count: count))
    }

    /// Gives `body` the region's `count` bytes to read and write. Touching a page faults it in.
    public func withUnsafeMutableBytes<R>(_ body: (UnsafeMutableRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeMutableRawBufferPointer(start: baseAddress, count: count))
    }

    /// Resolves the bytes in `range` (offsets into the region) ahead of access, without blocking a thread.
    /// - Throws: ``UserfaultError/Code/invalidArgument`` for a range outside `0 ..< count` rounded up to whole pages;
    ///   the provider's ``RegionError`` as ``FaultResolver/prefetch(_:)`` does. Two error types, so the throw is untyped.
    public func prefetch(_ range: Range<Int>) async throws {
        guard range.lowerBound >= 0 && range.upperBound <= originalRange.length else {
            throw UserfaultError(.invalidArgument, operation: .register,
                                 detail: "prefetch of \(range) outside the region's \(originalRange.length) bytes")
        }
        guard !range.isEmpty else { return }
        try await resolver.prefetch(MemoryRange(start: UInt(bitPattern: baseAddress) + UInt(range.lowerBound), length: range.count))
    }

    /// The resolver's counters: faults, pages copied, zero pages, bytes, dedup joins, provider errors, latency.
    public var statistics: FaultResolver.Statistics { resolver.statistics }

    /// Provider failures, as the failure policy resolves them: a new stream on each access, so several observers can
    /// watch at once, and one that stops watching ends only its own stream (see ``FaultResolver/errors``).
    public var errors: AsyncStream<RegionError> { resolver.errors }
}
