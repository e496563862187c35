import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import Userfaultfd

/// A LazyRegion follows its memory's life: mremap, munmap, fork, and MINOR faults on shared memory.
@Suite("Region events")
struct RegionEventTests {
    static let pageSize = systemPageSize

    static func counted(_ source: [UInt8], _ calls: CallLog) -> ClosureProvider {
        ClosureProvider(size: source.count) { buffer, offset in
            calls.record(offset, buffer.count)
            return .bytes(fillBuffer(buffer, from: source, at: offset))
        }
    }

    /// mremap of a live region: faults at the new address are served, present pages moved along, and the region
    /// reports (and at close unmaps) its new range.
    @Test(.timeLimit(.minutes(1)))
    func remappedRegionIsServedAtItsNewAddress() async throws {
        let source = SeededBytes.make(count: 8 * Self.pageSize, seed: 501)
        let calls = CallLog()
        try await withFaultWatchdog(seconds: 20) { scope in
            try await withWatchedRegion(scope, length: source.count, provider: Self.counted(source, calls),
                                        options: .init(readahead: .none)) { region in
                #expect(await finished(readByteOnThread(region, at: 3), releasing: region.uffd) == source[3])
                let old = UInt(bitPattern: region.baseAddress)
                let target = try TestMapping(pages: 8)  // a place to move to (replaced by the move)
                let mover = OffPoolThread(name: "uffd-ev-mremap") {
                    UInt(bitPattern: cuffd_test_mremap_fixed(UnsafeMutableRawPointer(bitPattern: old), source.count, target.pointer))
                }
                let moved = await finished(mover, releasing: region.uffd)
                #expect(moved == target.address)
                #expect(await pollUntil { UInt(bitPattern: region.baseAddress) == target.address })
                #expect(region.currentRanges.count == 1 && region.currentRanges.first?.range.start == target.address)
                let bytes = await finished(copyOnThread(region, offset: 0, length: source.count), releasing: region.uffd)
                #expect(bytes.map { firstDifference($0, source) } == .some(nil))
                #expect(calls.count(at: 0) == 1, "page 0 moved with its data, not fetched again: \(calls.all)")
                #expect(await region.settledStatistics.unservedFaults == 0)
            }
        }
    }

    /// munmap of part of a region: the resolver drops that range (no errors, no unserved faults) and keeps serving the rest.
    @Test(.timeLimit(.minutes(1)))
    func unmappedPartIsDroppedCleanly() async throws {
        let source = SeededBytes.make(count: 16 * Self.pageSize, seed: 502)
        try await withFaultWatchdog(seconds: 20) { scope in
            try await withWatchedRegion(scope, length: source.count, provider: MemoryProvider(source),
                                        options: .init(readahead: .none)) { region in
                let base = UInt(bitPattern: region.baseAddress)
                let unmapper = OffPoolThread(name: "uffd-ev-munmap") {
                    munmap(UnsafeMutableRawPointer(bitPattern: base + UInt(8 * Self.pageSize)), 8 * Self.pageSize)
                }
                #expect(await finished(unmapper, releasing: region.uffd) == 0)
                #expect(await pollUntil { region.currentRanges.map(\.range) == [MemoryRange(start: base, length: 8 * Self.pageSize)] })
                let bytes = await finished(copyOnThread(region, offset: 0, length: 8 * Self.pageSize), releasing: region.uffd)
                #expect(bytes.map { firstDifference($0, Array(source[0..<8 * Self.pageSize])) } == .some(nil))
                let statistics = await region.settledStatistics
                #expect(statistics.unservedFaults == 0 && statistics.providerErrors == 0, "\(statistics)")
                #expect(statistics.events >= 1)
                #expect(await firstElement(of: region.errors, within: 0.2) == nil)
            }
        }
    }

    /// fork with `serveForkedChildren`: the child's fault gets the provider's byte, the child's resolver is let go once
    /// it has exited, and the parent is unaffected (its page is still missing afterwards, and its resolver never saw the
    /// child's fault). Without the option the child's
    /// copy is ordinary anonymous memory (it reads a zero).
    ///
    /// Run in a child process (`uffd-forked-region`, Tests/ForkedRegion): an EVENT_FORK userfaultfd makes every fork in
    /// its process wait until its reader has read the FORK event, and gets a userfaultfd for each of those children. In
    /// the test runner, that coupled this test with every other test that forks (raw clones on pool threads among them),
    /// and the parallel suite stalled. The helper process forks only once, so its counters are exact.
    @Test(.timeLimit(.minutes(1)), arguments: [true, false])
    func forkedChildIsServedWhenTheRegionOptsIn(serving: Bool) async throws {
        let outcome = try await ChildProcess.run(ChildProcess.builtExecutable("uffd-forked-region"),
                                                 [serving ? "--serve" : "--no-serve"], timeout: .seconds(40))
        #expect(!outcome.timedOut)
        #expect(outcome.status == 0, "uffd-forked-region failed: \(outcome.stderr)")
        let expected = serving
            ? "OK serving=true childStatus=0 forkedChildrenServed=1 forkedChildrenExited=1 parentFaults=0->1"
            : "OK serving=false childStatus=3 forkedChildrenServed=0 forkedChildrenExited=0 parentFaults=0->1"
        #expect(outcome.stdout.trimmingCharacters(in: .whitespacesAndNewlines) == expected, "stderr: \(outcome.stderr)")
    }

    /// A FORK event first read while the process is out of descriptors (`read(2)` fails with EMFILE: the kernel cannot
    /// install the child's userfaultfd, and leaves the event queued): the reader reports the error and keeps trying, so
    /// once the limit is raised the event is read, the fork returns and the child is served. In a child process
    /// (`uffd-forked-region --emfile`): it lowers RLIMIT_NOFILE, which must never happen in the test runner.
    @Test(.timeLimit(.minutes(1)))
    func forkEventReadFailingWithEMFILEIsRetried() async throws {
        let outcome = try await ChildProcess.run(ChildProcess.builtExecutable("uffd-forked-region"), ["--emfile"],
                                                 timeout: .seconds(40))
        #expect(!outcome.timedOut)
        #expect(outcome.status == 0, "uffd-forked-region failed: \(outcome.stderr)")
        #expect(outcome.stdout.trimmingCharacters(in: .whitespacesAndNewlines)
                == "OK emfile reported=EMFILE childStatus=0 forkedChildrenServed=1", "stderr: \(outcome.stderr)")
    }

    /// A resolver whose `forkedChildren` nobody consumes, forked 300 times: the userfaultfds it keeps for a later
    /// consumer stay bounded (the oldest are closed), and closing the resolver's userfaultfd closes those it kept. In a
    /// child process (`uffd-forked-region --unconsumed-forks`), where the only forks are its own and /proc/self/fd
    /// counts only its descriptors.
    @Test(.timeLimit(.minutes(1)))
    func unconsumedForkedChildrenKeepBoundedDescriptors() async throws {
        let outcome = try await ChildProcess.run(ChildProcess.builtExecutable("uffd-forked-region"), ["--unconsumed-forks"],
                                                 timeout: .seconds(50))
        #expect(!outcome.timedOut)
        #expect(outcome.status == 0, "uffd-forked-region failed: \(outcome.stderr)")
        #expect(outcome.stdout.hasPrefix("OK unconsumed forks=300"), "stderr: \(outcome.stderr)")
    }

    /// MINOR over a memfd: content is right; a second mapping of the memfd sees the page without another provider
    /// read; a page filled through another mapping is mapped with a MINOR fault, no provider read.
    @Test(.timeLimit(.minutes(1)))
    func sharedMemoryRegionServesThroughThePageCache() async throws {
        let source = SeededBytes.make(count: 8 * Self.pageSize, seed: 504)
        let calls = CallLog()
        try await withFaultWatchdog(seconds: 20) { scope in
            try await LazyRegion.with(length: source.count, provider: Self.counted(source, calls),
                                      options: .init(readahead: .none), backing: .sharedMemory) { region in
                scope.track(region.uffd)
                let file = try #require(region.sharedFile)
                let bytes = await finished(copyOnThread(region, offset: Self.pageSize, length: Self.pageSize), releasing: region.uffd)
                #expect(bytes.map { firstDifference($0, Array(source[Self.pageSize..<2 * Self.pageSize])) } == .some(nil))
                #expect(calls.count(at: Self.pageSize) == 1)
                let second = try file.map()
                defer { second.unmap() }
                let seen = second.withUnsafeBytes { Array($0[Self.pageSize..<2 * Self.pageSize]) }
                #expect(firstDifference(seen, Array(source[Self.pageSize..<2 * Self.pageSize])) == nil)
                #expect(calls.all.count == 1, "\(calls.all)")
                // Page 6 written through the other mapping: the region maps that page (MINOR), the provider is not asked.
                _ = second.withUnsafeBytes { memset(UnsafeMutableRawPointer(mutating: $0.baseAddress! + 6 * Self.pageSize), 0x42, Self.pageSize) }
                #expect(await finished(readByteOnThread(region, at: 6 * Self.pageSize + 9), releasing: region.uffd) == 0x42)
                #expect(calls.count(at: 6 * Self.pageSize) == 0, "\(calls.all)")
                #expect(await region.settledStatistics.minorFaults == 1)
            }
        }
    }
}
