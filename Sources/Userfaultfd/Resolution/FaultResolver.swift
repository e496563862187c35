import Dispatch
import Glibc
import Synchronization

/// Resolves page faults from ``PageProvider``s: many at once, deduplicated, with readahead, without ever needing a thread
/// of Swift's cooperative pool.
///
/// Give it the ranges to serve with ``serve(_:provider:providerOffset:)``, then either let it read the userfaultfd itself
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
        /// (``ResolverStatistics/forkedChildrenExited``).
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
    nonisolated let counters = Mutex(ResolverStatistics())
    private nonisolated let errorChannel = AsyncStream<RegionError>.makeStream(bufferingPolicy: .bufferingNewest(256))
    private nonisolated let forkChannel = ForkedChildQueue(limit: FaultResolver.forkedChildrenLimit)
    /// Children ``forkedChildren`` keeps at most for a consumer; beyond that the oldest is closed.
    public static let forkedChildrenLimit = 64

    public nonisolated var unownedExecutor: UnownedSerialExecutor { executor.asUnownedSerialExecutor() }

    let pageSize: Int
    var segments: [ServedSegment] = []
    var fetches: [Int: Fetch] = [:]
    var waitingForSlot: [Int] = []
    var deferred: [Int] = []
    /// Write-protect faults whose un-protection the kernel deferred (`EAGAIN` while an event was unread).
    var deferredUnprotects: [MemoryRange] = []
    var activeReads = 0
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
    var writeProtectHandler: (@Sendable (PageFault) -> Void)?
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
        // Buffers hold the largest cluster, and at least one 2 MiB huge page.
        self.pool = AlignedBufferPool(bufferSize: max(options.readahead.maximumPages(pageSize: uffd.pageSize) * uffd.pageSize, 2 << 20))
    }

    /// Serves faults in `range` (page-aligned, already registered with the userfaultfd) from `provider`, page 0 of the range
    /// being byte `providerOffset` of the provider's data.
    ///
    /// - Parameter pageSize: the memory's page size, when it is not the base page: 2 MiB for hugetlbfs. Faults are then
    ///   resolved a whole huge page at a time, and zero pages are made by copying zeros.
    public func serve(
        _ range: MemoryRange, provider: any PageProvider, providerOffset: Int = 0, pageSize regionPageSize: Int? = nil
    ) throws(UserfaultError) {
        try serve(range, provider: provider, providerOffset: providerOffset, pageSize: regionPageSize, sharedFile: nil)
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
    package func setWriteProtectFaultHandler(_ handler: (@Sendable (PageFault) -> Void)?) {
        writeProtectHandler = handler
    }

    /// Tells `mapping` about REMAP and UNMAP events as they are applied.
    func follow(_ mapping: RegionMapping) {
        ownedMapping = mapping
    }

    /// The counters so far. Readable from any thread.
    public nonisolated var statistics: ResolverStatistics { counters.withLock { $0 } }

    /// Provider failures, as the failure policy resolves them (the newest 256 are kept if nobody listens).
    public nonisolated var errors: AsyncStream<RegionError> { errorChannel.stream }

    /// The userfaultfds of forked children (with ``UserfaultFeatures/eventFork``). Their faults are not served by this
    /// resolver; serve or close each one.
    ///
    /// Each fork installs a descriptor in this process, so while nobody iterates at most ``forkedChildrenLimit``
    /// children are kept: beyond that the oldest is closed (its child's faults then fall back to ordinary memory) and
    /// counted in ``ResolverStatistics/forkedChildrenDropped``. Those still kept when the resolver's reader stops (its
    /// userfaultfd closed) are closed, and the stream ends. Each child goes to one iterator.
    public nonisolated var forkedChildren: AsyncStream<UserfaultFD> { forkChannel.stream }

    /// Stops calling providers: faults pending now and later are resolved at once with ``Options/cancellation``,
    /// provider reads in flight are cancelled, and prefetches waiting on them throw `CancellationError`.
    public func cancel() {
        guard !isCancelled else { return }
        isCancelled = true
        waitingForSlot.removeAll()
        for id in Array(fetches.keys).sorted() {
            guard let fetch = fetches[id] else { continue }
            abandon(fetch, releasing: WaiterRelease(options.cancellation), error: CancellationError())
        }
    }

    /// Resolves `range` ahead of access, without blocking a thread. Returns when every page in it is present (or throws
    /// the provider's ``RegionError`` once the failure policy gave up on a page). A range with a negative length, or
    /// whose pages run past the end of the address space, throws ``UserfaultError/Code/invalidArgument``.
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
                if region.present[page] { page += 1; continue }
                if region.removed[page], !region.inFlight[page] {
                    let fetch = zeroFetch(from: page, of: segment, before: end)
                    awaited.append((fetch.id, fetch))
                    install(fetch)
                    page = fetch.pages.upperBound
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

    // MARK: - Events

    /// Applies a batch: non-fault events first, then faults, then deferred resolutions.
    func process<Batch: Collection<Result<FaultEvent, UserfaultError>>>(_ batch: Batch, readAt: UInt64) {
        for item in batch {
            switch item {
            case .success(.pageFault): continue
            case .success(let event): apply(event)
            case .failure(let error): report(decodeError: error)
            }
        }
        for item in batch {
            if case .success(.pageFault(let fault)) = item { resolve(fault, readAt: readAt) }
        }
        if !deferred.isEmpty || !deferredUnprotects.isEmpty { retryDeferred() }
    }

    private func apply(_ event: FaultEvent) {
        counters.withLock { $0.events += 1 }
        switch event {
        case .pageFault:
            break
        case .remove(let range):
            // The pages are gone: forget them, and don't install data fetched for them before the removal.
            let zeroFill = options.afterRemove == .zeroFill
            forEachPart(of: range) { segment in
                segment.region.present.set(segment.pages, to: false)
                if zeroFill { segment.region.removed.set(segment.pages, to: true) }
                invalidateFetches(in: segment)
            }
        case .unmap(let range):
            forEachPart(of: range) { invalidateFetches(in: $0) }
            segments = segments.flatMap { $0.removing(range) }
            ownedMapping?.unmapped(range)
        case .remap(let from, let to, let length):
            let moved = MemoryRange(start: from, length: length)
            forEachPart(of: moved) { invalidateFetches(in: $0) }
            var result: [ServedSegment] = []
            for segment in segments {
                result.append(contentsOf: segment.removing(moved))
                if var part = segment.slice(moved) {
                    part.range.start = part.range.start - from + to
                    result.append(part)
                }
            }
            segments = result
            ownedMapping?.moved(from: from, to: to, length: length)
        case .fork(let child):
            if options.serveForkedChildren {
                serveChild(child)
            } else {
                let dropped = forkChannel.offer(child)
                if dropped > 0 { counters.withLock { $0.forkedChildrenDropped += dropped } }
            }
        }
    }

    private func forEachPart(of range: MemoryRange, _ body: (ServedSegment) -> Void) {
        for segment in segments {
            if let part = segment.slice(range) { body(part) }
        }
    }

    // MARK: - Faults

    private func resolve(_ fault: PageFault, readAt: UInt64) {
        counters.withLock { $0.faults += 1 }
        let page = MemoryRange(start: fault.pageAddress, length: pageSize)
        switch fault.kind {
        case .missing:
            break
        case .writeProtect:
            if let writeProtectHandler {
                writeProtectHandler(fault)
                return
            }
            // Not a page this resolver fills: lift the protection so the writer never hangs.
            unprotect(page)
            return
        case .minor:
            counters.withLock { $0.minorFaults += 1 }
            mapFromPageCache(fault, page: page)
            counters.withLock { $0.latency.record(nanoseconds: monotonicNanoseconds() &- readAt) }
            return
        }
        guard let segment = segments.first(where: { $0.range.contains(fault.address) }) else {
            counters.withLock { $0.unservedFaults += 1 }
            // Nobody serves it: a zero page, so that its thread does not hang.
            release(page, of: nil, with: .zeros)
            return
        }
        let region = segment.region
        let index = segment.page(at: fault.address)
        let regionPage = MemoryRange(start: segment.address(of: index), length: region.pageSize)
        if region.inFlight[index] {
            if let fetch = fetch(covering: index, of: region) {
                fetch.waiters.append(FaultWaiter(page: index, readAt: readAt))
                counters.withLock { $0.deduplicatedFaults += 1 }
                return
            }
        }
        if region.present[index] {
            // Only this process's own memory can be asked: for another's (a received userfaultfd, a forked child),
            // `mincore` here tells about whatever this process has at that address. There the page is resolved again;
            // if it is present after all (a duplicate message), the install meets EEXIST and wakes its thread.
            if uffd.servesOwnAddressSpace, pageIsResident(regionPage) {
                // A duplicate message from a thread the install already woke (or that re-faulted after a signal).
                try? uffd.wake(regionPage)
                counters.withLock {
                    $0.alreadyPresentFaults += 1
                    $0.latency.record(nanoseconds: monotonicNanoseconds() &- readAt)
                }
                return
            }
            // Installed after a REMOVE was read but before madvise zapped the range (see `pageIsResident`): the record
            // is stale. Waking would only make the thread fault again, forever; resolve it like any missing page.
            region.present[index] = false
        }
        if isCancelled {
            if release(regionPage, of: region, with: WaiterRelease(options.cancellation)) { region.present[index] = true }
            return
        }
        if region.removed[index] {
            let fetch = zeroFetch(from: index, of: segment, before: segment.pages.upperBound)
            fetch.waiters.append(FaultWaiter(page: index, readAt: readAt))
            install(fetch)
            return
        }
        let limit: Range<Int>
        if index < region.dataPages {
            limit = segment.pages.lowerBound..<min(segment.pages.upperBound, region.dataPages)
        } else {
            limit = max(segment.pages.lowerBound, region.dataPages)..<segment.pages.upperBound
        }
        let maximumPages = pool.bufferSize / region.pageSize
        let cluster = region.cluster(for: index, within: limit, readahead: options.readahead, maximumPages: maximumPages)
        let fetch = makeFetch(region: region, segment: segment, pages: cluster.pages)
        fetch.waiters.append(FaultWaiter(page: index, readAt: readAt))
        start(fetch)
        // Asynchronous readahead: once a stream is established (sequential faults grew its window to the maximum),
        // also bring in the next window while the application reads this one, like the kernel's async readahead, so
        // reading and resolving overlap. Short or random access never reads ahead of its faults.
        if options.readahead.readsAhead,
           let ahead = region.windowAhead(of: cluster, within: limit,
                                          maximumWindow: options.readahead.maximumPages(pageSize: region.pageSize),
                                          maximumPages: maximumPages) {
            let fetch = makeFetch(region: region, segment: segment, pages: ahead)
            fetch.isReadahead = true
            start(fetch)
        }
    }

    /// A MINOR fault: the page is in the shared file's page cache already (filled through another mapping of the file),
    /// only not mapped here. Maps it with `UFFDIO_CONTINUE`, no provider read — together with the pages after it that
    /// readahead would bring in, so a sequential reader takes one fault per window, not per page. CONTINUE stops at the
    /// first page that is not in the page cache (it faults later as MISSING and goes to the provider).
    private func mapFromPageCache(_ fault: PageFault, page: MemoryRange) {
        if let segment = segments.first(where: { $0.range.contains(fault.address) }), segment.region.sharedFile != nil {
            let region = segment.region
            let index = segment.page(at: fault.address)
            if region.isFree(index) {
                let cluster = region.cluster(for: index, within: segment.pages, readahead: options.readahead,
                                             maximumPages: pool.bufferSize / region.pageSize)
                let pages = index..<max(index + 1, cluster.pages.upperBound)
                let range = MemoryRange(start: segment.address(of: index), length: pages.count * region.pageSize)
                do throws(UserfaultError) {
                    try uffd.continue(range)
                    region.present.set(pages, to: true)
                    return
                } catch {
                    if case .tryAgain(let done) = error.code, done >= region.pageSize {
                        // Mapped up to a page that is not in the page cache (or an event came first): the faulting
                        // page is mapped and its thread woken.
                        region.present.set(index..<index + done / region.pageSize, to: true)
                        return
                    }
                }
            }
        }
        do {
            try uffd.continue(page)
        } catch {
            try? uffd.wake(page)
        }
    }

    /// A fetch of zero pages for pages removed under ``RemovedPagePolicy/zeroFill``: from `page` over the removed free
    /// pages after it (up to `end` and one buffer's worth), never the provider.
    private func zeroFetch(from page: Int, of segment: ServedSegment, before end: Int) -> Fetch {
        let region = segment.region
        var upper = page + 1
        let end = min(end, page + pool.bufferSize / region.pageSize)
        while upper < end && region.isRemovedAndFree(upper) { upper += 1 }
        let fetch = makeFetch(region: region, segment: segment, pages: page..<upper)
        fetch.installation = .zeroPage
        return fetch
    }

    /// Serves a forked child's userfaultfd with a resolver of its own: the same providers, at the same addresses (the
    /// child's address space is a copy of this one), with fresh page state (pages present here were copied into the
    /// child by fork; the rest fault into the child's userfaultfd).
    private func serveChild(_ child: UserfaultFD) {
        let resolver = FaultResolver(uffd: child, options: options)
        let layout = segments.filter { $0.region.sharedFile == nil }.map {
            ($0.range, $0.region.provider, $0.region.providerOffset + $0.firstPage * $0.region.pageSize, $0.region.pageSize)
        }
        childResolvers.append((resolver, layout.first?.0.start))
        counters.withLock { $0.forkedChildrenServed += 1 }
        if !layout.isEmpty { scheduleChildExitCheck() }
        Task(executorPreference: child.eventExecutor) {
            do {
                for (range, provider, offset, pageSize) in layout {
                    try await resolver.serve(range, provider: provider, providerOffset: offset, pageSize: pageSize)
                }
                try resolver.start()
            } catch {
                // The child cannot be served: closing its userfaultfd lets its faults fall back to ordinary memory.
                child.close()
            }
        }
    }

    /// A child's process exits without any event on its userfaultfd, which would keep its resolver (reader, queue,
    /// page bitmaps) for the life of this one: a long-lived server forking many children would leak them. So, while
    /// children are served, each is probed about once a second, and let go once its address space is gone.
    private func scheduleChildExitCheck() {
        guard !childExitCheckScheduled else { return }
        childExitCheckScheduled = true
        executor.asyncAfter(Self.childExitCheckInterval) { [weak self] in
            self?.assumeIsolated { $0.releaseExitedChildren() }
        }
    }

    private func releaseExitedChildren() {
        childExitCheckScheduled = false
        var exited = 0
        childResolvers.removeAll { child in
            guard let page = child.probePage, child.resolver.uffd.addressSpaceHasExited(probing: page) else { return false }
            child.resolver.uffd.close()
            exited += 1
            return true
        }
        if exited > 0 { counters.withLock { $0.forkedChildrenExited += exited } }
        // A child with nothing served has no page to probe: it is let go with this resolver, not checked forever.
        if childResolvers.contains(where: { $0.probePage != nil }) { scheduleChildExitCheck() }
    }

    private func report(decodeError error: UserfaultError) {
        errorChannel.continuation.yield(RegionError(
            range: error.range ?? MemoryRange(start: 0, length: 0), providerOffset: 0, underlying: error, attempts: 0,
            resolution: .zeroFill))
    }

    func reportFailure(_ error: RegionError) {
        errorChannel.continuation.yield(error)
    }

    /// The reader stopped: the userfaultfd was closed (or failed). Nothing can be resolved any more.
    func readerFinished(_ error: UserfaultError?) {
        if let error { report(decodeError: error) }
        cancel()
        for child in childResolvers { child.resolver.uffd.close() }
        childResolvers.removeAll()
        errorChannel.continuation.finish()
        forkChannel.finish()
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

