import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd
import UserfaultfdFirecracker

/// Log lines collected from any thread.
final class LogLines: Sendable {
    private let lines = Mutex<[String]>([])
    func append(_ line: String) { lines.withLock { $0.append(line) } }
    var text: String { lines.withLock { $0.joined(separator: "\n") } }
}

/// The page server against real peers: `uffd-fake-vmm` child processes that map guest memory, create and register a
/// userfaultfd, and send it with the region JSON exactly as Firecracker does, then check every page.
@Suite("Firecracker page server", .serialized)
struct FirecrackerPageServerTests {
    /// A server running in this process for one test, with its log.
    final class RunningServer: Sendable {
        let server: FirecrackerPageServer
        let task: Task<Void, Never>
        let lines = LogLines()
        let socketPath: String
        let memoryPath: String

        init(directory: TemporaryDirectory, memoryPath: String, options: FaultResolver.Options = .init(afterRemove: .zeroFill),
             configure: (inout FirecrackerPageServer.Configuration) -> Void = { _ in }) throws {
            socketPath = "\(directory.path)/fc.sock"
            self.memoryPath = memoryPath
            let lines = self.lines
            var configuration = FirecrackerPageServer.Configuration(
                socketPath: socketPath, memoryFilePath: memoryPath, resolverOptions: options,
                handshakeTimeout: .seconds(2), log: { line in lines.append(line) })
            configure(&configuration)
            server = try FirecrackerPageServer(configuration)
            let server = self.server
            task = Task { await server.run() }
        }

        var log: String { lines.text }

        func stop() async {
            server.shutdown()
            await task.value
        }

        /// Runs a fake VMM against this server.
        func vmm(_ arguments: [String], timeout: Duration = .seconds(30)) async throws -> ChildProcess.Outcome {
            try await ChildProcess.run(ChildProcess.builtExecutable("uffd-fake-vmm"),
                                       ["--socket", socketPath, "--memory", memoryPath] + arguments, timeout: timeout)
        }
    }

    static let regionSize = 1 << 20

    @Test(.timeLimit(.minutes(2)))
    func servesEveryPageFromTheMemoryFileAndZerosAfterTheBalloon() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 3 * Self.regionSize, seed: 1)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        let outcome = try await running.vmm(["--regions", "3", "--region-size", "\(Self.regionSize)", "--balloon"])
        await running.stop()
        let pages = 3 * Self.regionSize / 4096
        #expect(outcome.status == 0, "stderr: \(outcome.stderr)\nlog: \(running.log)")
        #expect(outcome.stdout.contains("OK pages=\(pages) zeroPages=\(Self.regionSize / 2 / 4096)"))
        let vms = running.server.vms
        #expect(vms.count == 1)
        #expect(vms.first?.regions.count == 3)
        #expect(vms.first?.statistics.pagesCopied == pages)
        #expect(vms.first?.statistics.zeroPages == Self.regionSize / 2 / 4096)
        #expect(vms.first?.processID != nil)
        #expect(running.log.contains("serving 3 region(s)"))
        #expect(running.log.contains("disconnected"))
    }

    @Test(.timeLimit(.minutes(2)))
    func servesHugePages() async throws {
        let needed = 8  // two regions of 4 MiB
        try reserveHugePages(needed)
        let directory = try TemporaryDirectory()
        let size = 4 << 20
        let memory = try directory.randomFile("snapshot.mem", count: 2 * size, seed: 2)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        let outcome = try await running.vmm(["--regions", "2", "--region-size", "\(size)", "--page-size", "2097152", "--balloon"])
        await running.stop()
        #expect(outcome.status == 0, "stderr: \(outcome.stderr)\nlog: \(running.log)")
        #expect(outcome.stdout.contains("OK pages=4 zeroPages=1"))
        #expect(running.server.vms.first?.statistics.bytesCopied == 2 * size)
        #expect(running.log.contains("page 2097152"))
    }

    @Test(.timeLimit(.minutes(2)))
    func twoVMsAtOnceEachWithItsOwnStatistics() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 3)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        async let first = running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--balloon"])
        async let second = running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)"])
        let outcomes = try await [first, second]
        await running.stop()
        for outcome in outcomes { #expect(outcome.status == 0, "stderr: \(outcome.stderr)") }
        let vms = running.server.vms
        #expect(vms.count == 2)
        #expect(Set(vms.compactMap(\.processID)).count == 2)
        #expect(vms.allSatisfy { $0.statistics.pagesCopied == 2 * Self.regionSize / 4096 })
        #expect(vms.map(\.statistics.zeroPages).sorted() == [0, Self.regionSize / 2 / 4096])
    }

    /// Each broken peer is refused with a typed error in the log, while a healthy VM next to it is served.
    @Test(.timeLimit(.minutes(3)), arguments: [
        ("invalid-json", "invalid handshake JSON"),
        ("no-fd", "noDescriptor"),
        ("not-uffd", "not a userfaultfd"),
        ("two-fds", "tooManyDescriptors(2)"),
        ("outside-file", "outside the memory file"),
        ("overlap", "overlap"),
        ("bad-page-size", "page size 12345 is not supported"),
    ])
    func brokenPeersAreRefusedAndOthersKeepBeingServed(mode: String, logged: String) async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 4)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        async let healthy = running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--balloon"])
        async let broken = running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", mode])
        let (good, bad) = try await (healthy, broken)
        await running.stop()
        #expect(bad.status == 0 && bad.stdout.contains("REJECTED"), "\(mode): \(bad.stderr)")
        #expect(running.log.contains("handshake rejected: ") && running.log.contains(logged), "log: \(running.log)")
        #expect(good.status == 0 && good.stdout.contains("OK pages=512"), "healthy VM next to \(mode): \(good.stderr)")
    }

    @Test(.timeLimit(.minutes(2)))
    func garbageAfterTheHandshakeIsLoggedAndTheVMStillServed() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 5)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        let outcome = try await running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", "garbage-after", "--balloon"])
        await running.stop()
        #expect(outcome.status == 0, "stderr: \(outcome.stderr)")
        #expect(running.log.contains("unexpected byte(s)"))
    }

    @Test(.timeLimit(.minutes(2)))
    func aPeerThatExitsWithFaultsPendingDoesNotDisturbTheServer() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 6)
        let running = try RunningServer(directory: directory, memoryPath: memory.path)
        for _ in 0..<3 {
            let gone = try await running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", "exit-with-pending"])
            #expect(gone.status == 0 && gone.stdout.contains("EXITING pending=4"), "the VM exited with 4 faults pending: \(gone.stderr)")
        }
        let next = try await running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", "legacy-fields"])
        let alsoKib = try await running.vmm(["--regions", "2", "--region-size", "\(Self.regionSize)", "--mode", "page-size-kib"])
        // Every exited VM is eventually seen as disconnected.
        let deadline = ContinuousClock.now + .seconds(10)
        while running.server.vms.contains(where: \.isConnected), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        await running.stop()
        #expect(next.status == 0 && next.stdout.contains("OK pages=512"), "stderr: \(next.stderr)")
        #expect(alsoKib.status == 0, "stderr: \(alsoKib.stderr)")
        #expect(running.server.vms.count == 5)
    }

    @Test(.timeLimit(.minutes(2)))
    func uffdServeShutsDownCleanlyOnSIGTERM() async throws {
        let directory = try TemporaryDirectory()
        let memory = try directory.randomFile("snapshot.mem", count: 2 * Self.regionSize, seed: 7)
        let socket = "\(directory.path)/serve.sock"
        let serve = try ChildProcess.start(ChildProcess.builtExecutable("uffd"), ["serve", "--socket", socket, "--memory", memory.path])
        let deadline = ContinuousClock.now + .seconds(10)
        while !FileManager.default.fileExists(atPath: socket), ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(20))
        }
        let vmm = try await ChildProcess.run(ChildProcess.builtExecutable("uffd-fake-vmm"),
                                             ["--socket", socket, "--memory", memory.path, "--regions", "2",
                                              "--region-size", "\(Self.regionSize)", "--balloon"])
        serve.signal(SIGTERM)
        let outcome = try await serve.wait(timeout: .seconds(20))
        #expect(vmm.status == 0, "stderr: \(vmm.stderr)")
        #expect(outcome.status == 0 && !outcome.signalled, "uffd serve: \(outcome.stderr)")
        #expect(outcome.stderr.contains("signal received, shutting down"))
        #expect(outcome.stdout.contains("vm 1 pid"))
        #expect(outcome.stdout.contains("pages copied 512"))
        #expect(!FileManager.default.fileExists(atPath: socket), "the socket file is removed on shutdown")
    }

    /// Makes sure `count` 2 MiB huge pages are free, reserving them if needed (root); fails loudly if the machine can't,
    /// unless UFFD_SKIP_HUGETLB=1 says this machine has none on purpose.
    func reserveHugePages(_ count: Int) throws {
        func free() -> Int {
            let info = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
            let line = info.split(separator: "\n").first { $0.hasPrefix("HugePages_Free:") }
            return line.flatMap { Int($0.split(separator: " ").last ?? "") } ?? 0
        }
        if free() >= count { return }
        let total = (try? String(contentsOfFile: "/proc/sys/vm/nr_hugepages", encoding: .utf8))
            .flatMap { Int($0.trimmingCharacters(in: .whitespacesAndNewlines)) } ?? 0
        try? "\(total + count)".write(toFile: "/proc/sys/vm/nr_hugepages", atomically: false, encoding: .utf8)
        if free() >= count { return }
        if ProcessInfo.processInfo.environment["UFFD_SKIP_HUGETLB"] == "1" { return }
        throw ChildProcessError("need \(count) free 2 MiB huge pages (vm.nr_hugepages); set UFFD_SKIP_HUGETLB=1 to opt out")
    }
}
