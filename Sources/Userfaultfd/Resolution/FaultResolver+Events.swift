import Dispatch

/// Events: a batch's non-fault events applied first (REMOVE, UNMAP, REMAP, FORK), then its faults, each resolved —
/// joined to a fetch in flight, woken when present, filled once cancelled, or given a fetch of its own with readahead.
extension FaultResolver {
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
            if let handler = writeProtectHandler.withLock({ $0 }) {
                handler(fault)
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
            release(page, page: nil, of: nil, with: .zeros)
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
        if isPresent(index, of: region, at: regionPage, checkingResidence: true) {
            // A duplicate message from a thread the install already woke (or that re-faulted after a signal).
            try? uffd.wake(regionPage)
            counters.withLock {
                $0.alreadyPresentFaults += 1
                $0.latency.record(nanoseconds: monotonicNanoseconds() &- readAt)
            }
            return
        }
        if isCancelled {
            release(regionPage, page: index, of: region, with: PageFill(options.cancellation))
            return
        }
        if region.removed[index] {
            let fetch = zeroFetch(from: index, of: segment, before: segment.pages.upperBound)
            fetch.waiters.append(FaultWaiter(page: index, readAt: readAt))
            start(fetch, filling: .zeros)
            return
        }
        let limit: Range<Int>
        if index < region.dataPages {
            limit = segment.pages.lowerBound..<min(segment.pages.upperBound, region.dataPages)
        } else {
            limit = max(segment.pages.lowerBound, region.dataPages)..<segment.pages.upperBound
        }
        let maximumPages = pool.bufferSize / region.pageSize
        let cluster = region.advanceStream(faultingAt: index, within: limit, readahead: options.readahead, maximumPages: maximumPages)
        let fetch = makeFetch(region: region, segment: segment, pages: cluster.pages)
        fetch.waiters.append(FaultWaiter(page: index, readAt: readAt))
        start(fetch)
        // Asynchronous readahead: once a stream is established (sequential faults grew its window to the maximum),
        // also bring in the next window while the application reads this one, like the kernel's async readahead, so
        // reading and resolving overlap. Short or random access never reads ahead of its faults.
        if options.readahead.readsAhead,
           let ahead = region.advanceStreamAhead(of: cluster, within: limit,
                                          maximumWindow: options.readahead.maximumPages(pageSize: region.pageSize),
                                          maximumPages: maximumPages) {
            start(makeFetch(region: region, segment: segment, pages: ahead, isReadahead: true))
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
                let cluster = region.advanceStream(faultingAt: index, within: segment.pages, readahead: options.readahead,
                                             maximumPages: pool.bufferSize / region.pageSize)
                let pages = index..<max(index + 1, cluster.pages.upperBound)
                let range = MemoryRange(start: segment.address(of: index), length: pages.count * region.pageSize)
                do throws(UserfaultError) {
                    try uffd.continue(range)
                    markPresent(pages, of: region)
                    return
                } catch {
                    if case .tryAgain(let done) = error.code, done >= region.pageSize {
                        // Mapped up to a page that is not in the page cache (or an event came first): the faulting
                        // page is mapped and its thread woken.
                        markPresent(index..<index + done / region.pageSize, of: region)
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
        errorBroadcast.yield(RegionError(
            range: error.range ?? MemoryRange(start: 0, length: 0), providerOffset: 0, underlying: error, attempts: 0,
            resolution: .zeroFill))
    }

    func reportFailure(_ error: RegionError) {
        errorBroadcast.yield(error)
    }

    /// The reader stopped: the userfaultfd was closed (or failed). Nothing can be resolved any more.
    func readerFinished(_ error: UserfaultError?) {
        if let error { report(decodeError: error) }
        cancel()
        for child in childResolvers { child.resolver.uffd.close() }
        childResolvers.removeAll()
        errorBroadcast.finish()
        forkChannel.finish()
    }
}
