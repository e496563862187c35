import Foundation
import Glibc
import Userfaultfd
import UserfaultfdHTTP

/// `uffd cat FILE|URL`: exposes a file, or a remote object (an `http://` or `https://` URL read with range requests),
/// through a ``LazyRegion`` and writes it to an output descriptor from memory.
public struct CatCommand: Sendable {
    /// A file path, or an `http://` / `https://` URL.
    public var path: String
    /// Headers for every request when `path` is a URL (e.g. `Authorization`).
    public var headers: [String: String] = [:]
    /// The block size of range requests when `path` is a URL (nil: ``HTTPRangeProvider/Options``' default).
    public var blockSize: Int?
    public var readahead: ReadaheadPolicy
    public var showStatistics: Bool
    public var output: Int32
    /// Progress lines on stderr (default: when stderr is a terminal).
    public var showProgress: Bool

    public init(path: String, readahead: ReadaheadPolicy = .default, showStatistics: Bool = false, output: Int32 = STDOUT_FILENO,
                showProgress: Bool = isatty(STDERR_FILENO) == 1) {
        self.path = path
        self.readahead = readahead
        self.showStatistics = showStatistics
        self.output = output
        self.showProgress = showProgress
    }

    /// Whether `path` names a remote object rather than a file.
    public var isURL: Bool {
        let lowercased = path.lowercased()
        return lowercased.hasPrefix("http://") || lowercased.hasPrefix("https://")
    }

    /// Copies the file or object to the output through lazily faulted memory; returns the region's statistics (nil when
    /// it is empty).
    @discardableResult
    public func run() async throws -> FaultResolver.Statistics? {
        let provider: any PageProvider
        var remote: HTTPRangeProvider?
        if isURL {
            guard let url = URL(string: path) else { throw ToolError("uffd cat: not a valid URL: \(path)") }
            var options = HTTPRangeProvider.Options()
            if let blockSize { options.blockSize = blockSize }
            remote = try await HTTPRangeProvider.open(url: url, headers: headers, options: options)
            provider = remote!
        } else {
            provider = try FileProvider(path: path)
        }
        let size = provider.size ?? 0
        guard size > 0 else { return nil }
        let started = ContinuousClock.now
        let statistics = try await LazyRegion.with(length: size, provider: provider, options: .init(readahead: readahead)) { region in
            try await Self.copyOut(region, range: 0..<size, output: output, showProgress: showProgress, command: "cat")
            return region.statistics
        }
        let elapsed = ContinuousClock.now - started
        if showStatistics {
            let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
            let rate = seconds > 0 ? Double(size) / seconds / 1e6 : 0
            writeError("uffd cat: \(size) bytes in \(String(format: "%.3f", seconds)) s (\(String(format: "%.1f", rate)) MB/s)\n")
            writeError("uffd cat: \(statistics)\n")
            if let remote { writeError("uffd cat: http: \(remote.statistics)\n") }
        }
        return statistics
    }

    /// Writes `range` of the region out in 1 MiB chunks from a dedicated thread (the reads fault), through a bounce
    /// buffer so the faults happen in user mode.
    static func copyOut(_ region: LazyRegion, range: Range<Int>, output: Int32, showProgress: Bool, command: String) async throws {
        let base = UInt(bitPattern: region.baseAddress) + UInt(range.lowerBound)
        let size = range.count
        let failure = await DedicatedThread.run { () -> String? in
            let chunk = 1 << 20
            let bounce = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { bounce.deallocate() }
            var offset = 0
            var lastReport = 0
            while offset < size {
                let count = min(chunk, size - offset)
                bounce.copyMemory(from: UnsafeRawPointer(bitPattern: base + UInt(offset))!, byteCount: count)
                var written = 0
                while written < count {
                    let result = write(output, bounce + written, count - written)
                    if result < 0 {
                        if errno == EINTR { continue }
                        return "write: \(String(cString: strerror(errno)))"
                    }
                    written += result
                }
                offset += count
                if showProgress, offset - lastReport >= 16 << 20 || offset == size {
                    lastReport = offset
                    writeError("\r\(offset >> 20) / \(size >> 20) MiB (\(offset * 100 / size)%)" + (offset == size ? "\n" : ""))
                }
            }
            return nil
        }.value
        if let failure { throw ToolError("uffd \(command): \(failure)") }
    }
}

func writeError(_ text: String) {
    FileHandle.standardError.write(Data(text.utf8))
}
