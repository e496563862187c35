/// Putting pages into the memory: a fetch's installation (copy, zeros or poison, split and resumed as the fetch's
/// ``FetchStateMachine`` says), fills that release waiting threads, write-protect lifts, and the retry of what the kernel
/// deferred. The one place a resolved page is marked present (``markPresent(_:of:)``).
extension FaultResolver {
    /// Installs a fetch's pages, splitting around pages already present and resuming after partial progress. When the
    /// kernel defers (`EAGAIN` with nothing done: an event is unread), the fetch waits in `deferred` and is retried
    /// after the next batch of events.
    ///
    /// The kernel refuses a range as a whole when it crosses the end of a mapping (`ENOENT`: part of the registered range
    /// was `mprotect`ed, `mlock`ed or `madvise`d into a VMA of its own), or when it cannot allocate (`ENOMEM`, a cgroup
    /// limit): the range is then halved until a part goes in (and grows back after each success), down to single pages.
    /// A page that cannot be installed even alone gets the failure policy once the rest is in, so that no waiting
    /// thread is left asleep.
    func install(_ fetch: Fetch) {
        // The machine is worked on as a local value and stored back before anything else can see the fetch: one
        // exclusive access to the class's storage per installation rather than several per part.
        var machine = fetch.machine
        machine.resumeInstalling()
        guard let installation = machine.installation else { return }
        while let part = machine.nextPart {
            let step: FetchStateMachine.InstallStep
            do throws(UserfaultError) {
                try installPart(of: fetch, installation, offset: part.offset, length: part.length)
                step = machine.partInstalled()
            } catch {
                step = machine.partFailed(error)
            }
            switch step {
            case .installed(let pages):
                markPresent(pages, of: fetch.region)
                count(pages.count, installedAs: installation, pageSize: fetch.region.pageSize)
            case .alreadyPresent(let page):
                // Someone else resolved this page: count it present, wake whoever waits on it, go on after it.
                try? uffd.wake(fetch.range(ofPage: page))
                markPresent(page..<page + 1, of: fetch.region)
            case .next:
                continue
            case .deferred:
                fetch.machine = machine
                if !deferred.contains(fetch.id) { deferred.append(fetch.id) }
                counters.withLock { $0.deferredRetries += 1 }
                scheduleDeferredRetry()
                return
            case .gone:
                // Nobody is left waiting: closing woke every thread, and an exited address space has none.
                fetch.machine = machine
                perform(FetchStateMachine.Step(.end(.addressSpaceGone)), for: fetch)
                return
            }
        }
        let step = machine.installFinished(policy: options.failurePolicy)
        let refusal = machine.refusal
        fetch.machine = machine
        perform(step, for: fetch, cause: refusal)
    }

    /// Installs `length` bytes of a fetch from `offset` on, the way its installation says.
    private func installPart(of fetch: Fetch, _ installation: Installation, offset: Int, length: Int) throws(UserfaultError) {
        let range = MemoryRange(start: fetch.address + UInt(offset), length: length)
        switch installation {
        case .copy:
            if let file = fetch.region.sharedFile {
                try installShared(file, from: fetch.buffer!.pointer + offset, fetch: fetch, range: range)
            } else {
                try uffd.copy(from: fetch.buffer!.pointer + offset, to: range.start, length: length,
                              mode: options.installWriteProtected ? .writeProtect : [])
            }
        case .fill(.zeros):
            if let file = fetch.region.sharedFile {
                try installShared(file, from: nil, fetch: fetch, range: range)
            } else {
                try fillWithZeros(range, of: fetch.region)
            }
        case .fill(.poison):
            try uffd.poison(range)
        }
    }

    /// Whether page `page` of `region` (at `range`) is present: the one place that decides. The region's record says
    /// so (installed and not removed since); with `checkingResidence` — for a fault, which says the page is missing —
    /// the record is also checked against the memory.
    ///
    /// Only this process's own memory can be asked: for another's (a received userfaultfd, a forked child), `mincore`
    /// here tells about whatever this process has at that address. There the page is resolved again; if it is present
    /// after all (a duplicate message), the install meets EEXIST and wakes its thread. A page installed after a REMOVE
    /// was read but before madvise zapped the range (see `pageIsResident`) leaves a stale record: it is cleared, so that
    /// the page is resolved like any missing page (waking would only make the thread fault again, forever).
    func isPresent(_ page: Int, of region: ServedRegion, at range: MemoryRange, checkingResidence: Bool) -> Bool {
        guard region.present[page] else { return false }
        guard checkingResidence else { return true }
        if uffd.servesOwnAddressSpace, pageIsResident(range) { return true }
        region.present[page] = false
        return false
    }

    /// The one place resolution marks pages present: installed, found installed (`EEXIST`), filled for a waiting thread,
    /// or mapped from the page cache.
    @inline(__always)
    func markPresent(_ pages: Range<Int>, of region: ServedRegion) {
        region.present.set(pages, to: true)
    }

    private func count(_ pages: Int, installedAs installation: Installation, pageSize: Int) {
        counters.withLock { counters in
            switch installation {
            case .copy:
                counters.pagesCopied += pages
                counters.bytesCopied += pages * pageSize
            case .fill(.zeros):
                counters.zeroPages += pages
            case .fill(.poison):
                counters.pagesPoisoned += pages
            }
        }
    }

    /// Lets the threads waiting on `range` (page `page` of `region`, when served) go on without provider data: a page
    /// present already is only woken; otherwise it is filled, counted in the statistics
    /// (``FaultResolver/Statistics/zeroPages``, ``FaultResolver/Statistics/pagesPoisoned``) and marked present. When the fill
    /// fails — the page is there already, or the range is gone — the threads are woken instead: they fault again and
    /// get a fresh resolution.
    func release(_ range: MemoryRange, page: Int?, of region: ServedRegion?, with fill: PageFill) {
        if let page, let region, isPresent(page, of: region, at: range, checkingResidence: false) {
            try? uffd.wake(range)
            return
        }
        let filled: Bool
        switch fill {
        case .zeros: filled = (try? fillWithZeros(range, of: region)) != nil
        case .poison: filled = (try? uffd.poison(range)) != nil
        }
        guard filled else {
            try? uffd.wake(range)
            return
        }
        count(range.length / (region?.pageSize ?? pageSize), installedAs: .fill(fill), pageSize: region?.pageSize ?? pageSize)
        if let page, let region { markPresent(page..<page + 1, of: region) }
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
        return try uffd.copy(from: zeroSource!.baseAddress, to: range.start, length: range.length,
                             mode: options.installWriteProtected ? .writeProtect : [])
    }

    /// MINOR installation: the fetched bytes go into the shared file's page cache through its unregistered view (pages
    /// already there are kept), then `UFFDIO_CONTINUE` maps them into the faulting mapping — no second copy.
    private func installShared(_ file: SharedMemoryFile, from source: UnsafeRawPointer?, fetch: Fetch, range: MemoryRange) throws(UserfaultError) {
        let fileOffset = fetch.pages.lowerBound * fetch.region.pageSize + Int(range.start - fetch.address)
        file.fill(offset: fileOffset, count: range.length, from: source)
        try uffd.continue(range)
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
}
