import Dispatch

/// A thread waiting on a page of a fetch, and when its fault was read.
struct FaultWaiter {
    let page: Int
    let readAt: UInt64
}

/// One provider read for a cluster of pages, and its installation into the region.
final class Fetch {
    enum Installation {
        case copy, zeroPage, poison
    }

    private(set) var id: Int
    private(set) var region: ServedRegion
    private(set) var pages: Range<Int>
    /// Where `pages.lowerBound` lives; fixed at creation (a REMAP abandons the fetch).
    private(set) var address: UInt
    var waiters: [FaultWaiter] = []
    var completions: [CheckedContinuation<Void, any Error>] = []
    var task: Task<Void, Never>?
    var buffer: PooledBuffer?
    /// Provider attempts so far.
    var attempts = 0
    /// Bumped when an attempt is abandoned (timeout, cancel), so its late result is ignored.
    var generation = 0
    /// A provider read is running for this fetch (it holds a read slot).
    var reading = false
    /// Started by asynchronous readahead, ahead of any fault.
    var isReadahead = false
    /// Bytes installed so far, and how (for a resolution the kernel deferred).
    var installed = 0
    var installation = Installation.copy
    /// Why a page of the fetch could not be installed even on its own (it then gets the failure policy).
    var installFailure: UserfaultError?

    init(id: Int, region: ServedRegion, pages: Range<Int>, address: UInt) {
        self.id = id
        self.region = region
        self.pages = pages
        self.address = address
    }

    /// Makes a finished fetch new again for another cluster, keeping its arrays' storage (no allocation).
    func reuse(id: Int, region: ServedRegion, pages: Range<Int>, address: UInt) {
        self.id = id
        self.region = region
        self.pages = pages
        self.address = address
        waiters.removeAll(keepingCapacity: true)
        completions.removeAll(keepingCapacity: true)
        task = nil
        buffer = nil
        attempts = 0
        generation = 0
        reading = false
        isReadahead = false
        installed = 0
        installation = .copy
        installFailure = nil
    }

    var length: Int { pages.count * region.pageSize }
    var range: MemoryRange { MemoryRange(start: address, length: length) }
    var providerOffset: Int { region.providerOffset + pages.lowerBound * region.pageSize }

    /// The address range of one of the fetch's pages.
    func range(ofPage page: Int) -> MemoryRange {
        MemoryRange(start: address + UInt((page - pages.lowerBound) * region.pageSize), length: region.pageSize)
    }
}

extension FaultResolver {
    func makeFetch(region: ServedRegion, segment: ServedSegment, pages: Range<Int>) -> Fetch {
        // Finished fetches are recycled (ids are never reused, so a late callback for an old id finds nothing).
        let address = segment.address(of: pages.lowerBound)
        let fetch: Fetch
        if let spare = spareFetches.popLast() {
            spare.reuse(id: nextFetchID, region: region, pages: pages, address: address)
            fetch = spare
        } else {
            fetch = Fetch(id: nextFetchID, region: region, pages: pages, address: address)
        }
        nextFetchID += 1
        region.inFlight.set(pages, to: true)
        fetches[fetch.id] = fetch
        return fetch
    }

    func fetch(covering page: Int, of region: ServedRegion) -> Fetch? {
        fetches.values.first { $0.region === region && $0.pages.contains(page) }
    }

    /// Starts a fetch: pages past the data are zero pages; a provider that answers at once is served here and now;
    /// otherwise an asynchronous read is launched (or queued for a slot).
    func start(_ fetch: Fetch) {
        let dataLength = fetch.region.dataLength(of: fetch.pages)
        if dataLength == 0 {
            fetch.installation = .zeroPage
            install(fetch)
            return
        }
        counters.withLock { counters in
            counters.providerReads += 1
            if fetch.isReadahead { counters.readaheadReads += 1 }
        }
        guard let buffer = takeBuffer(for: fetch) else { return }
        do {
            if let content = try fetch.region.provider.readImmediately(
                into: buffer.pageBuffer.prefix(dataLength), at: fetch.providerOffset) {
                fetch.attempts = 1
                readFinished(fetch, content: content)
                return
            }
        } catch {
            fetch.attempts = 1
            readFailed(fetch, error: error)
            return
        }
        if activeReads >= options.maxConcurrentReads {
            waitingForSlot.append(fetch.id)
        } else {
            launch(fetch)
        }
    }

    private func takeBuffer(for fetch: Fetch) -> PooledBuffer? {
        if let buffer = fetch.buffer { return buffer }
        do {
            let buffer = try pool.take()
            fetch.buffer = buffer
            return buffer
        } catch {
            readFailed(fetch, error: error)
            return nil
        }
    }

    /// Runs the provider's asynchronous read on the provider executor.
    private func launch(_ fetch: Fetch) {
        guard let buffer = takeBuffer(for: fetch) else { return }
        activeReads += 1
        fetch.reading = true
        fetch.attempts += 1
        let generation = fetch.generation
        let id = fetch.id
        let provider = fetch.region.provider
        let target = buffer.pageBuffer.prefix(fetch.region.dataLength(of: fetch.pages))
        let offset = fetch.providerOffset
        let taskExecutor: any TaskExecutor = options.providerExecutor ?? executor
        fetch.task = Task(executorPreference: taskExecutor) { [weak self] in
            let result: Result<PageContent, any Error>
            do {
                result = .success(try await provider.read(into: target, at: offset))
            } catch {
                result = .failure(error)
            }
            await self?.readReturned(id: id, generation: generation, buffer: buffer, result: result)
        }
        if let timeout = options.providerTimeout {
            // The attempt number identifies this read: an earlier attempt that failed (without bumping the generation)
            // must not time out a retry with its stale timer.
            let attempt = fetch.attempts
            executor.asyncAfter(timeout) { [weak self] in
                self?.assumeIsolated { $0.readTimedOut(id: id, generation: generation, attempt: attempt, timeout: timeout) }
            }
        }
    }

    private func readReturned(id: Int, generation: Int, buffer: PooledBuffer, result: Result<PageContent, any Error>) {
        guard let fetch = fetches[id], fetch.generation == generation else {
            // An abandoned attempt (timed out or cancelled): its buffer is free again only now.
            pool.give(buffer)
            return
        }
        fetch.reading = false
        activeReads -= 1
        launchWaiting()
        switch result {
        case .success(let content): readFinished(fetch, content: content)
        case .failure(let error): readFailed(fetch, error: error)
        }
    }

    private func readTimedOut(id: Int, generation: Int, attempt: Int, timeout: Duration) {
        guard let fetch = fetches[id], fetch.generation == generation, fetch.attempts == attempt, fetch.reading else { return }
        abandonRead(of: fetch)
        readFailed(fetch, error: ProviderTimeoutError(timeout: timeout))
    }

    /// Abandons the provider read in flight for `fetch`, if any: its late result is ignored (the buffer it fills stays
    /// with it and is given back when it returns), it is cancelled, and its slot goes to a waiting fetch.
    private func abandonRead(of fetch: Fetch) {
        fetch.generation += 1
        fetch.task?.cancel()
        guard fetch.reading else { return }
        fetch.reading = false
        fetch.buffer = nil
        activeReads -= 1
        launchWaiting()
    }

    /// Ends a fetch whose data must not be installed (its pages were removed, unmapped or moved; resolution was
    /// cancelled), at once rather than when its read returns: its read is abandoned, its pages are free to be fetched
    /// again (a fault at their new address after a REMAP gets a fetch of its own instead of joining one whose wake
    /// would go to the old address), and the threads waiting on it are released — resolved with `release`, or without
    /// it woken at the address they faulted at, to fault again and get a fresh resolution. Prefetches waiting on it
    /// get `error` (nil: they return).
    func abandon(_ fetch: Fetch, releasing release: WaiterRelease?, error: (any Error)?) {
        abandonRead(of: fetch)
        if let release {
            releaseWaiters(of: fetch, with: release)
        } else {
            wakeWaiters(of: fetch)
        }
        finishFetch(fetch, error: error)
    }

    private func launchWaiting() {
        while activeReads < options.maxConcurrentReads, !waitingForSlot.isEmpty {
            let id = waitingForSlot.removeFirst()
            if let fetch = fetches[id] { launch(fetch) }
        }
    }

    private func readFinished(_ fetch: Fetch, content: PageContent) {
        switch content {
        case .zeros:
            fetch.installation = .zeroPage
        case .bytes(let count):
            fetch.installation = .copy
            let filled = max(0, min(count, fetch.length))
            if filled < fetch.length, let buffer = fetch.buffer {
                buffer.pageBuffer.fill(0, in: filled..<fetch.length)
            }
        }
        install(fetch)
    }

    private func readFailed(_ fetch: Fetch, error: any Error) {
        counters.withLock { $0.providerErrors += 1 }
        let permanent = (error as? any ProviderFailure)?.isPermanent ?? false
        if !isCancelled, !permanent, let delay = options.failurePolicy.backoff(beforeRetry: fetch.attempts) {
            let id = fetch.id, generation = fetch.generation
            executor.asyncAfter(delay) { [weak self] in
                self?.assumeIsolated { resolver in
                    guard let fetch = resolver.fetches[id], fetch.generation == generation else { return }
                    if resolver.activeReads >= resolver.options.maxConcurrentReads {
                        resolver.waitingForSlot.append(id)
                    } else {
                        resolver.launch(fetch)
                    }
                }
            }
            return
        }
        giveUp(fetch, error: error)
    }

    /// Installs a fetch's pages (copy, zero page or poison), splitting around pages already present and resuming after
    /// partial progress. When the kernel defers (`EAGAIN` with nothing done: an event is unread), the fetch waits in
    /// `deferred` and is retried after the next batch of events.
    ///
    /// The kernel refuses a range as a whole when it crosses the end of a mapping (`ENOENT`: part of the registered range
    /// was `mprotect`ed, `mlock`ed or `madvise`d into a VMA of its own), or when it cannot allocate (`ENOMEM`, a cgroup
    /// limit): the range is then halved until a part goes in (and grows back after each success), down to single pages.
    /// A page that cannot be installed even alone gets the failure policy once the rest is in, so that no waiting
    /// thread is left asleep (`giveUp`).
    func install(_ fetch: Fetch) {
        let total = fetch.length
        let pageSize = fetch.region.pageSize
        var chunk = total - fetch.installed
        while fetch.installed < total {
            let offset = fetch.installed
            let length = min(chunk, total - offset)
            do throws(UserfaultError) {
                try installPart(of: fetch, offset: offset, length: length)
                markInstalled(fetch, bytes: length)
                chunk = 2 * length
            } catch {
                switch error.code {
                case .tryAgain(let done) where done > 0:
                    markInstalled(fetch, bytes: done)
                case .pageExists:
                    // Someone else resolved this page: count it present, wake whoever waits on it, go on after it.
                    try? uffd.wake(MemoryRange(start: fetch.address + UInt(offset), length: pageSize))
                    fetch.region.present[fetch.pages.lowerBound + offset / pageSize] = true
                    fetch.installed += pageSize
                case .tryAgain:
                    if !deferred.contains(fetch.id) { deferred.append(fetch.id) }
                    counters.withLock { $0.deferredRetries += 1 }
                    scheduleDeferredRetry()
                    return
                case .closed, .processExited:
                    // Nobody is left waiting: closing woke every thread, and an exited address space has none.
                    finishFetch(fetch, error: nil)
                    return
                default:
                    if length > pageSize {
                        chunk = length / pageSize / 2 * pageSize
                    } else {
                        // This page alone is refused too: leave it for the failure policy, go on after it.
                        fetch.installFailure = error
                        fetch.installed += pageSize
                    }
                }
            }
        }
        if let failure = fetch.installFailure {
            giveUp(fetch, error: failure)
            return
        }
        let now = monotonicNanoseconds()
        counters.withLock { counters in
            for waiter in fetch.waiters { counters.latency.record(nanoseconds: now &- waiter.readAt) }
        }
        finishFetch(fetch, error: nil)
    }

    /// Installs `length` bytes of a fetch from `offset` on, the way its installation says.
    private func installPart(of fetch: Fetch, offset: Int, length: Int) throws(UserfaultError) {
        let range = MemoryRange(start: fetch.address + UInt(offset), length: length)
        switch fetch.installation {
        case .copy:
            if let file = fetch.region.sharedFile {
                try installShared(file, from: fetch.buffer!.pointer + offset, fetch: fetch, range: range)
            } else {
                try uffd.copy(from: fetch.buffer!.pointer + offset, to: range.start, length: length,
                              mode: options.installWriteProtected ? .writeProtect : [])
            }
        case .zeroPage:
            if let file = fetch.region.sharedFile {
                try installShared(file, from: nil, fetch: fetch, range: range)
            } else {
                try fillWithZeros(range, of: fetch.region)
            }
        case .poison:
            try uffd.poison(range)
        }
    }

    /// Gives up on a fetch: reports `error` with the failure policy's final resolution, resolves the pages threads wait
    /// on with it (zeros or poison; a page that cannot take that either is woken, its thread faults again), and ends
    /// the fetch, handing prefetches waiting on it the ``RegionError``. Pages nobody waits on stay missing and are
    /// asked for again when touched.
    private func giveUp(_ fetch: Fetch, error: any Error) {
        let terminal = options.failurePolicy.terminal
        let failure = RegionError(range: fetch.range, providerOffset: fetch.providerOffset, underlying: error,
                                  attempts: fetch.attempts, resolution: terminal)
        reportFailure(failure)
        releaseWaiters(of: fetch, with: WaiterRelease(terminal))
        finishFetch(fetch, error: failure)
    }

    private func markInstalled(_ fetch: Fetch, bytes: Int) {
        let pageSize = fetch.region.pageSize
        let firstPage = fetch.pages.lowerBound + fetch.installed / pageSize
        let pages = bytes / pageSize
        fetch.region.present.set(firstPage..<firstPage + pages, to: true)
        fetch.installed += bytes
        counters.withLock { counters in
            switch fetch.installation {
            case .copy:
                counters.pagesCopied += pages
                counters.bytesCopied += bytes
            case .zeroPage:
                counters.zeroPages += pages
            case .poison:
                counters.pagesPoisoned += pages
            }
        }
    }

    /// Lifts the write protection of `page` for a write-protect fault, waking the writer. `EAGAIN` (a non-fault event
    /// is unread) wakes nobody, so the page waits in `deferredUnprotects` and is retried like a deferred fetch; any other
    /// error means the range is gone (unmapped, closed) and there is nobody to wake.
    func unprotect(_ page: MemoryRange) {
        do throws(UserfaultError) {
            try uffd.writeProtect(page, enabled: false)
        } catch {
            guard case .tryAgain = error.code else { return }
            deferredUnprotects.append(page)
            counters.withLock { $0.deferredRetries += 1 }
            scheduleDeferredRetry()
        }
    }

    func retryDeferred() {
        let pages = deferredUnprotects
        deferredUnprotects.removeAll()
        for page in pages { unprotect(page) }
        let ids = deferred
        deferred.removeAll()
        for id in ids {
            if let fetch = fetches[id] { install(fetch) }
        }
    }

    /// Retries deferred resolutions shortly even if no further event arrives (EAGAIN can also come from a transient
    /// change of the address space).
    private func scheduleDeferredRetry() {
        guard !deferredRetryScheduled else { return }
        deferredRetryScheduled = true
        executor.asyncAfter(.microseconds(200)) { [weak self] in
            self?.assumeIsolated { resolver in
                resolver.deferredRetryScheduled = false
                if !resolver.deferred.isEmpty || !resolver.deferredUnprotects.isEmpty { resolver.retryDeferred() }
            }
        }
    }

    /// Abandons the fetches overlapping `segment` (a removed, unmapped or moved part): their data is not installed,
    /// and their waiters are woken to fault again.
    func invalidateFetches(in segment: ServedSegment) {
        let stale = fetches.values.filter { $0.region === segment.region && $0.pages.overlaps(segment.pages) }
        for fetch in stale.sorted(by: { $0.id < $1.id }) { abandon(fetch, releasing: nil, error: nil) }
    }

    /// Wakes the threads waiting on a fetch whose data will not be installed: they fault again and get a fresh resolution.
    func wakeWaiters(of fetch: Fetch) {
        for page in Set(fetch.waiters.map(\.page)) {
            try? uffd.wake(fetch.range(ofPage: page))
        }
    }

    /// Lets the threads waiting on a fetch go on without its data: each page they wait on is released with zeros or
    /// poison, or just woken when it is present already.
    func releaseWaiters(of fetch: Fetch, with release: WaiterRelease) {
        for page in Set(fetch.waiters.map(\.page)).sorted() {
            let range = fetch.range(ofPage: page)
            if fetch.region.present[page] {
                try? uffd.wake(range)
            } else if self.release(range, of: fetch.region, with: release) {
                fetch.region.present[page] = true
            }
        }
    }

    /// Resolves `range` with zeros or poison, counted in the statistics (``ResolverStatistics/zeroPages``,
    /// ``ResolverStatistics/pagesPoisoned``), so that the threads waiting on it go on. When that fails — the page is
    /// there already, or the range is gone — wakes them instead: they fault again and get a fresh resolution.
    /// - Returns: whether the page was resolved (is now present).
    @discardableResult
    func release(_ range: MemoryRange, of region: ServedRegion?, with release: WaiterRelease) -> Bool {
        switch release {
        case .zeros:
            if (try? fillWithZeros(range, of: region)) != nil {
                counters.withLock { $0.zeroPages += range.length / (region?.pageSize ?? pageSize) }
                return true
            }
        case .poison:
            if (try? uffd.poison(range)) != nil {
                counters.withLock { $0.pagesPoisoned += range.length / (region?.pageSize ?? pageSize) }
                return true
            }
        }
        try? uffd.wake(range)
        return false
    }

    /// Zero-fills missing pages: with the shared zero page, or by copying zeros where the memory has none (hugetlbfs)
    /// or where pages must be installed write-protected (``Options/installWriteProtected``); in a shared file's page cache
    /// for a shared-memory ``LazyRegion``.
    @discardableResult
    func fillWithZeros(_ range: MemoryRange, of region: ServedRegion?) throws(UserfaultError) -> Int {
        if let region, let file = region.sharedFile, let segment = segments.first(where: { $0.range.contains(range.start) }) {
            file.fill(offset: segment.page(at: range.start) * region.pageSize, count: range.length, from: nil)
            return try uffd.continue(range)
        }
        guard let region, region.zeroByCopy else { return try uffd.zeroPage(range) }
        if zeroSource == nil { zeroSource = try AnonymousMemory(length: pool.bufferSize) }
        return try uffd.copy(from: zeroSource!.pointer, to: range.start, length: range.length,
                             mode: options.installWriteProtected ? .writeProtect : [])
    }

    /// MINOR installation: the fetched bytes go into the shared file's page cache through its unregistered view (pages
    /// already there are kept), then `UFFDIO_CONTINUE` maps them into the faulting mapping — no second copy.
    private func installShared(_ file: SharedMemoryFile, from source: UnsafeRawPointer?, fetch: Fetch, range: MemoryRange) throws(UserfaultError) {
        let fileOffset = fetch.pages.lowerBound * fetch.region.pageSize + Int(range.start - fetch.address)
        file.fill(offset: fileOffset, count: range.length, from: source)
        try uffd.continue(range)
    }

    /// Ends a fetch: clears its in-flight pages, returns its buffer, resumes prefetches waiting on it.
    func finishFetch(_ fetch: Fetch, error: (any Error)?) {
        guard fetches[fetch.id] === fetch else { return }
        fetches[fetch.id] = nil
        fetch.region.inFlight.set(fetch.pages, to: false)
        if let buffer = fetch.buffer, !fetch.reading {
            pool.give(buffer)
        }
        fetch.buffer = nil
        for completion in fetch.completions {
            if let error { completion.resume(throwing: error) } else { completion.resume() }
        }
        fetch.completions.removeAll(keepingCapacity: true)
        fetch.task = nil
        if spareFetches.count < Self.spareFetchLimit { spareFetches.append(fetch) }
    }
}
