import Dispatch
import Glibc
import Synchronization

/// Resolves page faults from ``PageProvider``s: many at once, deduplicated, with readahead, without ever needing a thread
/// of Swift's cooperative pool.
///
/// Give it the ranges to serve with ``serve(_:provider:providerOffset:pageSize:)``, then either let it read the userfaultfd itself
/// (``start()``: the fastest path, used by ``LazyRegion``) or feed it from your own loop:
///
/// ```swift
/// let resolver = FaultResolver(uffd: uffd)
/// try await resolver.serve(range, provider: provider)
/// for try await event in uffd.events {
///     try await resolver.handle(event)
/// }
/// ```
///
/// ## How faults are resolved
/// - A fault on a page that is being fetched joins that fetch: one provider read, one copy.
/// - Sequential faults grow the cluster of pages one read brings in (``ReadaheadPolicy``).
/// - Up to ``Options/maxConcurrentReads`` provider reads are in flight; more wait their turn.
/// - Providers that answer at once (``PageProvider/readImmediately(into:at:)``) are served inside the event handler.
/// - Races are handled: a page already present is woken (`EEXIST`), partial progress is resumed, clusters are split
///   around pages that became present and where the kernel refuses them whole (across two mappings), a fetch for a
///   range removed, unmapped or moved meanwhile is dropped and its threads woken.
/// - Events first: REMOVE, UNMAP, REMAP and FORK in a batch are applied before its faults; a resolution the kernel
///   defers (`EAGAIN` while an event is unread) is retried after the next read, and the reader never waits on a provider.
/// - A provider that throws or times out gets the ``FailurePolicy``; the faulting thread never hangs.
///
/// ## Executors
/// The actor runs on the userfaultfd's event queue (``UserfaultFD/eventExecutor``), and provider reads run with a task
/// executor preference for it (or ``Options/providerExecutor``). Faulting threads can therefore be every thread of the
/// cooperative pool without stopping resolution.
public actor FaultResolver {
    /// How a resolver behaves.
    public struct Options: Sendable {
        /// Provider reads in flight at most.
        public var maxConcurrentReads: Int
        /// How many pages one fault brings in.
        public var readahead: ReadaheadPolicy
        /// What faulting threads get when the provider fails.
        public var failurePolicy: FailurePolicy
        /// A read that takes longer fails with ``ProviderTimeoutError`` (then the failure policy). `nil`: no limit.
        public var providerTimeout: Duration?
        /// What faults get once resolution is cancelled.
        public var cancellation: CancellationResolution
        /// Where provider reads run; `nil` for the userfaultfd's event executor. Must not be the cooperative pool's.
        public var providerExecutor: (any TaskExecutor)?
        /// What pages get when they fault again after a REMOVE event.
        public var afterRemove: RemovedPagePolicy
        /// With ``FaultResolver/start()``: how long the reader keeps polling the userfaultfd after a batch before it
        /// waits on its Dispatch source again. A fault arriving within the window skips the source's wake-ups, about
        /// halving a one-page round trip; the price is up to this much CPU after each batch. The reader stops polling
        /// as soon as anything is queued on its executor (provider completions, retries, timers), and never polls for
        /// more than 1 ms in a row. Default 50 µs (about two thread wake-ups); zero turns polling off.
        public var pollingWindow: Duration
        /// Install pages write-protected (`UFFDIO_COPY_MODE_WP`; zeros by copy too), for memory registered
        /// ``RegistrationMode/missing`` and ``RegistrationMode/writeProtect`` whose writes a ``DirtyTracker`` counts:
        /// a page faulted in is then clean until written.
        public var installWriteProtected: Bool
        /// Serve forked children too (needs ``UserfaultFeatures/eventFork``): on a FORK event the child's userfaultfd gets
        /// a resolver of its own with the same providers and layout, so the child's faults get the same data; the
        /// parent is unaffected. Such children are not offered on ``FaultResolver/forkedChildren``. A child's exit
        /// sends no event; its userfaultfd is probed about once a second
        /// (``UserfaultFD/addressSpaceHasExited(probing:)``) and its resolver let go once the child is gone
        /// (``FaultResolver/Statistics/forkedChildrenExited``).
        public var serveForkedChildren: Bool

        /// Options; every one has a default suited to a local provider.
        public init(
            maxConcurrentReads: Int = 64,
            readahead: ReadaheadPolicy = .default,
            failurePolicy: FailurePolicy = .default,
            providerTimeout: Duration? = .seconds(60),
            cancellation: CancellationResolution = .zeroFill,
            providerExecutor: (any TaskExecutor)? = nil,
            afterRemove: RemovedPagePolicy = .refetch,
            pollingWindow: Duration = .microseconds(50),
            installWriteProtected: Bool = false,
            serveForkedChildren: Bool = false
        ) {
            precondition(maxConcurrentReads > 0, "maxConcurrentReads must be positive")
            self.maxConcurrentReads = maxConcurrentReads
            self.readahead = readahead
            self.failurePolicy = failurePolicy
            self.providerTimeout = providerTimeout
            self.cancellation = cancellation
            self.providerExecutor = providerExecutor
            self.afterRemove = afterRemove
            self.pollingWindow = pollingWindow
            self.installWriteProtected = installWriteProtected
            self.serveForkedChildren = serveForkedChildren
        }
    }

    /// The userfaultfd whose faults this resolver resolves.
    public nonisolated let uffd: UserfaultFD
    /// The options it was made with.
    public nonisolated let options: Options
    nonisolated let executor: QueueExecutor
    nonisolated let counters = Mutex(FaultResolver.Statistics())
    nonisolated let errorBroadcast = ErrorBroadcast<RegionError>(backlogLimit: 256)
    nonisolated let forkChannel = ForkedChildQueue(limit: FaultResolver.forkedChildrenLimit)
    /// Children ``forkedChildren`` keeps at most for a consumer; beyond that the oldest is closed.
    public static let forkedChildrenLimit = 64

    public nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }

    let pageSize: Int
    var segments: [ServedSegment] = []
    var fetches: [Int: Fetch] = [:]
    /// Provider reads in flight, and the fetches waiting for a slot.
    var slots: ReadSlots
    var deferred: [Int] = []
    /// Write-protect faults whose un-protection the kernel deferred (`EAGAIN` while an event was unread).
    var deferredUnprotects: [MemoryRange] = []
    var nextFetchID = 0
    var nextRegionID = 0
    var isCancelled = false
    var deferredRetryScheduled = false
    let pool: AlignedBufferPool
    /// Finished fetches kept for reuse, so that resolving a fault allocates nothing in steady state.
    var spareFetches: [Fetch] = []
    static let spareFetchLimit = 256
    /// Never-written memory to copy zeros from, for memory without a zero page; made on first use.
    var zeroSource: AnonymousMemory?
    /// Who handles write-protect faults instead of the default (lifting the protection): a ``DirtyTracker``.
    /// Behind a lock rather than the actor, so a tracker can install it synchronously from any context.
    nonisolated let writeProtectHandler = Mutex<(@Sendable (PageFault) -> Void)?>(nil)
    /// The mapping of the region that owns the memory (``LazyRegion``), told about REMAP and UNMAP.
    var ownedMapping: RegionMapping?
    /// Resolvers of forked children served under ``Options/serveForkedChildren``, each with a page of its range to
    /// probe for the child's exit; closed with this one, or when their child has exited.
    var childResolvers: [(resolver: FaultResolver, probePage: UInt?)] = []
    /// Whether a check for exited children is scheduled.
    var childExitCheckScheduled = false
    /// How often the userfaultfds of served children are checked for an exited process.
    static let childExitCheckInterval: Duration = .seconds(1)

    /// A resolver for `uffd`'s faults.
    public init(uffd: UserfaultFD, options: Options = Options()) {
        self.uffd = uffd
        self.options = options
        self.executor = uffd.eventExecutor
        self.pageSize = uffd.pageSize
        self.slots = ReadSlots(limit: options.maxConcurrentReads)
        // Buffers hold the largest cluster, and at least one 2 MiB huge page.
        self.pool = AlignedBufferPool(bufferSize: max(options.readahead.maximumPages(pageSize: uffd.pageSize) * uffd.pageSize, 2 << 20))
    }

    /// Serves faults in `range` (page-aligned, already registered with the userfaultfd) from `provider`, page 0 of the range
    /// being byte `providerOffset` of the provider's data.
    ///
    /// - Parameters:
    ///   - range: the page-aligned range, already registered with the userfaultfd.
    ///   - provider: where the range's pages come from.
    ///   - providerOffset: the provider's byte that is the range's first byte.
    ///   - pageSize: the memory's page size, when it is not the base page: 2 MiB for hugetlbfs. Faults are then
    ///     resolved a whole huge page at a time, and zero pages are made by copying zeros.
    public func serve(
        _ range: MemoryRange, provider: any PageProvider, providerOffset: Int = 0, pageSize: Int? = nil
    ) throws(UserfaultError) {
        try serve(range, provider: provider, providerOffset: providerOffset, pageSize: pageSize, sharedFile: nil)
    }

    /// Serves `range` as ``serve(_:provider:providerOffset:pageSize:)`` does; with a `sharedFile`, the range is a
    /// mapping of that file registered ``RegistrationMode/missing`` and ``RegistrationMode/minor``, and pages are installed
    /// by writing them into the file's page cache and mapping them with `UFFDIO_CONTINUE` (page `i` of the range is
    /// page `i` of the file).
    func serve(
        _ range: MemoryRange, provider: any PageProvider, providerOffset: Int, pageSize regionPageSize: Int?,
        sharedFile: SharedMemoryFile?
    ) throws(UserfaultError) {
        let regionPageSize = regionPageSize ?? pageSize
        guard regionPageSize >= pageSize, regionPageSize & (regionPageSize - 1) == 0, regionPageSize <= pool.bufferSize else {
            throw UserfaultError(.invalidArgument, operation: .register, range: range,
                                 detail: "page size \(regionPageSize) must be a power of two from \(pageSize) to \(pool.bufferSize)")
        }
        guard range.length > 0, range.isAligned(to: regionPageSize) else {
            throw UserfaultError(.invalidArgument, operation: .register, range: range,
                                 detail: "start and length must be positive multiples of the page size (\(regionPageSize))")
        }
        if let clash = segments.first(where: { $0.range.overlaps(range) }) {
            throw UserfaultError(.invalidArgument, operation: .register, range: range,
                                 detail: "overlaps a range this resolver already serves (\(clash.range))")
        }
        let region = try ServedRegion(id: nextRegionID, length: range.length, provider: provider,
                                      providerOffset: providerOffset, pageSize: regionPageSize, readahead: options.readahead,
                                      sharedFile: sharedFile, zeroByCopy: options.installWriteProtected)
        nextRegionID += 1
        segments.append(ServedSegment(range: range, region: region, firstPage: 0))
    }

    /// Starts reading the userfaultfd's events itself, on its event queue: the path with the fewest thread hops.
    /// The userfaultfd's ``UserfaultFD/events`` can then not be iterated (and vice versa).
    public nonisolated func start() throws(UserfaultError) {
        try uffd.reader.attach(ResolverSink(resolver: self), pollingWindow: options.pollingWindow)
    }

    /// Handles one event from your own loop over ``UserfaultFD/events``. Returns once the event is applied or the fault's
    /// resolution is under way: it never waits for a provider.
    /// - Throws: ``UserfaultError/Code/closed`` once the userfaultfd is closed.
    public func handle(_ event: FaultEvent) throws(UserfaultError) {
        guard !uffd.isClosed else { throw UserfaultError(.closed, operation: .iterate, detail: "the resolver's userfaultfd is closed") }
        process(CollectionOfOne(.success(event)), readAt: monotonicNanoseconds())
    }

    /// Hands write-protect faults to `handler` instead of lifting the protection (the default), or restores the default
    /// with `nil`.
    ///
    /// The handler runs on the resolver's executor (the userfaultfd's event queue), synchronously, for every
    /// write-protect fault in the batch (after the batch's non-fault events). It must resolve the fault promptly —
    /// record it, un-protect the page, wake the writer — and never wait on anything: the writer is blocked until then.
    /// ``DirtyTracker/init(region:)`` installs one.
    package nonisolated func setWriteProtectFaultHandler(_ handler: (@Sendable (PageFault) -> Void)?) {
        writeProtectHandler.withLock { $0 = handler }
    }

    /// Tells `mapping` about REMAP and UNMAP events as they are applied.
    func follow(_ mapping: RegionMapping) {
        ownedMapping = mapping
    }

    /// The counters so far. Readable from any thread.
    public nonisolated var statistics: FaultResolver.Statistics { counters.withLock { $0 } }

    /// Provider failures, as the failure policy resolves them: a new stream on each access, so several observers can
    /// watch at once.
    ///
    /// Each stream sees every failure from the moment it was made until it ends (the resolver stops, or its iterating
    /// task breaks out or is cancelled; that ends only this stream). Failures raised while no stream is open
    /// are kept (the newest 256) for the next stream made. A stream that lags behind keeps its newest 256.
    public nonisolated var errors: AsyncStream<RegionError> { errorBroadcast.subscribe() }

    /// The userfaultfds of forked children (with ``UserfaultFeatures/eventFork``). Their faults are not served by this
    /// resolver; serve or close each one.
    ///
    /// Each fork installs a descriptor in this process, so while nobody iterates at most ``forkedChildrenLimit``
    /// children are kept: beyond that the oldest is closed (its child's faults then fall back to ordinary memory) and
    /// counted in ``FaultResolver/Statistics/forkedChildrenDropped``. Those still kept when the resolver's reader stops (its
    /// userfaultfd closed) are closed, and the stream ends. Each child goes to one iterator.
    public nonisolated var forkedChildren: AsyncStream<UserfaultFD> { forkChannel.stream }

    /// Stops calling providers: faults pending now and later are resolved at once with ``Options/cancellation``,
    /// provider reads in flight are cancelled, and prefetches waiting on them throw `CancellationError`.
    public func cancel() {
        guard !isCancelled else { return }
        isCancelled = true
        slots.removeAllWaiting()
        let fill = PageFill(options.cancellation)
        for id in Array(fetches.keys).sorted() {
            guard let fetch = fetches[id] else { continue }
            perform(fetch.machine.abandon(.cancelled(fill)), for: fetch)
        }
    }

    /// Resolves `range` ahead of access, without blocking a thread. Returns when every page in it is present (or throws
    /// the provider's ``RegionError`` once the failure policy gave up on a page). A range with a negative length, or
    /// whose pages run past the end of the address space, throws ``UserfaultError/Code/invalidArgument``. (Two error
    /// types, a caller's mistake and the provider's failure, so the throw is untyped.)
    public func prefetch(_ range: MemoryRange) async throws {
        let wanted = range.expandedToPages(of: pageSize)
        guard range.isWithinAddressSpace, wanted.isAligned(to: pageSize), wanted.contains(range) else {
            throw UserfaultError(.invalidArgument, operation: .register, range: nil,
                                 detail: "prefetch range from 0x\(String(range.start, radix: 16)), \(range.length) bytes, runs past the end of the address space")
        }
        // Fetches are recycled when they finish: remember each one's id to know it is still the same fetch.
        var awaited: [(id: Int, fetch: Fetch)] = []
        for segment in segments {
            guard let part = segment.slice(wanted) else { continue }
            let region = segment.region
            var page = part.firstPage
            let end = part.pages.upperBound
            while page < end {
                if isPresent(page, of: region, at: MemoryRange(start: segment.address(of: page), length: region.pageSize),
                             checkingResidence: false) {
                    page += 1
                    continue
                }
                if region.removed[page], !region.inFlight[page] {
                    let fetch = zeroFetch(from: page, of: segment, before: end)
                    awaited.append((fetch.id, fetch))
                    page = fetch.pages.upperBound
                    start(fetch, filling: .zeros)
                    continue
                }
                if region.inFlight[page] {
                    if let fetch = fetch(covering: page, of: region), !awaited.contains(where: { $0.fetch === fetch }) {
                        awaited.append((fetch.id, fetch))
                    }
                    page += 1
                    continue
                }
                var upper = page + 1
                let cap = pool.bufferSize / region.pageSize
                while upper < end && upper - page < cap && region.isFree(upper) { upper += 1 }
                if isCancelled { throw CancellationError() }
                let fetch = makeFetch(region: region, segment: segment, pages: page..<upper)
                awaited.append((fetch.id, fetch))
                start(fetch)
                page = upper
            }
        }
        for (id, fetch) in awaited where fetches[id] === fetch {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                fetch.completions.append(continuation)
            }
        }
    }
}

/// Feeds a resolver from its userfaultfd's event reader, on the event queue (the resolver's own executor).
private final class ResolverSink: FaultEventSink {
    let resolver: FaultResolver

    init(resolver: FaultResolver) {
        self.resolver = resolver
    }

    func receive(_ batch: inout [Result<FaultEvent, UserfaultError>]) {
        // The reader runs on the event queue, which is the resolver's serial executor: check that for real, then call
        // the isolated method directly. (`assumeIsolated` would do the same, but allocates its closure context on
        // every call, that is on every fault.)
        resolver.executor.checkIsolated()
        Self.processOnExecutor(resolver, batch, monotonicNanoseconds())
    }

    /// `FaultResolver.process` as a plain function, for callers already on the resolver's executor; built once,
    /// capturing nothing. The cast is the one `assumeIsolated` performs.
    private static let processOnExecutor: @Sendable (FaultResolver, [Result<FaultEvent, UserfaultError>], UInt64) -> Void = {
        let isolated: @Sendable (isolated FaultResolver, [Result<FaultEvent, UserfaultError>], UInt64) -> Void = {
            resolver, batch, readAt in resolver.process(batch, readAt: readAt)
        }
        return unsafeBitCast(isolated, to: (@Sendable (FaultResolver, [Result<FaultEvent, UserfaultError>], UInt64) -> Void).self)
    }()

    func finish(_ error: UserfaultError?) {
        resolver.assumeIsolated { $0.readerFinished(error) }
    }
}

