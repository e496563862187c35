import CUserfaultfd
import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import Userfaultfd
import UserfaultfdFirecracker

/// Who may connect to the page server and be served: the socket file's permissions, the SO_PEERCRED check, and the
/// check of the received descriptor where /proc is not usable.
extension FirecrackerPageServerTests {
    static func permissions(of path: String) throws -> (mode: mode_t, group: gid_t) {
        var info = stat()
        guard stat(path, &info) == 0 else { throw ChildProcessError("stat \(path): errno \(errno)") }
        return (info.st_mode & 0o7777, info.st_gid)
    }

    @Test(.timeLimit(.minutes(1)))
    func theSocketIsOnlyForItsOwnerByDefault() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: Self.regionSize, seed: 21)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        let socket = try Self.permissions(of: running.socketPath)
        await running.stop()
        #expect(String(socket.mode, radix: 8) == "600", "whoever can connect gets the snapshot")
    }

    @Test(.timeLimit(.minutes(1)))
    func aSocketForAGroupGetsThatModeAndGroup() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: Self.regionSize, seed: 22)
        let running = try RunningServer(directory: directory, memoryPath: memory.path) {
            $0.socketMode = 0o660
            $0.socketGroup = 4242
        }
        let socket = try Self.permissions(of: running.socketPath)
        await running.stop()
        #expect(String(socket.mode, radix: 8) == "660")
        #expect(socket.group == 4242)
    }

    /// Root (this test process's children) is not in the allowed users: it is refused, logged and served nothing;
    /// allowed by its group instead, the same VMM is served.
    @Test(.timeLimit(.minutes(2)))
    func aPeerWhoseUserIsNotAllowedIsRefusedAndServedNothing() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 23)
        let refusing = try RunningServer(directory: directory, memoryPath: memory.path) { $0.allowedUserIDs = [4242] }
        let refused = try await refusing.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", "expect-refusal"],
                                             timeout: .seconds(20))
        let served = refusing.server.vms
        await refusing.stop()
        #expect(refused.status == 0 && refused.stdout.contains("REJECTED"), "stderr: \(refused.stderr)\nlog: \(refusing.log)")
        #expect(served.isEmpty, "nothing is served to a refused peer: \(served)")
        #expect(refusing.log.contains("refused connection from pid") && refusing.log.contains("uid 0"), "log: \(refusing.log)")

        let byGroup = try RunningServer(directory: directory, memoryPath: memory.path) {
            $0.allowedUserIDs = [4242]
            $0.allowedGroupIDs = [getegid()]
        }
        let outcome = try await byGroup.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)"], timeout: .seconds(20))
        await byGroup.stop()
        #expect(outcome.status == 0 && outcome.stdout.contains("OK pages=512"), "stderr: \(outcome.stderr)\nlog: \(byGroup.log)")
    }

    /// Without /proc (here: a directory that does not exist in its place) a userfaultfd is still recognised, by the
    /// kernel's answer to UFFDIO_WAKE, and anything else still refused.
    @Test(.timeLimit(.minutes(1)))
    func aReceivedUserfaultfdIsRecognisedWithoutProc() throws {
        let noProc = "/nonexistent-proc/self/fd"
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        try UserfaultFD.validateUserfaultfd(uffd.fileDescriptor, fdDirectory: noProc)
        try UserfaultFD.validateUserfaultfd(uffd.fileDescriptor)

        var ends: [Int32] = [0, 0]
        #expect(pipe(&ends) == 0)
        let epoll = cuffd_test_epoll_create()
        let eventDescriptor = cuffd_test_eventfd()
        let regularFile = open("/etc/hostname", O_RDONLY | O_CLOEXEC)
        let device = open("/dev/null", O_RDONLY | O_CLOEXEC)
        defer { [ends[0], ends[1], epoll, eventDescriptor, regularFile, device].forEach { _ = close($0) } }
        for (name, descriptor) in [("pipe", ends[0]), ("epoll", epoll), ("eventfd", eventDescriptor),
                                   ("regular file", regularFile), ("device", device), ("not open", 987_654)] {
            #expect(throws: UserfaultError.self, "\(name) is not a userfaultfd") {
                try UserfaultFD.validateUserfaultfd(descriptor, fdDirectory: noProc)
            }
            #expect(!UserfaultFD.probeUserfaultfd(descriptor), "\(name)")
        }
        #expect(UserfaultFD.probeUserfaultfd(uffd.fileDescriptor))
    }
}

extension FirecrackerPageServerTests {
    /// Without a pidfd (kernels before 5.3), a VMM that closed the socket after the handshake is still served, and its
    /// exit is noticed by probing its userfaultfd's address space (about once a second).
    @Test(.timeLimit(.minutes(2)))
    func withoutAPidfdTheVMMsExitIsNoticedByProbing() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 24)
        let running = try RunningServer(directory: directory, memoryPath: memory.path) { $0.watchesPeerProcess = false }
        let outcome = try await running.vmm(
            ["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", "close-after-send"], timeout: .seconds(20))
        #expect(!outcome.timedOut && outcome.status == 0 && outcome.stdout.contains("OK pages=512"),
                "stderr: \(outcome.stderr)\nlog: \(running.log)")
        try await Self.waitUntilAllDisconnected(running.server, limit: .seconds(5))
        let vms = running.server.vms
        await running.stop()
        #expect(vms.count == 1 && vms.allSatisfy { !$0.isConnected }, "log: \(running.log)")
        #expect(running.log.contains("disconnected (the VMM exited)"), "log: \(running.log)")
    }
}

extension FirecrackerPageServerTests {
    /// A VMM (or a script) that waits for the socket file and then connects must never be refused: the file appears
    /// only once the socket listens, with its final permissions. A thread spins on `lstat` and connects the moment the
    /// path exists, while the listener is created, 200 times.
    @Test(.timeLimit(.minutes(1)))
    func theSocketFileAppearsOnlyOnceItAcceptsConnections() async throws {
        let directory = try TemporaryDirectory()
        var refused: [String] = []
        for round in 0..<200 {
            let path = "\(directory.path)/ready-\(round).sock"
            let connector = OffPoolThread(name: "uffd-test-connector") { () -> (errno: Int32, mode: mode_t) in
                let deadline = ContinuousClock.now + .seconds(5)
                var info = stat()
                while lstat(path, &info) != 0 {
                    if ContinuousClock.now > deadline { return (ETIMEDOUT, 0) }
                }
                let mode = info.st_mode & 0o7777
                let descriptor = cuffd_unix_connect(path)
                guard descriptor >= 0 else { return (errno, mode) }
                close(descriptor)
                return (0, mode)
            }
            let listener = try UnixSocketListener(path: path)
            let outcome = await connector.value
            listener.close()
            if outcome.errno != 0 || outcome.mode != 0o600 {
                refused.append("round \(round): errno \(outcome.errno), mode \(String(outcome.mode, radix: 8))")
            }
        }
        #expect(refused.isEmpty, "connected as soon as the socket file existed: \(refused.count) of 200 refused or not yet 0600: \(refused.prefix(5))")
    }
}
