import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Glibc
import Testing

/// Whether the remote-memory tests are switched off (`UFFD_SKIP_REMOTE_TESTS=1`). Without it, a machine lacking
/// python3 or moto fails these tests loudly instead of passing them silently.
let remoteTestsSkipped = ProcessInfo.processInfo.environment["UFFD_SKIP_REMOTE_TESTS"] == "1"

/// A Python fixture server (Tests/Fixtures) run as a child process on loopback: started, awaited until it prints its
/// JSON line, and killed at the end whatever happens (stdin closing makes it exit too if this process dies first).
final class FixtureServer: @unchecked Sendable {
    // @unchecked: the fields are set in init and not mutated after; Process is only touched in stop().
    let process: Process
    let info: [String: Any]
    /// The object's bytes, as the fixture wrote them.
    let data: [UInt8]
    private let stdin: Pipe
    private let directory: URL

    var port: Int { info["port"] as! Int }
    var baseURL: String { "http://127.0.0.1:\(port)" }

    /// The fixtures folder, next to this file's test target.
    static let fixtures = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent()
        .deletingLastPathComponent().appendingPathComponent("Fixtures")

    /// The interpreter: `UFFD_PYTHON` (set by .ci/run to its virtual environment), or python3 on the PATH.
    static var python: String {
        if let python = ProcessInfo.processInfo.environment["UFFD_PYTHON"], !python.isEmpty { return python }
        for directory in (ProcessInfo.processInfo.environment["PATH"] ?? "/usr/bin:/bin").split(separator: ":") {
            let candidate = "\(directory)/python3"
            if access(candidate, X_OK) == 0 { return candidate }
        }
        return "/usr/bin/python3"
    }

    /// Starts `script` with `arguments` plus `--data-file`, and waits (up to `seconds`) for its JSON line.
    init(script: String, arguments: [String], seconds: Double = 60) async throws {
        directory = FileManager.default.temporaryDirectory.appendingPathComponent("uffd-remote-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        let dataFile = directory.appendingPathComponent("object.bin")
        let errorFile = directory.appendingPathComponent("stderr.txt")
        _ = FileManager.default.createFile(atPath: errorFile.path, contents: nil)
        let python = Self.python
        guard access(python, X_OK) == 0 else {
            throw TestFailure("""
                the remote-memory tests need python3 with the packages of Tests/Fixtures/requirements.txt \
                (`python3 -m pip install -r Tests/Fixtures/requirements.txt`); \(python) is missing. \
                Set UFFD_SKIP_REMOTE_TESTS=1 to skip them.
                """)
        }
        process = Process()
        process.executableURL = URL(fileURLWithPath: python)
        process.arguments = ["-u", Self.fixtures.appendingPathComponent(script).path] + arguments + ["--data-file", dataFile.path]
        stdin = Pipe()
        let stdout = Pipe()
        process.standardInput = stdin
        process.standardOutput = stdout
        process.standardError = try FileHandle(forWritingTo: errorFile)
        try process.run()
        let line = await Self.readLine(stdout.fileHandleForReading.fileDescriptor, seconds: seconds)
        let parsed = line.flatMap { try? JSONSerialization.jsonObject(with: Data($0.utf8)) as? [String: Any] }
        guard let parsed else {
            Self.kill(process)
            let errors = (try? String(contentsOf: errorFile, encoding: .utf8)) ?? ""
            try? FileManager.default.removeItem(at: directory)
            throw TestFailure("""
                fixture \(script) did not start (it exited, or printed nothing within \(seconds) s; is `python3 -m pip install -r \
                Tests/Fixtures/requirements.txt` done? set UFFD_SKIP_REMOTE_TESTS=1 to skip): \
                stdout \(line ?? "(nothing)"), stderr: \(errors.suffix(2000))
                """)
        }
        info = parsed
        data = try [UInt8](Data(contentsOf: dataFile))
    }

    /// Kills the server and removes its files.
    func stop() {
        try? stdin.fileHandleForWriting.close()
        Self.kill(process)
        try? FileManager.default.removeItem(at: directory)
    }

    /// SIGKILL (Foundation's Process reaps it).
    private static func kill(_ process: Process) {
        guard process.isRunning else { return }
        Glibc.kill(process.processIdentifier, SIGKILL)
    }

    /// Reads one line from `fd` on a thread of its own, giving up after `seconds`.
    private static func readLine(_ fd: Int32, seconds: Double) async -> String? {
        let reader = OffPoolThread<String?>(name: "uffd-fixture-reader") {
            var bytes: [UInt8] = []
            var byte: UInt8 = 0
            while true {
                var pollfd = Glibc.pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
                guard poll(&pollfd, 1, Int32(seconds * 1000)) == 1 else { return nil }
                let count = read(fd, &byte, 1)
                if count <= 0 { return bytes.isEmpty ? nil : String(decoding: bytes, as: UTF8.self) }
                if byte == UInt8(ascii: "\n") { return String(decoding: bytes, as: UTF8.self) }
                bytes.append(byte)
            }
        }
        return await reader.value
    }

    /// Runs `body` with a server started from `script`, and always stops it.
    static func with<T>(script: String, arguments: [String], _ body: (FixtureServer) async throws -> T) async throws -> T {
        let server = try await FixtureServer(script: script, arguments: arguments)
        do {
            let result = try await body(server)
            server.stop()
            return result
        } catch {
            server.stop()
            throw error
        }
    }

    /// The range server's counters: `/_stats`.
    func stats() async throws -> RangeServerStats {
        let (data, _) = try await URLSession.shared.data(from: URL(string: "\(baseURL)/_stats")!)
        return try JSONDecoder().decode(RangeServerStats.self, from: data)
    }
}

/// The range server's `/_stats`.
struct RangeServerStats: Decodable {
    struct Scenario: Decodable {
        /// GETs other than the size probe.
        var get: Int
        var head: Int
        /// Size probes: GETs of exactly bytes=0-0.
        var probe: Int?
        var ranges: [String]
        var statuses: [Int]
        /// The request headers of each request, names lowercased.
        var headers: [[String: String]]?
        var peak: Int
    }

    var scenarios: [String: Scenario]
    var peak: Int
    var connections: Int

    /// The counters of the scenario whose key (path and query) starts with `path`.
    func scenario(_ path: String) -> Scenario? {
        scenarios.first { $0.key.hasPrefix(path) }?.value
    }
}

/// Runs `body` against a range server of `size` random bytes (Tests/Fixtures/range_server.py).
func withRangeServer<T>(size: Int = 4 << 20, _ body: (FixtureServer) async throws -> T) async throws -> T {
    try await FixtureServer.with(script: "range_server.py", arguments: ["--size", "\(size)"], body)
}

/// Runs `body` against moto's S3 server holding one object of `size` random bytes (Tests/Fixtures/s3_fixture.py).
func withS3Fixture<T>(size: Int = 4 << 20, _ body: (FixtureServer) async throws -> T) async throws -> T {
    try await FixtureServer.with(script: "s3_fixture.py", arguments: ["--size", "\(size)"], body)
}
