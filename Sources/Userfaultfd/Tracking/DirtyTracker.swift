import Dispatch
import Glibc
import Synchronization

/// Which pages of a range were written since the last look: ``start()``, then ``collect()`` every round.
///
/// ```swift
/// let tracker = try DirtyTracker(range: memory.range)     // the best engine this kernel offers
/// try await tracker.start()
/// // ... the program writes ...
/// let dirty = try await tracker.collect()                 // [MemoryRange], and tracking is re-armed
/// // or: try await tracker.collectPages()                 // the same, as page indices from the range's start
/// ```
///
/// ``collect()`` returns the pages written since ``start()`` or the previous `collect()` and re-arms tracking in the
/// same step: a write racing it lands in this round or the next, never in neither.
///
/// ## Engines
/// - ``DirtyTrackingEngine/asyncScan``: the userfaultfd has ``UserfaultFeatures/wpAsync`` (Linux 6.7+), so the kernel resolves
///   write-protect faults itself and marks the page written; `collect()` reads and re-protects them with one
///   `PAGEMAP_SCAN` walk (`PagemapScanner`). Writers never stop.
/// - ``DirtyTrackingEngine/writeProtectFaults``: every first write after a round raises a write-protect fault; the tracker records the
///   page, lifts the protection and wakes the writer at once (on the userfaultfd's event queue, never waiting on anything).
///   `collect()` runs on that queue too: it reads every fault already queued, re-protects the range, then swaps the set.
///
/// The memory may be private anonymous (needs ``UserfaultFeatures/wpUnpopulated``, or the range is pre-populated so that
/// empty entries are protected too) or shared memory (``UserfaultFeatures/wpHugetlbfsShmem``), in this process or in
/// another one (``init(range:uffd:pid:engine:registering:)``), or a ``LazyRegion`` created with tracking
/// (``init(region:)``).
///
/// The tracker is an actor whose executor is the userfaultfd's event queue (``UserfaultFD/eventExecutor``).
public actor DirtyTracker {
    /// How writes are detected: ``DirtyTrackingEngine``. It lives in the core, so that a ``LazyRegion`` set up for
    /// tracking names it without the resolution layer depending on this one.
    public typealias Engine = DirtyTrackingEngine

    /// Counters of a tracker.
    public struct Statistics: Sendable, Hashable {
        /// Write-protect faults handled (``DirtyTrackingEngine/writeProtectFaults``).
        public var faults = 0
        /// Rounds collected.
        public var rounds = 0
        /// Pages reported over all rounds.
        public var pagesReported = 0
        /// Write-protect faults outside the tracked range (un-protected and woken, not recorded).
        public var foreignFaults = 0
    }

    /// The tracked range (page-aligned).
    public nonisolated let range: MemoryRange
    /// The engine in use.
    public nonisolated let engine: Engine
    /// The userfaultfd the range is registered with.
    public nonisolated let uffd: UserfaultFD
    /// The process that owns the memory (`nil`: this one).
    public nonisolated let pid: pid_t?
    private nonisolated let counters = Mutex(Statistics())
    private let scanner: PagemapScanner?
    private let ownsUFFD: Bool
    private let pageSize: Int
    /// Pages (indexes from `range.start`) written this round (fault engine).
    private var written = Set<Int>()
    /// Pages whose un-protection the kernel deferred (`EAGAIN` while an event was unread).
    private var pendingUnprotect: [UInt] = []
    private var retryScheduled = false
    private var started = false
    /// Part of the range was found unmapped or replaced: what lies there now may be someone else's registered memory,
    /// so the tracker no longer changes protections across the whole range.
    private var rangeLost = false

    public nonisolated var unownedExecutor: UnownedSerialExecutor { uffd.eventExecutor.asUnownedSerialExecutor() }

    /// Tracks `range` of this process's memory with a userfaultfd of its own.
    ///
    /// - Parameters:
    ///   - range: page-aligned memory of this process, mapped and not registered with another userfaultfd.
    ///   - engine: `nil` picks the best the kernel offers (``DirtyTrackingEngine/best(for:)``).
    /// - Throws: ``UserfaultError`` when the userfaultfd cannot be created with the engine's features or the range cannot be
    ///   registered for write protection (unaligned, unmapped, owned by another userfaultfd).
    public init(range: MemoryRange, engine: Engine? = nil) throws(UserfaultError) {
        let offered = try UserfaultFD.probeFeatures().features
        let engine = engine ?? Engine.best(for: offered)
        let required: UserfaultFeatures = engine == .asyncScan ? [.wpAsync] : [.pagefaultFlagWP]
        let uffd = try UserfaultFD(requiredFeatures: required, optionalFeatures: engine.features.intersection(offered))
        do {
            try self.init(range: range, uffd: uffd, pid: nil, engine: engine, registering: true, owning: true, readingEvents: true)
        } catch {
            uffd.close()
            throw error
        }
    }

    /// Tracks `range` of another process's memory (or of this one) through `uffd`, a userfaultfd created in that
    /// process (received over a socket, or inherited) whose handshake enabled the engine's features.
    ///
    /// - Parameters:
    ///   - range: page-aligned memory of the process `pid`.
    ///   - uffd: the userfaultfd created in that process.
    ///   - pid: the process owning the memory (its `/proc/PID/pagemap` is scanned); `nil` for this process.
    ///   - engine: `nil` picks ``DirtyTrackingEngine/asyncScan`` when `uffd` has ``UserfaultFeatures/wpAsync`` enabled.
    ///   - registering: register `range` for write protection here; pass `false` when the other process did.
    /// The tracker reads `uffd`'s events itself with the fault engine, so they cannot be iterated elsewhere.
    public init(range: MemoryRange, uffd: UserfaultFD, pid: pid_t?, engine: Engine? = nil, registering: Bool = true) throws(UserfaultError) {
        try self.init(range: range, uffd: uffd, pid: pid, engine: engine ?? Engine.best(for: uffd.enabledFeatures),
                      registering: registering, owning: false, readingEvents: true)
    }

    private init(range: MemoryRange, uffd: UserfaultFD, pid: pid_t?, engine: Engine, registering: Bool, owning: Bool,
                 readingEvents: Bool) throws(UserfaultError) {
        guard range.length > 0, range.isAligned(to: uffd.pageSize) else {
            throw UserfaultError(.invalidArgument, operation: .register, range: range, detail: "a tracked range must be page-aligned and not empty")
        }
        self.range = range
        self.engine = engine
        self.uffd = uffd
        self.pid = pid
        self.ownsUFFD = owning
        self.pageSize = uffd.pageSize
        self.scanner = engine == .asyncScan ? try PagemapScanner(pid: pid) : nil
        if registering {
            try uffd.register(range, mode: .writeProtect)
        }
        if engine == .writeProtectFaults && readingEvents {
            try uffd.reader.attach(TrackerSink(tracker: self))
        }
    }

    /// Tracks the writes to a ``LazyRegion`` created with `tracking:` (its pages are installed write-protected, so
    /// a page faulted in is clean until written). With the fault engine the region's resolver hands its write-protect
    /// faults to this tracker.
    /// - Throws: ``UserfaultError/Code/invalidArgument`` when the region was created without tracking.
    ///
    /// Synchronous like the other initializers: the handler is installed before it returns, so every write after
    /// that is seen.
    public init(region: LazyRegion) throws(UserfaultError) {
        guard let engine = region.trackingEngine else {
            throw UserfaultError(.invalidArgument, operation: .register, range: region.range,
                                 detail: "the LazyRegion was created without tracking (pass tracking: to its initializer)")
        }
        try self.init(range: region.range, uffd: region.uffd, pid: nil, engine: engine, registering: false, owning: false,
                      readingEvents: false)
        if engine == .writeProtectFaults {
            region.resolver.setWriteProtectFaultHandler { [weak self] fault in
                self?.assumeIsolated { $0.record(fault) }
            }
        }
    }

    deinit {
        if ownsUFFD { uffd.close() }
    }

    /// Arms tracking: write-protects the whole range, forgetting anything recorded before.
    public func start() throws(UserfaultError) {
        try protectRange()
        written.removeAll()
        started = true
    }

    /// The pages written since ``start()`` or the previous `collect()`, as maximal runs in ascending order; tracking is
    /// re-armed in the same step.
    ///
    /// The tracker follows its range, not the memory: after `munmap(2)` of any part of it, or `mremap(2)` moving it
    /// away, writes there are no longer seen, so `collect()` refuses to report a partial picture and throws
    /// ``UserfaultError/Code/notRegistered`` naming the parts gone, and re-arms nothing. To go on, track the memory
    /// where it is now with a new tracker. Checked for the scan engine, and for the fault engine on memory of this
    /// process.
    /// - Throws: ``UserfaultError`` when the range can no longer be protected or scanned (unmapped, moved, process exited).
    public func collect() throws(UserfaultError) -> [MemoryRange] {
        let result: [MemoryRange]
        switch engine {
        case .asyncScan:
            try requireWholeRange(try scanner!.asyncWriteProtectedPages(in: range), operation: .scanPagemap)
            result = try scanner!.writtenPages(in: range, rearm: true)
        case .writeProtectFaults:
            if pid == nil { try requireWholeRange(mappedPagesHere(), operation: .writeProtect) }
            // Every fault queued now was raised before this collection: record it in this round first.
            uffd.reader.drainPending()
            retryUnprotect()
            try protectRange()
            let pages = written.sorted()
            written.removeAll()
            result = runs(of: pages)
        }
        counters.withLock {
            $0.rounds += 1
            $0.pagesReported += result.reduce(0) { $0 + $1.length } / pageSize
        }
        return result
    }

    /// The pages written since ``start()`` or the previous collection, as page indices relative to ``range`` (page 0 is
    /// its first page): ``collect()`` without the address arithmetic. Re-arms tracking in the same step.
    /// - Throws: ``UserfaultError`` as ``collect()`` does.
    public func collectPages() throws(UserfaultError) -> DirtyPages {
        DirtyPages(try collect(), from: range.start, pageSize: pageSize)
    }

    /// Stops tracking: lifts the write protection (waking any writer; not after ``collect()`` found the range unmapped or
    /// moved) and, for a userfaultfd the tracker created, closes it.
    public func stop() {
        // UFFDIO_WRITEPROTECT acts on any registered VMA of the process in the range: after the range was lost, one
        // that replaced it may belong to another userfaultfd (another tracker), so leave protections alone then.
        if !rangeLost { try? uffd.writeProtect(range, enabled: false) }
        started = false
        if ownsUFFD { uffd.close() }
    }

    /// The counters so far.
    public nonisolated var statistics: Statistics { counters.withLock { $0 } }

    // MARK: - Fault engine

    /// A write-protect fault: record the page, then lift the protection and wake the writer.
    func record(_ fault: PageFault) {
        let page = fault.pageAddress
        if range.contains(page) {
            written.insert(Int((page - range.start) / UInt(pageSize)))
            counters.withLock { $0.faults += 1 }
        } else {
            counters.withLock { $0.foreignFaults += 1 }
        }
        unprotect(page)
    }

    func receive(_ batch: [Result<FaultEvent, UserfaultError>]) {
        for case .success(.pageFault(let fault)) in batch {
            if fault.kind == .writeProtect {
                record(fault)
            } else {
                // Not a tracked write (nothing else is registered by the tracker): don't leave the thread blocked.
                try? uffd.wake(MemoryRange(start: fault.pageAddress, length: pageSize))
            }
        }
        if !pendingUnprotect.isEmpty { retryUnprotect() }
    }

    private func unprotect(_ page: UInt) {
        do {
            try uffd.writeProtect(MemoryRange(start: page, length: pageSize), enabled: false)
        } catch {
            if case .tryAgain = error.code {
                pendingUnprotect.append(page)
                scheduleRetry()
            }
            // Anything else: the page is gone (unmapped, process exited); nobody waits on it.
        }
    }

    private func retryUnprotect() {
        let pages = pendingUnprotect
        pendingUnprotect.removeAll()
        for page in pages { unprotect(page) }
    }

    private func scheduleRetry() {
        guard !retryScheduled else { return }
        retryScheduled = true
        uffd.eventExecutor.asyncAfter(.microseconds(200)) { [weak self] in
            self?.assumeIsolated { tracker in
                tracker.retryScheduled = false
                tracker.retryUnprotect()
            }
        }
    }

    /// Write-protects the whole range; an `EAGAIN` (an event unread) is retried after reading what is queued.
    private func protectRange() throws(UserfaultError) {
        var attempts = 0
        while true {
            do {
                try uffd.writeProtect(range, enabled: true)
                return
            } catch {
                guard case .tryAgain = error.code, attempts < 10_000 else { throw error }
                attempts += 1
                uffd.reader.drainPending()
                if attempts > 10 { usleep(50) }
            }
        }
    }

    // MARK: - The range itself

    /// Throws ``UserfaultError/Code/notRegistered`` unless `present` (runs in ascending order) covers the whole range.
    private func requireWholeRange(_ present: [MemoryRange], operation: UserfaultError.Operation) throws(UserfaultError) {
        var missing: [MemoryRange] = []
        var cursor = range.start
        for run in present where run.end > cursor {
            if run.start > cursor { missing.append(MemoryRange(start: cursor, end: run.start)) }
            cursor = run.end
        }
        if cursor < range.end { missing.append(MemoryRange(start: cursor, end: range.end)) }
        guard missing.isEmpty else {
            rangeLost = true
            throw UserfaultError(.notRegistered, operation: operation, range: range, detail:
                "part of the tracked range is no longer mapped there or no longer registered (munmap, or mremap moved it): \(missing)")
        }
    }

    /// The runs of the range that are mapped in this process (`mincore(2)` fails with `ENOMEM` over an unmapped page),
    /// found by halving: one system call when all of it is mapped.
    private func mappedPagesHere() -> [MemoryRange] {
        var vector = [UInt8](repeating: 0, count: range.length / pageSize)
        func mapped(_ piece: MemoryRange) -> [MemoryRange] {
            if mincore(piece.pointer, piece.length, &vector) == 0 { return [piece] }
            guard piece.length > pageSize else { return [] }
            let half = (piece.length / pageSize / 2) * pageSize
            return mapped(MemoryRange(start: piece.start, length: half))
                + mapped(MemoryRange(start: piece.start + UInt(half), length: piece.length - half))
        }
        var result: [MemoryRange] = []
        for piece in mapped(range) {
            if let last = result.last, last.end == piece.start {
                result[result.count - 1].length += piece.length
            } else {
                result.append(piece)
            }
        }
        return result
    }

    private func runs(of pages: [Int]) -> [MemoryRange] {
        var result: [MemoryRange] = []
        for page in pages {
            let start = range.start + UInt(page * pageSize)
            if let last = result.last, last.end == start {
                result[result.count - 1].length += pageSize
            } else {
                result.append(MemoryRange(start: start, length: pageSize))
            }
        }
        return result
    }
}

/// Feeds a tracker from its userfaultfd's event reader, on the event queue (the tracker's executor). Holds the tracker
/// until the userfaultfd is closed (the reader then drops its sink).
private final class TrackerSink: FaultEventSink {
    let tracker: DirtyTracker

    init(tracker: DirtyTracker) {
        self.tracker = tracker
    }

    func receive(_ batch: inout [Result<FaultEvent, UserfaultError>]) {
        let events = batch
        tracker.assumeIsolated { $0.receive(events) }
    }

    func finish(_ error: UserfaultError?) {}
}
