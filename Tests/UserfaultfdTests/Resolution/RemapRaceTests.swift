import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import Userfaultfd

extension ResolutionTests {
    /// mremap while a provider read for the moved pages is in flight.
    @Suite("Remap during a read")
    struct RemapDuringARead {
        /// A thread faults page 3 and the read stalls in the provider; the region is moved (mremap MAYMOVE|FIXED); a
        /// thread faults page 3 at the new address; the read is let go. The new address's thread must get the
        /// provider's byte. Before the fix it joined the stale fetch for the old address, whose wake went to the old
        /// address, and hung until the watchdog.
        ///
        /// The kernel does not move a thread blocked on a fault: it sleeps on the *old* address until a wake for that
        /// address, then retries its access there, where nothing is mapped any more. An ordinary load would then die
        /// of SIGSEGV (as any access to unmapped memory), so the old address's access here is the kernel's: a
        /// `read(2)` from a pipe into the page, which the retry fails with `EFAULT`. That thread must return too (it is
        /// woken, not left asleep).
        @Test(.timeLimit(.minutes(1)))
        func faultAtTheNewAddressDuringAStalledReadIsServed() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 8 * pageSize, seed: 1301)
            let gate = ProviderGate(), log = CallLog(), entered = CallCounter()
            let provider = Races.gatedProvider(size: source.count, source: source, gatedPage: 3, gate: gate, log: log,
                                               entered: entered)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: .none)) { region in
                    let old = UInt(bitPattern: region.baseAddress)
                    var pipeEnds: [Int32] = [-1, -1]
                    try #require(pipe(&pipeEnds) == 0)
                    defer { close(pipeEnds[0]); close(pipeEnds[1]) }
                    var one: UInt8 = 1
                    try #require(write(pipeEnds[1], &one, 1) == 1)
                    let readEnd = pipeEnds[0]
                    let oldReader = OffPoolThread(name: "uffd-res-old-address") { () -> Int32 in
                        // The kernel copies the pipe's byte into the missing page: a kernel-mode fault.
                        let got = read(readEnd, UnsafeMutableRawPointer(bitPattern: old + UInt(3 * pageSize + 17)), 1)
                        return got < 0 ? -errno : Int32(got)
                    }
                    #expect(await pollUntil { entered.current == 1 }, "the provider was never asked for page 3")

                    let target = try TestMapping(pages: 8)  // a place to move to (replaced by the move)
                    let mover = OffPoolThread(name: "uffd-res-mremap") {
                        UInt(bitPattern: cuffd_test_mremap_fixed(UnsafeMutableRawPointer(bitPattern: old), source.count,
                                                                 target.pointer))
                    }
                    #expect(await finished(mover, within: 10, "mremap", releasing: region.uffd) == target.address)
                    #expect(await pollUntil { UInt(bitPattern: region.baseAddress) == target.address })

                    let newReader = readOnThread(target.address + UInt(3 * pageSize + 17))
                    #expect(await pollUntil { region.statistics.faults >= 2 }, "\(region.statistics)")
                    gate.open()
                    #expect(await finished(newReader, within: 5, "the reader at the new address",
                                           releasing: region.uffd) == source[3 * pageSize + 17])
                    #expect(await finished(oldReader, within: 5, "the reader at the old address",
                                           releasing: region.uffd) == -EFAULT)
                    #expect(firstDifference(regionBytes(region, offset: 3 * pageSize, count: pageSize),
                                            Array(source[3 * pageSize..<4 * pageSize])) == nil)
                    let stats = await region.settledStatistics
                    #expect(stats.unservedFaults == 0, "\(stats)")
                }
            }
        }
    }
}
