import Dispatch

/// A thread waiting on a page of a fetch, and when its fault was read.
struct FaultWaiter {
    let page: Int
    let readAt: UInt64
}

/// One fetch: where its pages live, its life (``FetchStateMachine``), and what the resolver holds for it — the threads
/// and prefetches waiting on it, its read's task and buffer. A class so that finished fetches are recycled with their
/// arrays' storage (no allocation per fault); everything it decides is in `machine`.
final class Fetch {
    private(set) var id: Int
    private(set) var region: ServedRegion
    /// Where `pages.lowerBound` lives; fixed at creation (a REMAP abandons the fetch).
    private(set) var address: UInt
    var machine: FetchStateMachine
    var waiters: [FaultWaiter] = []
    var completions: [CheckedContinuation<Void, any Error>] = []
    var task: Task<Void, Never>?
    var buffer: PooledBuffer?

    init(id: Int, region: ServedRegion, pages: Range<Int>, address: UInt, isReadahead: Bool) {
        self.id = id
        self.region = region
        self.address = address
        self.machine = FetchStateMachine(pages: pages, pageSize: region.pageSize, isReadahead: isReadahead)
    }

    /// Makes a finished fetch new again for another cluster, keeping its arrays' storage (no allocation).
    func reuse(id: Int, region: ServedRegion, pages: Range<Int>, address: UInt, isReadahead: Bool) {
        self.id = id
        self.region = region
        self.address = address
        machine = FetchStateMachine(pages: pages, pageSize: region.pageSize, isReadahead: isReadahead)
        waiters.removeAll(keepingCapacity: true)
        completions.removeAll(keepingCapacity: true)
        task = nil
        buffer = nil
    }

    var pages: Range<Int> { machine.pages }
    var length: Int { machine.length }
    var range: MemoryRange { MemoryRange(start: address, length: length) }
    var providerOffset: Int { region.providerOffset + pages.lowerBound * region.pageSize }

    /// The address range of one of the fetch's pages.
    func range(ofPage page: Int) -> MemoryRange {
        MemoryRange(start: address + UInt((page - pages.lowerBound) * region.pageSize), length: region.pageSize)
    }
}

/// The life of fetches: made (or recycled), read, retried, timed out, abandoned, ended. Each event goes through the
/// fetch's ``FetchStateMachine``; ``perform(_:for:cause:)`` carries out what it returns.
extension FaultResolver {
    func makeFetch(region: ServedRegion, segment: ServedSegment, pages: Range<Int>, isReadahead: Bool = false) -> Fetch {
        // Finished fetches are recycled (ids are never reused, so a late callback for an old id finds nothing).
        let address = segment.address(of: pages.lowerBound)
        let fetch: Fetch
        if let spare = spareFetches.popLast() {
            spare.reuse(id: nextFetchID, region: region, pages: pages, address: address, isReadahead: isReadahead)
            fetch = spare
        } else {
            fetch = Fetch(id: nextFetchID, region: region, pages: pages, address: address, isReadahead: isReadahead)
        }
        nextFetchID += 1
        region.inFlight.set(pages, to: true)
        fetches[fetch.id] = fetch
        return fetch
    }

    /// A fetch for pages removed under ``RemovedPagePolicy/zeroFill``, to start filling with zeros (never the provider):
    /// from `page` over the removed free pages after it (up to `end` and one buffer's worth).
    func zeroFetch(from page: Int, of segment: ServedSegment, before end: Int) -> Fetch {
        let region = segment.region
        var upper = page + 1
        let end = min(end, page + pool.bufferSize / region.pageSize)
        while upper < end && region.isRemovedAndFree(upper) { upper += 1 }
        return makeFetch(region: region, segment: segment, pages: page..<upper)
    }

    func fetch(covering page: Int, of region: ServedRegion) -> Fetch? {
        fetches.values.first { $0.region === region && $0.pages.contains(page) }
    }

    /// Starts a fetch: pages past the data are zero pages; a provider that answers at once is served here and now;
    /// otherwise an asynchronous read is launched (or queued for a slot).
    func start(_ fetch: Fetch) {
        perform(fetch.machine.start(dataBytes: fetch.region.dataLength(of: fetch.pages)), for: fetch)
    }

    /// Starts a fetch that fills its pages without a provider read.
    func start(_ fetch: Fetch, filling fill: PageFill) {
        perform(fetch.machine.fill(fill), for: fetch)
    }

    /// Carries out a step of a fetch's life: first the end of the read it ended (its slot to the next waiting fetch),
    /// then its action. `cause` is the error behind a failure.
    func perform(_ step: FetchStateMachine.Step, for fetch: Fetch, cause: (any Error)? = nil) {
        if let readEnd = step.readEnd {
            if readEnd == .abandoned {
                // Its late result is ignored, and the buffer it fills stays with it until it returns.
                fetch.task?.cancel()
                fetch.buffer = nil
            }
            slots.give()
            launchWaiting()
        }
        switch step.action {
        case .nothing:
            break
        case .discardLateResult:
            break // Handled by `readReturned`, which holds the late read's buffer.
        case .readImmediately:
            readImmediately(fetch)
        case .waitForSlotOrLaunch:
            if slots.launchOrQueue(fetch.id) { launch(fetch) }
        case .launch(let attempt):
            launch(fetch, attempt: attempt)
        case .install(let clearingFrom):
            if let clearingFrom, let buffer = fetch.buffer {
                buffer.pageBuffer.fill(0, in: clearingFrom..<fetch.length)
            }
            install(fetch)
        case .retry(let delay, let attempt):
            let id = fetch.id
            executor.asyncAfter(delay) { [weak self] in
                self?.assumeIsolated { resolver in
                    guard let fetch = resolver.fetches[id] else { return }
                    resolver.perform(fetch.machine.retryDue(attempt: attempt), for: fetch)
                }
            }
        case .end(let ending):
            end(fetch, ending, cause: cause)
        }
    }

    private func readImmediately(_ fetch: Fetch) {
        counters.withLock { counters in
            counters.providerReads += 1
            if fetch.machine.isReadahead { counters.readaheadReads += 1 }
        }
        guard let buffer = takeBuffer(for: fetch) else { return }
        let step: FetchStateMachine.Step
        var cause: (any Error)?
        do {
            if let content = try fetch.region.provider.readImmediately(
                into: buffer.pageBuffer.prefix(fetch.region.dataLength(of: fetch.pages)), at: fetch.providerOffset) {
                step = fetch.machine.answeredImmediately(content)
            } else {
                step = fetch.machine.declinedImmediately()
            }
        } catch {
            cause = error
            step = fetch.machine.failedImmediately(retryAllowed: retryAllowed(after: error), policy: options.failurePolicy)
        }
        perform(step, for: fetch, cause: cause)
    }

    private func takeBuffer(for fetch: Fetch) -> PooledBuffer? {
        if let buffer = fetch.buffer { return buffer }
        do {
            let buffer = try pool.take()
            fetch.buffer = buffer
            return buffer
        } catch {
            let step = fetch.machine.failedBeforeReading(retryAllowed: retryAllowed(after: error), policy: options.failurePolicy)
            perform(step, for: fetch, cause: error)
            return nil
        }
    }

    /// Counts a provider failure and says whether the failure policy may retry it: not once resolution is cancelled,
    /// nor for a permanent failure.
    private func retryAllowed(after error: any Error) -> Bool {
        counters.withLock { $0.providerErrors += 1 }
        let permanent = (error as? any ProviderFailure)?.isPermanent ?? false
        return !isCancelled && !permanent
    }

    /// Takes a slot and runs the provider's asynchronous read on the provider executor.
    private func launch(_ fetch: Fetch) {
        guard takeBuffer(for: fetch) != nil else { return }
        perform(fetch.machine.slotGranted(), for: fetch)
    }

    private func launch(_ fetch: Fetch, attempt: Int) {
        guard let buffer = fetch.buffer else { return }
        slots.take()
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
            await self?.readReturned(id: id, attempt: attempt, buffer: buffer, result: result)
        }
        if let timeout = options.providerTimeout {
            executor.asyncAfter(timeout) { [weak self] in
                self?.assumeIsolated { $0.readTimedOut(id: id, attempt: attempt, timeout: timeout) }
            }
        }
    }

    private func readReturned(id: Int, attempt: Int, buffer: PooledBuffer, result: Result<PageContent, any Error>) {
        guard let fetch = fetches[id] else {
            // The fetch ended while its read ran: the buffer is free again only now.
            pool.give(buffer)
            return
        }
        let step: FetchStateMachine.Step
        var cause: (any Error)?
        switch result {
        case .success(let content):
            step = fetch.machine.readReturned(attempt: attempt, content)
        case .failure(let error):
            if fetch.machine.isReading(attempt: attempt) {
                cause = error
                step = fetch.machine.readReturned(attempt: attempt, failureWithRetryAllowed: retryAllowed(after: error),
                                                  policy: options.failurePolicy)
            } else {
                step = FetchStateMachine.Step(.discardLateResult)
            }
        }
        if case .discardLateResult = step.action {
            // An abandoned attempt (timed out): its buffer is free again only now.
            pool.give(buffer)
            return
        }
        perform(step, for: fetch, cause: cause)
    }

    private func readTimedOut(id: Int, attempt: Int, timeout: Duration) {
        guard let fetch = fetches[id], fetch.machine.isReading(attempt: attempt) else { return }
        let error = ProviderTimeoutError(timeout: timeout)
        let step = fetch.machine.readTimedOut(attempt: attempt, retryAllowed: retryAllowed(after: error),
                                              policy: options.failurePolicy)
        perform(step, for: fetch, cause: error)
    }

    private func launchWaiting() {
        while let id = slots.nextWaiting() {
            if let fetch = fetches[id] { launch(fetch) }
        }
    }

    /// Abandons the fetches overlapping `segment` (a removed, unmapped or moved part): their data is not installed,
    /// and their waiters are woken to fault again.
    func invalidateFetches(in segment: ServedSegment) {
        let stale = fetches.values.filter { $0.region === segment.region && $0.pages.overlaps(segment.pages) }
        for fetch in stale.sorted(by: { $0.id < $1.id }) { perform(fetch.machine.abandon(.invalidated), for: fetch) }
    }

    /// The one way a fetch ends. Its waiting threads get what the ending says (``FetchStateMachine/Ending/waiters``):
    /// nothing once installed, a wake to fault again and get a fresh resolution after an invalidation (a fault at the
    /// new address after a REMAP gets a fetch of its own instead of joining one whose wake would go to the old
    /// address), the fill once cancelled or given up. A failure is reported with the policy's final resolution. Then
    /// its in-flight pages are free, its buffer returned, and prefetches waiting on it resumed (with the
    /// ``RegionError``, or `CancellationError` once cancelled). Pages nobody waits on stay missing and are asked for
    /// again when touched.
    private func end(_ fetch: Fetch, _ ending: FetchStateMachine.Ending, cause: (any Error)?) {
        var error: (any Error)?
        switch ending {
        case .installed:
            let now = monotonicNanoseconds()
            counters.withLock { counters in
                for waiter in fetch.waiters { counters.latency.record(nanoseconds: now &- waiter.readAt) }
            }
        case .addressSpaceGone, .invalidated:
            break
        case .cancelled:
            error = CancellationError()
        case .failed:
            let failure = RegionError(range: fetch.range, providerOffset: fetch.providerOffset,
                                      underlying: cause ?? UserfaultError(.system, operation: .copy, range: fetch.range),
                                      attempts: fetch.machine.attempts, resolution: options.failurePolicy.terminal)
            reportFailure(failure)
            error = failure
        }
        switch ending.waiters {
        case .leave:
            break
        case .wake:
            for page in Set(fetch.waiters.map(\.page)) {
                try? uffd.wake(fetch.range(ofPage: page))
            }
        case .fill(let fill):
            for page in Set(fetch.waiters.map(\.page)).sorted() {
                release(fetch.range(ofPage: page), page: page, of: fetch.region, with: fill)
            }
        }
        finish(fetch, error: error)
    }

    /// Lets a fetch go: clears its in-flight pages, returns its buffer, resumes prefetches waiting on it, keeps it for
    /// reuse.
    private func finish(_ fetch: Fetch, error: (any Error)?) {
        guard fetches[fetch.id] === fetch else { return }
        fetches[fetch.id] = nil
        fetch.region.inFlight.set(fetch.pages, to: false)
        if let buffer = fetch.buffer {
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
