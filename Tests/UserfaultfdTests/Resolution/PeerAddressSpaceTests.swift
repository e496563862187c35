import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import Userfaultfd

extension ResolutionTests {
    /// A resolver serving another process's userfaultfd (received over a socket, as a page server receives a VM's)
    /// must judge the peer's pages by the peer's address space, never by what this process has mapped at the same
    /// addresses.
    @Suite("Another process's memory")
    struct PeerAddressSpace {
        /// The peer faults page 1 in (served), then zaps it with MADV_DONTNEED, which its userfaultfd (no EVENT_REMOVE)
        /// does not report: the resolver still records the page as present. The peer's next fault there must be served
        /// again from the provider. This process has a page resident at the very same address all along; before the fix
        /// the resolver asked `mincore` here, took the peer's fault for a duplicate and only woke it: the peer faulted
        /// again forever (a livelock, until the watchdog).
        ///
        /// The peer is a raw clone of the test process (`cuffd_res_spawn_peer`), so TSan skips this test (`.ci/run`).
        @Test(.timeLimit(.minutes(1)))
        func peerPageZappedWhereThisProcessHasOneIsServedAgain() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 4 * pageSize, seed: 901)
            let calls = CallLog()
            let provider = RegionEventTests.counted(source, calls)
            try await withFaultWatchdog(seconds: 30) { scope in
                // This process's own memory at the peer's addresses, every page resident and unlike the provider's data.
                let mine = try scope.makeMapping(pages: 4)
                memset(mine.pointer, 0xEE, mine.length)
                let peer = try await Self.spawnPeer(scope, at: mine)
                defer { close(peer.commands); close(peer.socket) }
                let resolver = FaultResolver(uffd: peer.uffd, options: .init(readahead: .none))
                try await resolver.serve(mine.range, provider: provider)
                try resolver.start()

                #expect(try await Self.ask(peer, 1, "the first read of page 1", resolver) == source[pageSize + 7])
                #expect(calls.count(at: pageSize) == 1)
                #expect(try await Self.ask(peer, 1 | 0x8000_0000, "the zap of page 1", resolver) == 1)
                #expect(try await Self.ask(peer, 1, "the read of page 1 after the zap", resolver) == source[pageSize + 7])
                #expect(calls.count(at: pageSize) == 2, "the zapped page was fetched again: \(calls.all)")
                #expect(resolver.statistics.alreadyPresentFaults == 0, "\(resolver.statistics)")
                #expect(peek(mine.page(1) + 7) == 0xEE, "this process's own page is untouched")

                var quit = UInt32.max
                _ = write(peer.commands, &quit, 4)
                #expect(await waitForChild(peer.pid, seconds: 10) == 0)
                scope.reaped(child: peer.pid)
            }
        }

        struct Peer {
            let pid: pid_t
            let commands: Int32
            let socket: Int32
            let uffd: UserfaultFD
        }

        static func spawnPeer(_ scope: FaultScope, at mapping: TestMapping) async throws -> Peer {
            // A raw clone waits in the kernel while another test's EVENT_FORK userfaultfd has not read its FORK event:
            // never on a pool thread.
            let spawner = OffPoolThread(name: "uffd-res-peer") { () -> (pid: pid_t, commands: Int32, socket: Int32, errno: Int32) in
                var commands: Int32 = -1, socket: Int32 = -1
                let pid = cuffd_res_spawn_peer(mapping.pointer, mapping.pages, &commands, &socket)
                return (pid, commands, socket, errno)
            }
            let spawned = await spawner.value
            guard spawned.pid > 0 else { throw TestFailure("clone failed: \(spawned.errno)") }
            scope.track(child: spawned.pid)
            do {
                let connection = UnixSocketConnection(descriptor: dup(spawned.socket))
                defer { connection.close() }
                let (uffd, payload) = try await UserfaultFD.receive(from: connection, maximumPayload: 16, timeout: .seconds(10))
                scope.track(uffd)
                let address = payload.prefix(8).enumerated().reduce(UInt(0)) { $0 | UInt($1.element) << (8 * $1.offset) }
                try #require(payload.count == 16 && address == mapping.address, "hello \(payload)")
                return Peer(pid: spawned.pid, commands: spawned.commands, socket: spawned.socket, uffd: uffd)
            } catch {
                close(spawned.commands)
                close(spawned.socket)
                throw error
            }
        }

        /// Sends one command to the peer and returns its answer, waiting at most 5 s for it (then throws, with the
        /// resolver's statistics).
        static func ask(_ peer: Peer, _ command: UInt32, _ what: String, _ resolver: FaultResolver) async throws -> UInt8 {
            var command = command
            try #require(write(peer.commands, &command, 4) == 4)
            guard await waitReadable(peer.socket, seconds: 5) else {
                var status: Int32 = 0
                let exited = cuffd_test_waitpid(peer.pid, &status, 1) == peer.pid
                throw TestFailure("the peer did not answer \(what) within 5 s"
                    + (exited ? " (it exited: \(cuffd_test_decode_status(status)))" : "") + "; \(resolver.statistics)")
            }
            var answer: UInt8 = 0
            try #require(read(peer.socket, &answer, 1) == 1)
            return answer
        }
    }
}
