import Foundation
import Glibc
import Testing
import Userfaultfd
import UserfaultfdFirecracker

/// The page server against peers and conditions that once took it down or froze its VMs: a VMM that closes the socket
/// after the handshake (Firecracker before 1.12), a full descriptor table, a memory file truncated under it.
extension FirecrackerPageServerTests {
    /// `uffd serve` as a child process (optionally under `prlimit`), once its socket exists.
    static func startServe(_ directory: TemporaryDirectory, memory: String, extra: [String] = [],
                           descriptorLimit: Int? = nil) async throws -> (serve: ChildProcess.Running, socket: String) {
        let socket = "\(directory.path)/serve.sock"
        let uffd = try ChildProcess.builtExecutable("uffd")
        let command = ["serve", "--socket", socket, "--memory", memory] + extra
        let serve = try descriptorLimit.map { limit in
            try ChildProcess.start("/usr/bin/prlimit", ["--nofile=\(limit):\(limit)", uffd] + command)
        } ?? ChildProcess.start(uffd, command)
        let deadline = ContinuousClock.now + .seconds(10)
        while !FileManager.default.fileExists(atPath: socket), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        return (serve, socket)
    }

    /// Waits (up to `limit`) until no VM of `server` is connected.
    static func waitUntilAllDisconnected(_ server: FirecrackerPageServer, limit: Duration = .seconds(5)) async throws {
        let deadline = ContinuousClock.now + limit
        while server.vms.contains(where: \.isConnected), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
    }

    /// Firecracker before 1.12 closes its end of the socket once the regions and the uffd are sent. The VM must still
    /// be served (the session follows the VMM's process, not the socket), and its exit must still end the session.
    @Test(.timeLimit(.minutes(2)))
    func aVMMThatClosesTheSocketAfterTheHandshakeIsServedAndItsExitNoticed() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 11)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        let outcome = try await running.vmm(
            ["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", "close-after-send", "--balloon"],
            timeout: .seconds(20))
        #expect(!outcome.timedOut && outcome.status == 0 && outcome.stdout.contains("OK pages=512 zeroPages=128"),
                "the VM froze or failed: \(outcome.stderr)\nlog: \(running.log)")
        try await Self.waitUntilAllDisconnected(running.server)
        let vms = running.server.vms
        await running.stop()
        #expect(vms.count == 1 && vms.allSatisfy { !$0.isConnected }, "the server noticed the VMM's exit: \(running.log)")
        #expect(vms.first?.statistics.pagesCopied == 512)
        #expect(running.log.contains("exited"), "log: \(running.log)")
    }

    /// 70 connections that never send a handshake, against a server limited to 64 descriptors: the server refuses
    /// what it cannot hold (a log line), survives, and serves the next VMM.
    @Test(.timeLimit(.minutes(2)))
    func idleConnectionsBeyondTheDescriptorLimitDoNotStopTheServer() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 12)
        let (serve, socket) = try await Self.startServe(directory, memory: memory.path, descriptorLimit: 64)
        var idle: [UnixSocketConnection] = []
        for _ in 0..<70 { idle.append(try UnixSocketConnection.connect(path: socket)) }
        try await Task.sleep(for: .milliseconds(1500))
        idle.forEach { $0.close() }
        idle.removeAll()
        let vmm = try await ChildProcess.run(ChildProcess.builtExecutable("uffd-fake-vmm"),
                                             ["--socket", socket, "--memory", memory.path, "--regions", "2",
                                              "--region-size", "\(Self.regionSize)"], timeout: .seconds(20))
        let stillRunning = serve.process.isRunning
        serve.signal(SIGTERM)
        let outcome = try await serve.wait(timeout: .seconds(20))
        #expect(stillRunning, "uffd serve died: \(outcome.stderr.suffix(2000))")
        #expect(!vmm.timedOut && vmm.status == 0 && vmm.stdout.contains("OK pages=512"),
                "the VMM after the idle connections: \(vmm.stderr)\nuffd serve: \(outcome.stderr.suffix(2000))")
        #expect(outcome.status == 0 && !outcome.signalled, "uffd serve: \(outcome.stderr.suffix(2000))")
        #expect(outcome.stderr.contains("refused"), "a refused peer is logged: \(outcome.stderr.suffix(2000))")
    }

    /// The memory file shrinks under a running server: the VM reading past the new end gets its failure policy
    /// (SIGBUS by default), the server logs it and keeps serving everyone else.
    @Test(.timeLimit(.minutes(2)))
    func aTruncatedMemoryFileCostsTheReadNotTheServer() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 13)
        let original = "\(directory.path)/original.mem"
        try Data(memory.bytes).write(to: URL(fileURLWithPath: original))
        let (serve, socket) = try await Self.startServe(directory, memory: memory.path)
        guard truncate(memory.path, off_t(Self.regionSize)) == 0 else { throw ChildProcessError("truncate: errno \(errno)") }
        let fakeVMM = try ChildProcess.builtExecutable("uffd-fake-vmm")
        let victim = try await ChildProcess.run(fakeVMM, ["--socket", socket, "--memory", memory.path, "--compare", original,
                                                          "--regions", "2", "--region-size", "\(Self.regionSize)"],
                                                timeout: .seconds(20))
        let survivedVictim = serve.process.isRunning
        let next = try await ChildProcess.run(fakeVMM, ["--socket", socket, "--memory", memory.path, "--compare", original,
                                                        "--regions", "1", "--region-size", "\(Self.regionSize)"],
                                              timeout: .seconds(20))
        let stillRunning = serve.process.isRunning
        serve.signal(SIGTERM)
        let outcome = try await serve.wait(timeout: .seconds(20))
        #expect(survivedVictim && stillRunning, "uffd serve died: signalled \(outcome.signalled), status \(outcome.status): \(outcome.stderr.suffix(2000))")
        // Built with a sanitizer, the fake VMM's SIGBUS is caught by the sanitizer's handler, which reports it and exits
        // with its own status instead of dying of the signal.
        let sanitizerSawBUS = victim.stderr.contains("Sanitizer: BUS")
        #expect(!victim.timedOut && (victim.signalled || victim.status == 1 || sanitizerSawBUS),
                "the VM past the end gets SIGBUS (default policy), never a hang: \(victim.stderr)")
        #expect(!next.timedOut && next.status == 0 && next.stdout.contains("OK pages=256"), "the next VM: \(next.stderr)")
        #expect(outcome.status == 0 && !outcome.signalled)
        #expect(outcome.stderr.contains("truncated"), "the short read is logged: \(outcome.stderr.suffix(2000))")
    }
}

extension FirecrackerPageServerTests {
    /// The statuses of disconnected VMs are bounded: only the newest `finishedHistory` are kept.
    @Test(.timeLimit(.minutes(2)))
    func onlyTheNewestFinishedVMsAreRemembered() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: Self.regionSize, seed: 14)
        let running = try RunningServer(directory: directory, memoryPath: memory.path) { $0.finishedHistory = 2 }
        for _ in 0..<3 {
            let outcome = try await running.vmm(["--regions", "1", "--region-size", "\(Self.regionSize)"], timeout: .seconds(20))
            #expect(outcome.status == 0, "stderr: \(outcome.stderr)")
        }
        try await Self.waitUntilAllDisconnected(running.server)
        let vms = running.server.vms
        await running.stop()
        #expect(vms.map(\.id) == [2, 3], "the newest two of three: \(vms.map(\.id))")
    }
}

extension FirecrackerPageServerTests {
    /// The listener's reserve descriptor, in a child process whose descriptor limit is lowered to 64 and whose table is
    /// then filled: accept throws descriptorsExhausted after closing one waiting peer, and accepts again later.
    @Test(.timeLimit(.minutes(1)))
    func aFullDescriptorTableClosesOneWaitingPeerAndAcceptKeepsWorking() async throws {
        let directory = try TemporaryDirectory()
        let outcome = try await ChildProcess.run(ChildProcess.builtExecutable("uffd-fake-vmm"),
                                                 ["--socket", "\(directory.path)/emfile.sock", "--memory", "/dev/null",
                                                  "--mode", "listener-emfile"], timeout: .seconds(20))
        #expect(outcome.status == 0 && outcome.stdout.contains("OK exhausted-then-accepted"),
                "stdout: \(outcome.stdout) stderr: \(outcome.stderr)")
    }
}

extension FirecrackerPageServerTests {
    /// The same flood, left open: the connections holding handshake slots time out (`--handshake-timeout 1`), the rest
    /// were refused at once, and a VMM arriving later is served while all 70 are still open on the client side.
    @Test(.timeLimit(.minutes(2)))
    func aFloodOfIdleConnectionsLeftOpenDoesNotLockOutTheNextVMM() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 15)
        let (serve, socket) = try await Self.startServe(directory, memory: memory.path, extra: ["--handshake-timeout", "1"],
                                                        descriptorLimit: 64)
        let idle = try (0..<70).map { _ in try UnixSocketConnection.connect(path: socket) }
        try await Task.sleep(for: .milliseconds(2500))
        let vmm = try await ChildProcess.run(ChildProcess.builtExecutable("uffd-fake-vmm"),
                                             ["--socket", socket, "--memory", memory.path, "--regions", "2",
                                              "--region-size", "\(Self.regionSize)"], timeout: .seconds(20))
        idle.forEach { $0.close() }
        serve.signal(SIGTERM)
        let outcome = try await serve.wait(timeout: .seconds(20))
        #expect(!vmm.timedOut && vmm.status == 0 && vmm.stdout.contains("OK pages=512"),
                "stderr: \(vmm.stderr)\nuffd serve: \(outcome.stderr.suffix(2000))")
        #expect(outcome.status == 0 && !outcome.signalled, "uffd serve: \(outcome.stderr.suffix(2000))")
        #expect(outcome.stderr.contains("handshake rejected: wait: timedOut"))
    }
}
