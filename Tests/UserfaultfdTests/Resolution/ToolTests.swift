import Foundation
import Glibc
import Testing
import UffdTool
import Userfaultfd

extension ResolutionTests {
    /// Requirement 10: `uffd cat` and `uffd abc`, in process and as the built executable.
    @Suite("uffd cat and abc")
    struct Tool {
        /// 3 MiB + 123 bytes: the last page is partial.
        static let catSize = (3 << 20) + 123

        @Test(.timeLimit(.minutes(1)), arguments: ["default", "none"])
        func catCommandWritesTheFile(readahead: String) async throws {
            let source = SeededBytes.make(count: Self.catSize, seed: 100)
            let input = try ScratchFile(bytes: source, name: "uffd-res-cat-in")
            let output = try ScratchFile.empty(name: "uffd-res-cat-out")
            defer { input.remove(); output.remove() }
            let descriptor = open(output.path, O_WRONLY | O_TRUNC | O_CLOEXEC)
            try #require(descriptor >= 0)
            defer { close(descriptor) }
            let command = CatCommand(path: input.path, readahead: readahead == "none" ? .none : .default,
                                     output: descriptor, showProgress: false)
            // CatCommand owns its region; if it hung, cancelling its task resolves the waiting faults (LazyRegion.with).
            let task = Task { try await command.run() }
            guard let statistics = try await value(of: task, within: 40) else {
                Issue.record("uffd cat did not finish within 40 s")
                return
            }
            let written = try output.contents()
            #expect(written.count == source.count)
            #expect(firstDifference(written, source) == nil)
            let pages = (Self.catSize + systemPageSize - 1) / systemPageSize
            // The statistics CatCommand returns are read as soon as its thread is through, possibly before the resolver
            // counted the last cluster it installed (the copy wakes the thread first): allow for that one cluster.
            let lastCluster = readahead == "none" ? 1 : (1 << 20) / systemPageSize
            #expect((pages - lastCluster...pages).contains(statistics?.pagesCopied ?? -1), "\(String(describing: statistics))")
            if readahead == "none" {
                #expect(statistics?.faults == pages, "\(String(describing: statistics))")
            } else {
                #expect((statistics?.faults ?? .max) < pages / 8, "\(String(describing: statistics))")
            }
        }

        @Test(.timeLimit(.minutes(1)))
        func catOfAnEmptyFileWritesNothing() async throws {
            let input = try ScratchFile.empty(name: "uffd-res-cat-empty")
            let output = try ScratchFile.empty(name: "uffd-res-cat-empty-out")
            defer { input.remove(); output.remove() }
            let descriptor = open(output.path, O_WRONLY | O_TRUNC | O_CLOEXEC)
            try #require(descriptor >= 0)
            defer { close(descriptor) }
            let statistics = try await CatCommand(path: input.path, output: descriptor, showProgress: false).run()
            #expect(statistics == nil)
            #expect(try output.contents().isEmpty)
        }

        @Test(.timeLimit(.minutes(1)))
        func uffdExecutableCatsTheFile() async throws {
            let executable = try #require(Self.findExecutable(), "the built `uffd` executable was not found next to the tests")
            let source = SeededBytes.make(count: Self.catSize, seed: 101)
            let input = try ScratchFile(bytes: source, name: "uffd-res-exe-in")
            let output = try ScratchFile.empty(name: "uffd-res-exe-out")
            let errors = try ScratchFile.empty(name: "uffd-res-exe-err")
            defer { input.remove(); output.remove(); errors.remove() }

            let process = Process()
            process.executableURL = executable
            process.arguments = ["cat", input.path, "--stats"]
            process.standardInput = FileHandle.nullDevice
            process.standardOutput = try FileHandle(forWritingTo: URL(fileURLWithPath: output.path))
            process.standardError = try FileHandle(forWritingTo: URL(fileURLWithPath: errors.path))
            try process.run()
            let exited = await pollUntil(within: 40) { !process.isRunning }
            if !exited {
                kill(process.processIdentifier, SIGKILL)
                _ = await pollUntil(within: 5) { !process.isRunning }
                Issue.record("`uffd cat` did not exit within 40 s; killed")
                return
            }
            let stderr = String(decoding: try errors.contents(), as: UTF8.self)
            #expect(process.terminationReason == .exit)
            #expect(process.terminationStatus == 0, "stderr: \(stderr)")
            let written = try output.contents()
            #expect(written.count == source.count)
            #expect(firstDifference(written, source) == nil)
            #expect(stderr.contains("uffd cat: \(Self.catSize) bytes"), "stderr: \(stderr)")
        }

        @Test(.timeLimit(.minutes(1)))
        func abcExampleLinesMatchThePattern() async throws {
            let pageSize = systemPageSize
            let task = Task { try await AbcExample(pages: 3, log: { _ in }).run() }
            guard let (lines, statistics) = try await value(of: task, within: 30) else {
                Issue.record("AbcExample did not finish within 30 s")
                return
            }
            let alphabet = Array("abcdefghijklmnopqrstuvwxyz")
            let pattern = try Regex("^page ([0-9]+) at 0x([0-9a-f]+): ([a-z]{32})\\.\\.\\.$")
            #expect(lines.count == 3, "\(lines)")
            var addresses: [UInt] = []
            for (index, line) in lines.enumerated() {
                guard let match = try pattern.wholeMatch(in: line) else {
                    Issue.record("line \(index) does not match the pattern: \(line)")
                    continue
                }
                #expect(match.output[1].substring.map(String.init) == "\(index)")
                if let hex = match.output[2].substring, let address = UInt(hex, radix: 16) { addresses.append(address) }
                let expected = String((0..<32).map { alphabet[(index * pageSize + $0) % 26] })
                #expect(match.output[3].substring.map(String.init) == expected, "line \(index): \(line)")
            }
            #expect(addresses.count == 3)
            if addresses.count == 3 {
                #expect(addresses[0] % UInt(pageSize) == 0)
                #expect(addresses[1] == addresses[0] + UInt(pageSize))
                #expect(addresses[2] == addresses[0] + UInt(2 * pageSize))
            }
            #expect(statistics.faults == 3, "\(statistics)")
            // Read right after the last page was woken: the last copy may not be counted yet.
            #expect((2...3).contains(statistics.pagesCopied), "\(statistics)")
        }

        /// The `uffd` executable of the same build as this test bundle, else any under a `.build*` directory upward.
        static func findExecutable() -> URL? {
            let manager = FileManager.default
            var candidates: [URL] = []
            for path in [CommandLine.arguments.first, Bundle.main.executablePath].compactMap({ $0 }) {
                candidates.append(URL(fileURLWithPath: path).deletingLastPathComponent().appendingPathComponent("uffd"))
            }
            var directory = URL(fileURLWithPath: manager.currentDirectoryPath)
            for _ in 0..<6 {
                if let entries = try? manager.contentsOfDirectory(atPath: directory.path) {
                    for entry in entries.sorted() where entry.hasPrefix(".build") {
                        candidates.append(directory.appendingPathComponent(entry).appendingPathComponent("debug/uffd"))
                    }
                }
                directory.deleteLastPathComponent()
            }
            return candidates.first { manager.isExecutableFile(atPath: $0.path) }
        }
    }
}
