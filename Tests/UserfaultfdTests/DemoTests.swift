import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import UffdTool
import Userfaultfd

/// userfaultfd(2)'s man-page example, in process and as the `uffd` executable.
@Suite("Man-page demo")
struct DemoTests {
    @Test func lettersWrapAfterT() {
        let letters = (0..<45).map { ManPageDemo.letter(forFault: $0) }
        #expect(letters[0] == UInt8(ascii: "A"))
        #expect(letters[19] == UInt8(ascii: "T"))
        #expect(letters[20] == UInt8(ascii: "A"))
        #expect(letters[21] == UInt8(ascii: "B"))
        #expect(letters[39] == UInt8(ascii: "T"))
        #expect(letters[40] == UInt8(ascii: "A"))
        #expect(String(decoding: letters[0..<20], as: UTF8.self) == "ABCDEFGHIJKLMNOPQRST")
    }

    @Test(.timeLimit(.minutes(1)))
    func fourPages() async throws {
        let outcome = try await runDemo(pages: 4)
        let pageSize = systemPageSize
        #expect(outcome.reads.count == 4 * pageSize / 1024)
        #expect(String(decoding: outcome.reads.map(\.byte), as: UTF8.self) == "AAAABBBBCCCCDDDD")
        #expect(outcome.reads.map(\.offset) == (0..<16).map { 0xf + $0 * 1024 })
        #expect(outcome.faultOffsets == [0, pageSize, 2 * pageSize, 3 * pageSize])
        #expect(String(decoding: outcome.servedLetters, as: UTF8.self) == "ABCD")
    }

    @Test(.timeLimit(.minutes(1)))
    func twentyOnePagesWrapAround() async throws {
        let outcome = try await runDemo(pages: 21)
        let pageSize = systemPageSize
        #expect(String(decoding: outcome.servedLetters, as: UTF8.self) == "ABCDEFGHIJKLMNOPQRSTA")
        #expect(outcome.faultOffsets == (0..<21).map { $0 * pageSize })
        let expectedReads = (0..<21).flatMap { page in
            [UInt8](repeating: ManPageDemo.letter(forFault: page), count: pageSize / 1024)
        }
        #expect(outcome.reads.map(\.byte) == expectedReads)
    }

    @Test(.timeLimit(.minutes(1)))
    func logLinesFollowTheManPage() async throws {
        let lines = LineLog()
        let outcome = try await runDemo(pages: 2, log: { lines.append($0) })
        let logged = lines.lines
        #expect(logged.first?.hasPrefix("Address returned by mmap() = 0x") == true)
        #expect(logged.filter { $0.contains("UFFD_EVENT_PAGEFAULT event: flags = 0x0; address = 0x") }.count == 2)
        #expect(logged.filter { $0.contains("(uffdio_copy.copy returned \(systemPageSize))") }.count == 2)
        let readLetters = logged.filter { $0.hasPrefix("Read address 0x") }.compactMap(\.last)
        #expect(String(readLetters) == "AAAABBBB")
        #expect(outcome.servedLetters.count == 2)
    }

    @Test(.timeLimit(.minutes(1)))
    func executableRunsTheDemo() async throws {
        let executable = try #require(Self.findExecutable(), "the uffd executable was not found next to the tests")
        let process = Process()
        process.executableURL = executable
        process.arguments = ["demo", "--pages", "3"]
        let output = Pipe()
        let errors = Pipe()
        process.standardOutput = output
        process.standardError = errors
        try process.run()
        let pid = process.processIdentifier
        // Bounded: kill the child if it has not exited in time.
        let deadline = ContinuousClock.now + .seconds(30)
        while process.isRunning && ContinuousClock.now < deadline {
            try await Task.sleep(for: .milliseconds(10))
        }
        if process.isRunning {
            kill(pid, SIGKILL)
            Issue.record("uffd demo did not exit within 30 s; killed")
            while process.isRunning { try await Task.sleep(for: .milliseconds(10)) }
            return
        }
        let stdoutReader = OffPoolThread { output.fileHandleForReading.readDataToEndOfFile() }
        let stderrReader = OffPoolThread { errors.fileHandleForReading.readDataToEndOfFile() }
        #expect(await stdoutReader.finishes(within: 10))
        #expect(await stderrReader.finishes(within: 10))
        let stdout = String(decoding: await stdoutReader.value, as: UTF8.self)
        let stderr = String(decoding: await stderrReader.value, as: UTF8.self)
        #expect(process.terminationReason == .exit)
        #expect(process.terminationStatus == 0, "stderr: \(stderr)")
        #expect(stderr.isEmpty)

        let lines = stdout.split(separator: "\n").map(String.init)
        let first = try #require(lines.first)
        #expect(first.hasPrefix("Address returned by mmap() = 0x"))
        let base = try #require(UInt(first.dropFirst("Address returned by mmap() = 0x".count), radix: 16))
        // Read lines: 4 per page at base + 0xf + 1024 k, with the page's letter.
        let reads = lines.filter { $0.hasPrefix("Read address 0x") }
        #expect(reads.count == 3 * systemPageSize / 1024)
        for (index, line) in reads.enumerated() {
            let expectedAddress = String(base + 0xf + UInt(index * 1024), radix: 16)
            let letter = Character(UnicodeScalar(ManPageDemo.letter(forFault: index * 1024 / systemPageSize)))
            #expect(line == "Read address 0x\(expectedAddress) in main(): \(letter)")
        }
        // One fault message and one copy line per page, in page order.
        let faults = lines.filter { $0.contains("UFFD_EVENT_PAGEFAULT event:") }
        #expect(faults.count == 3)
        for (index, line) in faults.enumerated() {
            let address = line.split(separator: "0x").last.flatMap { UInt($0, radix: 16) }
            #expect(address.map { $0 & ~UInt(systemPageSize - 1) } == base + UInt(index * systemPageSize), "\(line)")
        }
        #expect(lines.filter { $0 == "        (uffdio_copy.copy returned \(systemPageSize))" }.count == 3)
        #expect(lines.last == "Done: 3 pages served on demand.")
    }

    // MARK: Helpers

    /// Runs the demo with a bound: if it has not finished in 30 s the test fails instead of hanging (the demo's
    /// userfaultfd is internal to it, so the watchdog cannot close it; the run is abandoned).
    func runDemo(pages: Int, log: @escaping @Sendable (String) -> Void = { _ in }) async throws -> ManPageDemo.Outcome {
        let task = Task { try await ManPageDemo(pages: pages, log: log).run() }
        guard let outcome = try await value(of: task, within: 30) else {
            throw TestFailure("ManPageDemo(pages: \(pages)) did not finish within 30 s")
        }
        return outcome
    }

    /// The `uffd` executable: next to the test bundle, or in a .build directory above it or above the working directory.
    static func findExecutable() -> URL? {
        let fileManager = FileManager.default
        let bundleDirectory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
        var candidates = [bundleDirectory.appendingPathComponent("uffd")]
        for start in [bundleDirectory, URL(fileURLWithPath: fileManager.currentDirectoryPath)] {
            var directory = start
            for _ in 0..<8 {
                for build in [".build-coretests", ".build"] {
                    candidates.append(directory.appendingPathComponent(build).appendingPathComponent("debug/uffd"))
                }
                directory = directory.deletingLastPathComponent()
            }
        }
        return candidates.first { fileManager.isExecutableFile(atPath: $0.path) }
    }
}

/// Lines logged from the demo's threads.
final class LineLog: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var storage: [String] = []
    func append(_ line: String) { lock.withLock { storage.append(line) } }
    var lines: [String] { lock.withLock { storage } }
}
