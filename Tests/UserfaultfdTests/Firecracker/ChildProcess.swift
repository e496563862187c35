import Dispatch
import Foundation
import Glibc
import Testing
import UserfaultfdBenchSupport

/// A child process run to completion with a deadline: killed (SIGKILL) and reported if it overruns, so a handler bug
/// that leaves the child blocked on a fault can never hang the suite.
struct ChildProcess {
    struct Outcome {
        var status: Int32
        var stdout: String
        var stderr: String
        var timedOut: Bool
        var signalled: Bool
    }

    /// The path of an executable built next to the test bundle (`uffd`, `uffd-fake-vmm`).
    static func builtExecutable(_ name: String) throws -> String {
        var directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        for _ in 0..<4 {
            let candidate = directory.appendingPathComponent(name).path
            if FileManager.default.isExecutableFile(atPath: candidate) { return candidate }
            directory = directory.deletingLastPathComponent()
        }
        let fallback = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("../../../.build/debug/\(name)").standardized.path
        guard FileManager.default.isExecutableFile(atPath: fallback) else {
            throw ChildProcessError("\(name) is not built next to the tests (\(CommandLine.arguments[0]))")
        }
        return fallback
    }

    /// Starts `executable` with `arguments`; the returned process runs until ``wait(timeout:)``.
    static func start(_ executable: String, _ arguments: [String]) throws -> Running {
        let process = Process()
        process.executableURL = URL(fileURLWithPath: executable)
        process.arguments = arguments
        let stdout = Pipe(), stderr = Pipe()
        process.standardOutput = stdout
        process.standardError = stderr
        process.standardInput = FileHandle.nullDevice
        try process.run()
        return Running(process: process, stdout: stdout, stderr: stderr)
    }

    /// Runs to completion (or kills at the deadline).
    static func run(_ executable: String, _ arguments: [String], timeout: Duration = .seconds(30)) async throws -> Outcome {
        try await start(executable, arguments).wait(timeout: timeout)
    }

    final class Running: @unchecked Sendable {
        // @unchecked: Process and Pipe are used from one test task at a time.
        let process: Process
        let stdout: Pipe
        let stderr: Pipe

        init(process: Process, stdout: Pipe, stderr: Pipe) {
            self.process = process
            self.stdout = stdout
            self.stderr = stderr
        }

        func signal(_ number: Int32) { kill(process.processIdentifier, number) }

        func wait(timeout: Duration) async throws -> Outcome {
            // Read the pipes while it runs, so a chatty child never blocks on a full pipe. On threads of their own:
            // a blocking read on the cooperative pool (two threads here) would starve every task, the server's too.
            let out = PipeDrain(stdout.fileHandleForReading)
            let err = PipeDrain(stderr.fileHandleForReading)
            let deadline = ContinuousClock.now + timeout
            var timedOut = false
            while process.isRunning {
                if ContinuousClock.now >= deadline {
                    timedOut = true
                    kill(process.processIdentifier, SIGKILL)
                    break
                }
                try await Task.sleep(for: .milliseconds(20))
            }
            process.waitUntilExit()
            let outcome = Outcome(
                status: process.terminationStatus,
                stdout: String(decoding: await out.data(), as: UTF8.self),
                stderr: String(decoding: await err.data(), as: UTF8.self),
                timedOut: timedOut,
                signalled: process.terminationReason == .uncaughtSignal)
            if timedOut {
                Issue.record("\(process.executableURL?.lastPathComponent ?? "child") \(process.arguments ?? []) overran \(timeout) and was killed; stderr: \(outcome.stderr)")
            }
            return outcome
        }
    }
}

/// Reads a pipe to its end on a dedicated thread.
final class PipeDrain: @unchecked Sendable {
    // @unchecked: `result` is written once by the thread before `done` is signalled, and read only after.
    private var result = Data()
    private let done = DispatchSemaphore(value: 0)

    init(_ handle: FileHandle) {
        Thread {
            self.result = handle.readDataToEndOfFile()
            self.done.signal()
        }.start()
    }

    /// The bytes, once the writer closed the pipe (polled, so no cooperative thread blocks).
    func data() async -> Data {
        while done.wait(timeout: .now()) == .timedOut {
            try? await Task.sleep(for: .milliseconds(5))
        }
        return result
    }
}

struct ChildProcessError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A temporary directory removed at the end of the test.
final class TemporaryDirectory: @unchecked Sendable {
    // @unchecked: the path is immutable.
    let path: String

    init() throws {
        var template = Array("/tmp/uffd-test-XXXXXX".utf8CString)
        guard let result = template.withUnsafeMutableBufferPointer({ mkdtemp($0.baseAddress!) }) else {
            throw ChildProcessError("mkdtemp failed")
        }
        path = String(cString: result)
    }

    deinit { try? FileManager.default.removeItem(atPath: path) }

    /// Writes `count` random bytes (seeded) to a file here and returns its path and bytes.
    func randomFile(_ name: String, count: Int, seed: UInt64) throws -> (path: String, bytes: [UInt8]) {
        var generator = SplitMix64(seed: seed)
        var bytes = [UInt8](repeating: 0, count: count)
        for index in stride(from: 0, to: count, by: 8) {
            var word = generator.next()
            for offset in 0..<min(8, count - index) {
                bytes[index + offset] = UInt8(truncatingIfNeeded: word)
                word >>= 8
            }
        }
        let file = "\(path)/\(name)"
        try Data(bytes).write(to: URL(fileURLWithPath: file))
        return (file, bytes)
    }
}
