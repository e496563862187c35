import Foundation
import Userfaultfd

/// The `uffd` command line: parses arguments and runs a subcommand.
public enum UffdCommand {
    static let usage = """
    usage: uffd <command> [options]

    commands:
      demo [--pages N] [--delay-ms MS]   userfaultfd(2)'s example: a region of N pages (default 4), each fault served
                                         with a page of the next letter by a `for try await` loop over the events
      abc [--pages N]                    the seed's pattern example: pages of "abc...z" made by a provider on first touch
      cat FILE|URL [--readahead BYTES|none] [--stats] [--block-size BYTES] [--header 'Name: value']...
                                         write FILE, or the object at an http(s) URL (range requests), to stdout
                                         from a LazyRegion that faults it in lazily
      s3-slice URL --offset N --length N [--block-size BYTES] [--header 'Name: value']...
                                         a presigned URL as memory: write one slice to stdout, statistics on stderr
                                         (only the slice's blocks are fetched)
      serve --socket PATH --memory FILE [--readahead BYTES|none] [--socket-mode OCTAL] [--socket-group GID|NAME]
            [--allow-uid UID,...] [--allow-gid GID,...] [--max-sessions N] [--max-handshakes N]
            [--handshake-timeout SECONDS]
                                         a Firecracker-compatible page server: VMMs connect, send their regions and
                                         userfaultfd, and their faults are served from FILE (until SIGINT/SIGTERM).
                                         The socket is 0600 unless --socket-mode says otherwise; --allow-uid/gid
                                         serve only those peers (SO_PEERCRED); peers beyond the limits are refused
      track [--pages N] [--rounds N] [--engine faults|scan] [--seed N]
                                         dirty tracking: writes at random into a region each round and prints the
                                         dirty page ranges a DirtyTracker reports, checked against what was written
      features                           the features and ioctls this kernel offers
      bench [--quick] [--only P1,P2,...] [--polling-us N]
                                         benchmarks P1–P5: the library against the C poll/read/COPY handler of
                                         userfaultfd(2) in the same run (build with -c release); --polling-us sets
                                         the reader's polling window (default 50, 0 turns it off)
      help                               this text
    """

    /// Runs the command line `arguments` (without the program name) and returns the exit status.
    public static func run(_ arguments: [String]) async -> Int32 {
        var arguments = ArgumentList(arguments)
        let command = arguments.next() ?? "demo"
        do {
            switch command {
            case "demo":
                let pages = try arguments.integer("--pages", default: 4, range: 1...1_000_000)
                let delay = try arguments.integer("--delay-ms", default: 0, range: 0...10_000)
                try arguments.finish()
                _ = try await ManPageDemo(pages: pages, readDelay: .milliseconds(delay)).run()
                print("Done: \(pages) page\(pages == 1 ? "" : "s") served on demand.")
            case "abc":
                let pages = try arguments.integer("--pages", default: 4, range: 1...1_000_000)
                try arguments.finish()
                let (_, statistics) = try await AbcExample(pages: pages).run()
                print("statistics: \(statistics)")
            case "cat":
                guard let path = arguments.next() else { throw ToolError("cat needs a FILE or URL\n\n\(usage)") }
                let readahead = try arguments.readahead()
                let stats = arguments.flag("--stats")
                var cat = CatCommand(path: path, readahead: readahead, showStatistics: stats)
                cat.headers = try arguments.headers()
                cat.blockSize = try arguments.blockSize()
                try arguments.finish()
                try await cat.run()
            case "s3-slice":
                guard let url = arguments.next() else { throw ToolError("s3-slice needs a URL\n\n\(usage)") }
                let offset = try arguments.integer("--offset", default: 0, range: 0...Int.max)
                let length = try arguments.integer("--length", default: 4096, range: 1...Int.max)
                let blockSize = try arguments.blockSize() ?? 1 << 20
                let headers = try arguments.headers()
                try arguments.finish()
                try await S3SliceCommand(url: url, offset: offset, length: length, blockSize: blockSize, headers: headers).run()
            case "serve":
                guard let socket = try arguments.value("--socket"), let memory = try arguments.value("--memory") else {
                    throw ToolError("serve needs --socket PATH and --memory FILE\n\n\(usage)")
                }
                var serve = ServeCommand(socketPath: socket, memoryFilePath: memory, readahead: try arguments.readahead())
                if let mode = try arguments.value("--socket-mode") {
                    guard let bits = mode_t(mode, radix: 8), bits <= 0o777, bits & 0o200 != 0 else {
                        throw ToolError("--socket-mode takes octal permissions that let the owner write, e.g. 0600 or 0660; not '\(mode)'")
                    }
                    serve.socketMode = bits
                }
                if let group = try arguments.value("--socket-group") {
                    guard let gid = gid_t(group) ?? getgrnam(group).map({ $0.pointee.gr_gid }) else {
                        throw ToolError("--socket-group takes a group id or name; no group '\(group)'")
                    }
                    serve.socketGroup = gid
                }
                serve.allowedUserIDs = try arguments.idList("--allow-uid")
                serve.allowedGroupIDs = try arguments.idList("--allow-gid")
                if let text = try arguments.value("--max-sessions") {
                    guard let number = Int(text), number >= 1 else {
                        throw ToolError("--max-sessions takes a number of at least 1, not '\(text)'")
                    }
                    serve.maximumSessions = number
                }
                serve.maximumPendingHandshakes = try arguments.integer("--max-handshakes", default: 16, range: 1...1_000_000)
                serve.handshakeTimeout = .seconds(try arguments.integer("--handshake-timeout", default: 5, range: 1...3600))
                try arguments.finish()
                try await serve.run()
            case "track":
                let pages = try arguments.integer("--pages", default: 64, range: 1...1_000_000)
                let rounds = try arguments.integer("--rounds", default: 4, range: 1...10_000)
                let seed = try arguments.integer("--seed", default: 1, range: 0...Int.max)
                let engine: DirtyTracker.Engine?
                switch try arguments.value("--engine") {
                case nil: engine = nil
                case "faults": engine = .writeProtectFaults
                case "scan": engine = .asyncScan
                case let other?: throw ToolError("--engine takes faults or scan, not '\(other)'")
                }
                try arguments.finish()
                guard try await TrackCommand(pages: pages, rounds: rounds, engine: engine, seed: UInt64(seed)).run() else { return 2 }
            case "features":
                try arguments.finish()
                let (features, ioctls) = try UserfaultFD.probeFeatures()
                print("features: 0x\(String(features.rawValue, radix: 16)) \(features)")
                print("ioctls:   0x\(String(ioctls.rawValue, radix: 16)) \(ioctls)")
            case "bench":
                let quick = arguments.flag("--quick")
                let only = try arguments.value("--only").map { text in
                    Set(text.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces).uppercased() })
                }
                let polling = try arguments.value("--polling-us").map { text -> Duration in
                    guard let microseconds = Int(text), microseconds >= 0 else {
                        throw ToolError("--polling-us takes a number of microseconds (0: off), not '\(text)'")
                    }
                    return .microseconds(microseconds)
                }
                try arguments.finish()
                if let only, let unknown = only.first(where: { id in !BenchCommand.groupIDs.contains(where: { id.hasPrefix($0) }) }) {
                    throw ToolError("--only takes ids among \(BenchCommand.groupIDs.joined(separator: ",")), not '\(unknown)'")
                }
                try await BenchCommand(quick: quick, only: only, pollingWindow: polling).run()
            case "help", "--help", "-h":
                print(usage)
            default:
                throw ToolError("unknown command '\(command)'\n\n\(usage)")
            }
            return 0
        } catch {
            FileHandle.standardError.write(Data("uffd: \(error)\n".utf8))
            return 1
        }
    }
}

/// A tiny argument parser: `--name value` options and positional arguments, nothing else.
struct ArgumentList {
    private var remaining: [String]

    init(_ arguments: [String]) { remaining = arguments }

    /// The next positional argument, if any.
    mutating func next() -> String? {
        guard let index = remaining.firstIndex(where: { !$0.hasPrefix("--") }) else { return nil }
        if index > 0, remaining[index - 1].hasPrefix("--") { return nil }
        return remaining.remove(at: index)
    }

    /// The value of `--name value` (or `--name=value`), removed from the list.
    mutating func value(_ name: String) throws -> String? {
        if let index = remaining.firstIndex(where: { $0.hasPrefix(name + "=") }) {
            return String(remaining.remove(at: index).dropFirst(name.count + 1))
        }
        guard let index = remaining.firstIndex(of: name) else { return nil }
        guard index + 1 < remaining.count else { throw ToolError("\(name) needs a value") }
        let value = remaining[index + 1]
        remaining.removeSubrange(index...index + 1)
        return value
    }

    /// Whether `--name` is present (removed from the list).
    mutating func flag(_ name: String) -> Bool {
        guard let index = remaining.firstIndex(of: name) else { return false }
        remaining.remove(at: index)
        return true
    }

    mutating func integer(_ name: String, default defaultValue: Int, range: ClosedRange<Int>) throws -> Int {
        guard let text = try value(name) else { return defaultValue }
        guard let number = Int(text), range.contains(number) else {
            throw ToolError("\(name) takes a whole number from \(range.lowerBound) to \(range.upperBound), not '\(text)'")
        }
        return number
    }

    /// `--readahead BYTES` (maximum cluster) or `--readahead none`; the default policy when absent.
    mutating func readahead() throws -> ReadaheadPolicy {
        guard let text = try value("--readahead") else { return .default }
        if text == "none" || text == "0" { return .none }
        guard let bytes = Int(text), bytes >= 4096 else {
            throw ToolError("--readahead takes a byte count of at least 4096, or none; not '\(text)'")
        }
        return .adaptive(maximum: bytes)
    }

    /// `--name 1,2,3`: a set of user or group ids; nil when absent.
    mutating func idList(_ name: String) throws -> Set<UInt32>? {
        guard let text = try value(name) else { return nil }
        let ids = text.split(separator: ",").map { UInt32($0.trimmingCharacters(in: .whitespaces)) }
        guard !ids.isEmpty, ids.allSatisfy({ $0 != nil }) else {
            throw ToolError("\(name) takes comma-separated numeric ids, not '\(text)'")
        }
        return Set(ids.compactMap { $0 })
    }

    /// Fails on anything left over.
    func finish() throws {
        if !remaining.isEmpty { throw ToolError("unexpected arguments: \(remaining.joined(separator: " "))") }
    }
}
