import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import UserfaultfdBenchSupport
import UffdTool
import Userfaultfd

/// What the racing writer and the collecting test share.
final class RaceState: Sendable {
    let done = Atomic<Int>(0)
    let started = Atomic<Int>(0)
}

/// One `collect()` of the racing test: writes completed before it began and after it returned, and the pages reported.
struct RacedRound {
    var before: Int
    var after: Int
    var pages: Set<Int>
}

/// Dirty tracking with both engines, on real memory written from dedicated threads.
@Suite("Dirty tracking")
struct DirtyTrackerTests {
    static let engines: [DirtyTracker.Engine] = [.writeProtectFaults, .asyncScan]

    /// Page indexes (from `base`) covered by `ranges`.
    static func pages(_ ranges: [MemoryRange], from base: UInt) -> Set<Int> {
        Set(DirtyPages(runs: ranges.map { range in
            let first = Int((range.start - base) / UInt(systemPageSize))
            return first..<first + range.length / systemPageSize
        }))
    }

    /// `collectPages()` is `collect()` as page indices: the same pages, counted from the range's first page.
    @Test(.timeLimit(.minutes(1)), arguments: engines)
    func collectPagesMatchesCollect(engine: DirtyTracker.Engine) async throws {
        let pageSize = systemPageSize
        let memory = try AnonymousMemory(length: 32 * pageSize)
        // Track from page 4 of the mapping, so page indices and offsets from the mapping differ.
        let tracked = MemoryRange(start: memory.address + UInt(4 * pageSize), length: 16 * pageSize)
        let tracker = try DirtyTracker(range: tracked, engine: engine)
        try await tracker.start()
        #expect(await Self.write([4 + 0, 4 + 1, 4 + 2, 4 + 7, 4 + 15], at: memory.address, threads: 1, value: 1))
        let ranges = try await tracker.collect()
        #expect(ranges == [MemoryRange(start: tracked.start, length: 3 * pageSize),
                           MemoryRange(start: tracked.start + UInt(7 * pageSize), length: pageSize),
                           MemoryRange(start: tracked.start + UInt(15 * pageSize), length: pageSize)])
        #expect(await Self.write([4 + 0, 4 + 1, 4 + 2, 4 + 7, 4 + 15], at: memory.address, threads: 1, value: 2))
        let pages = try await tracker.collectPages()
        #expect(pages.runs == [0..<3, 7..<8, 15..<16])
        #expect(Array(pages) == [0, 1, 2, 7, 15])
        #expect(pages.count == 5)
        #expect(pages.contains(7) && pages.contains(15) && !pages.contains(3) && !pages.contains(16))
        #expect(try await tracker.collectPages().isEmpty)
        await tracker.stop()
    }

    /// Writes one byte into each page of `pages`, split over `threads` dedicated threads; true when all returned.
    static func write(_ pages: [Int], at base: UInt, threads: Int, value: UInt8) async -> Bool {
        let pageSize = systemPageSize
        let workers = (0..<threads).map { worker in
            let mine = pages.enumerated().filter { $0.offset % threads == worker }.map(\.element)
            return OffPoolThread(name: "uffd-track-writer") {
                for page in mine { cuffd_test_write_byte(UnsafeMutableRawPointer(bitPattern: base + UInt(page * pageSize) + 11), value) }
                return true
            }
        }
        for worker in workers where !(await worker.finishes(within: 15)) { return false }
        return true
    }

    /// A seeded write pattern over several rounds gives exactly the written pages, with both engines, from 4 threads;
    /// and the two engines report the same sets.
    @Test(.timeLimit(.minutes(1)))
    func exactDirtySetsAgreeAcrossEngines() async throws {
        let pageCount = 96, rounds = 5
        var reports: [DirtyTracker.Engine: [Set<Int>]] = [:]
        for engine in Self.engines {
            try await withFaultWatchdog(seconds: 30) { scope in
                let mapping = try scope.makeMapping(pages: pageCount)
                let tracker = try DirtyTracker(range: mapping.range, engine: engine)
                scope.track(tracker.uffd)
                #expect(tracker.engine == engine)
                try await tracker.start()
                var random = SplitMix64(seed: 0x5EED_0005)
                var seen: [Set<Int>] = []
                for round in 0..<rounds {
                    let written = Set((0..<pageCount).filter { _ in random.next() % 3 == 0 })
                    #expect(await Self.write(written.sorted(), at: mapping.address, threads: 4, value: UInt8(round + 1)))
                    let dirty = Set(try await tracker.collectPages())
                    #expect(dirty == written, "round \(round), \(engine): extra \(dirty.subtracting(written).sorted()), missing \(written.subtracting(dirty).sorted())")
                    seen.append(dirty)
                    // The bytes really landed.
                    for page in written { #expect(peek(mapping.page(page) + 11) == UInt8(round + 1)) }
                }
                // Nothing written since the last round: an empty set.
                #expect(try await tracker.collect().isEmpty)
                if engine == .writeProtectFaults { #expect(tracker.statistics.faults == seen.reduce(0) { $0 + $1.count }) }
                reports[engine] = seen
                await tracker.stop()
            }
        }
        #expect(reports[.writeProtectFaults] == reports[.asyncScan])
    }

    /// The automatic choice on this kernel (WP_ASYNC offered) is the scan engine.
    @Test func automaticEngineIsTheBestOffered() throws {
        let offered = try UserfaultFD.probeFeatures().features
        let mapping = try TestMapping(pages: 4)
        defer { mapping.unmap() }
        let tracker = try DirtyTracker(range: mapping.range)
        #expect(tracker.engine == DirtyTracker.Engine.best(for: offered))
        #expect(offered.contains(.wpAsync) == (tracker.engine == .asyncScan))
        tracker.uffd.close()
    }

    /// A writer writes a counter into page after page (a fixed number of writes, in epochs) while `collect()` runs a
    /// fixed number of rounds: no write is lost. Epoch r starts when round r's collection starts, so each collection
    /// races one epoch of writes; each write is checked against the rounds that may report it
    /// (``roundsThatMayReport(write:rounds:)``), whatever the machine's load does to the interleaving.
    @Test(.timeLimit(.minutes(3)), arguments: engines)
    func writesRacingCollectAreNeverLost(engine: DirtyTracker.Engine) async throws {
        let pageCount = 32, rounds = 200, writesPerRound = 320
        let writes = rounds * writesPerRound
        try await withFaultWatchdog(seconds: 150) { scope in
            let mapping = try scope.makeMapping(pages: pageCount)
            let tracker = try DirtyTracker(range: mapping.range, engine: engine)
            scope.track(tracker.uffd)
            try await tracker.start()
            let state = RaceState()
            defer { state.started.store(Int.max, ordering: .releasing) }  // the writer never waits on a failed test
            // state.done: writes completed. Write j stores j into page j % pageCount, then publishes done = j + 1.
            // state.started: collections begun; epoch r waits for the start of collection r.
            let base = mapping.address, pageSize = systemPageSize
            let writer = OffPoolThread(name: "uffd-track-racer") {
                for epoch in 0..<rounds {
                    while state.started.load(ordering: .acquiring) <= epoch { usleep(20) }
                    for index in epoch * writesPerRound..<(epoch + 1) * writesPerRound {
                        UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(index % pageCount * pageSize))!.pointee = UInt64(index)
                        state.done.store(index + 1, ordering: .releasing)
                    }
                }
                return writes
            }
            var observed: [RacedRound] = []
            for round in 0..<rounds {
                // The previous epoch must be complete (so each collection races its own epoch).
                while state.done.load(ordering: .acquiring) < round * writesPerRound && !writer.isFinished {
                    try await Task.sleep(for: .microseconds(100))
                }
                let before = state.done.load(ordering: .acquiring)
                state.started.store(round + 1, ordering: .releasing)
                let dirty = Set(try await tracker.collectPages())
                observed.append(RacedRound(before: before, after: state.done.load(ordering: .acquiring), pages: dirty))
            }
            #expect(await writer.value == writes)
            let last = Set(try await tracker.collectPages())
            observed.append(RacedRound(before: writes, after: writes, pages: last))
            #expect(observed.allSatisfy { $0.pages.allSatisfy { (0..<pageCount).contains($0) } })
            var lost: [Int] = []
            for write in 0..<writes {
                let window = Self.roundsThatMayReport(write: write, rounds: observed)
                if !observed[window].contains(where: { $0.pages.contains(write % pageCount) }) { lost.append(write) }
            }
            #expect(lost.isEmpty, "\(lost.count) of \(writes) writes lost with \(engine), first \(lost.prefix(5))")
            // The last page values landed (the tracker never dropped a write on the floor either).
            for page in 0..<pageCount {
                let lastWrite = (writes - 1) - ((writes - 1 - page) % pageCount)
                #expect(UnsafePointer<UInt64>(bitPattern: base + UInt(page * pageSize))!.pointee == UInt64(lastWrite))
            }
            await tracker.stop()
        }
    }

    /// The rounds one of which must report write `write`, from what the test saw around each `collect()`.
    ///
    /// The writer stores write j, then publishes `done = j + 1`; it may be preempted between the two for any number of
    /// rounds. So:
    /// - the latest round is the first whose `before` exceeds j: the store was done before that collection began;
    /// - the earliest is the one after the last round whose `after` was below j: the writer had not published j - 1's
    ///   completion when that collection ended, so write j's store came after it;
    /// - every round in between may have reported it (the store is visible before its `done`).
    static func roundsThatMayReport(write: Int, rounds: [RacedRound]) -> ClosedRange<Int> {
        let latest = rounds.firstIndex { $0.before > write }!
        let earliest = rounds.lastIndex { $0.after < write }.map { $0 + 1 } ?? 0
        return earliest...latest
    }

    /// A child process's memory, tracked here through the child's own userfaultfd and pid: the userfaultfd copied in
    /// with pidfd_getfd, or handed over by the child over a Unix socket (SCM_RIGHTS) — one process asking another to
    /// track its writes.
    @Test(.timeLimit(.minutes(1)), arguments: engines, [false, true])
    func tracksAnotherProcess(engine: DirtyTracker.Engine, handedOver: Bool) async throws {
        let pageCount = 16
        let features: UserfaultFeatures = engine == .asyncScan ? [.pagefaultFlagWP, .wpAsync, .wpUnpopulated] : [.pagefaultFlagWP, .wpUnpopulated]
        try await withFaultWatchdog(seconds: 30) { scope in
            let child = try await TrackedChild.spawn(scope, pageCount: pageCount, features: features, handOver: handedOver)
            let (pid, commandFD, replyFD, uffd, range) = (child.pid, child.commandFD, child.replyFD, child.uffd, child.range)
            defer { child.closePipes() }
            let tracker = try DirtyTracker(range: range, uffd: uffd, pid: pid, registering: false)
            #expect(tracker.engine == engine)
            try await tracker.start()
            func childWrites(_ pages: [Int]) async -> Bool {
                for page in pages {
                    var value = UInt32(page)
                    guard Glibc.write(commandFD, &value, 4) == 4, await waitReadable(replyFD, seconds: 10) else { return false }
                    var ack: UInt8 = 0
                    guard read(replyFD, &ack, 1) == 1 else { return false }
                }
                return true
            }
            for pattern in [[1, 2, 3, 9], [0, 15], [4, 9, 10, 11, 12]] {
                #expect(await childWrites(pattern))
                #expect(Set(try await tracker.collectPages()) == Set(pattern))
            }
            child.quit()
            #expect(await waitForChild(pid, seconds: 10) == 0)
            scope.reaped(child: pid)
        }
    }

    /// A LazyRegion created with tracking: pages faulted in by reads are clean; only written pages are reported.
    @Test(.timeLimit(.minutes(1)), arguments: engines)
    func tracksALazyRegion(engine: DirtyTracker.Engine) async throws {
        let pageSize = systemPageSize
        let source = (0..<(16 * pageSize)).map { UInt8(truncatingIfNeeded: $0 / pageSize + 1) }
        try await withFaultWatchdog(seconds: 30) { scope in
            try await LazyRegion.with(length: source.count, provider: MemoryProvider(source),
                                      options: .init(readahead: .none), tracking: engine) { region in
                scope.track(region.uffd)
                let tracker = try DirtyTracker(region: region)
                try await tracker.start()
                let base = UInt(bitPattern: region.baseAddress)
                let reader = OffPoolThread(name: "uffd-track-read") { (0..<8).map { peek(base + UInt($0 * pageSize)) } }
                #expect(await reader.finishes(within: 10))
                #expect(await reader.value == (0..<8).map { UInt8($0 + 1) })
                // Writes to a page read before, and to pages never touched (a MISSING fault, then the write).
                #expect(await Self.write([2, 5, 12], at: base, threads: 2, value: 0xEE))
                #expect(Set(try await tracker.collectPages()) == [2, 5, 12])
                #expect(peek(base + UInt(12 * pageSize)) == 13, "a page faulted in by a write keeps the provider's data")
                #expect(Set(try await tracker.collectPages()).isEmpty)
            }
        }
    }
}

/// `uffd track` checks each round against what it wrote.
@Suite("uffd track")
struct TrackCommandTests {
    @Test(.timeLimit(.minutes(1)), arguments: DirtyTrackerTests.engines)
    func everyRoundMatches(engine: DirtyTracker.Engine) async throws {
        let lines = Mutex<[String]>([])
        let matched = try await TrackCommand(pages: 48, rounds: 3, engine: engine, seed: 7).run { line in lines.withLock { $0.append(line) } }
        #expect(matched)
        let output = lines.withLock { $0 }
        #expect(output.filter { $0.hasPrefix("round ") && $0.hasSuffix(" ok") }.count == 3, "\(output)")
    }
}

/// A tracked range that is unmapped in part, or moved away, makes `collect()` throw instead of reporting a partial set.
/// (Another test's mapping may land in the hole meanwhile: that is the same error, the range is no longer registered.)
@Suite("Dirty tracking after munmap and mremap")
struct DirtyTrackerRangeTests {
    /// What `collect()` threw: nil when it returned, "notRegistered: <detail>", or another error's description.
    static func collectFailure(_ tracker: DirtyTracker) async -> String? {
        do {
            _ = try await tracker.collect()
            return nil
        } catch {
            guard case .notRegistered = error.code else { return "unexpected error \(error)" }
            return "notRegistered: \(error.detail)"
        }
    }

    /// A started tracker of `pages` fresh pages, under a watchdog; stopped after `body`.
    static func withStartedTracker(
        pages: Int, engine: DirtyTracker.Engine, _ body: (FaultScope, TestMapping, DirtyTracker) async throws -> Void
    ) async throws {
        try await withFaultWatchdog(seconds: 30) { scope in
            let mapping = try scope.makeMapping(pages: pages)
            let tracker = try DirtyTracker(range: mapping.range, engine: engine)
            scope.track(tracker.uffd)
            try await tracker.start()
            try await body(scope, mapping, tracker)
            await tracker.stop()
        }
    }

    @Test(.timeLimit(.minutes(1)), arguments: DirtyTrackerTests.engines)
    func partlyUnmappedRangeIsAnError(engine: DirtyTracker.Engine) async throws {
        try await Self.withStartedTracker(pages: 16, engine: engine) { scope, mapping, tracker in
            #expect(await DirtyTrackerTests.write([1, 10], at: mapping.address, threads: 1, value: 7))
            let before = try await tracker.collect()
            #expect(DirtyTrackerTests.pages(before, from: mapping.address) == [1, 10])
            #expect(munmap(UnsafeMutableRawPointer(bitPattern: mapping.page(4)), 4 * systemPageSize) == 0)
            // Pages 4-7 are no longer ours (another test may map them at once): tear-down unmaps the rest only.
            mapping.markUnmapped()
            let (head, tail) = (mapping.pages(0, count: 4), mapping.pages(8, count: 8))
            scope.onTearDown { for part in [head, tail] { munmap(part.pointer, part.length) } }
            let failure = await Self.collectFailure(tracker)
            #expect(failure?.hasPrefix("notRegistered") == true, "\(failure ?? "no error")")
            // Still an error on the next round: the range stays incomplete.
            #expect(await Self.collectFailure(tracker)?.hasPrefix("notRegistered") == true)
        }
    }

    @Test(.timeLimit(.minutes(1)), arguments: DirtyTrackerTests.engines)
    func rangeMovedByMremapIsAnError(engine: DirtyTracker.Engine) async throws {
        try await Self.withStartedTracker(pages: 8, engine: engine) { scope, mapping, tracker in
            let target = try scope.makeMapping(pages: 8)  // replaced by the move
            let moved = cuffd_test_mremap_fixed(UnsafeMutableRawPointer(bitPattern: mapping.address), mapping.length,
                                                UnsafeMutableRawPointer(bitPattern: target.address))
            #expect(UInt(bitPattern: moved) == target.address)
            mapping.markUnmapped()  // its old range is no longer ours; the memory is `target`'s now
            let failure = await Self.collectFailure(tracker)
            #expect(failure?.hasPrefix("notRegistered") == true, "\(failure ?? "no error")")
        }
    }
}
