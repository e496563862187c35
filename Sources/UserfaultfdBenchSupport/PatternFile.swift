import Glibc

/// A file of a fixed byte pattern, written so that it sits in the page cache: the input of the file benchmarks.
public enum PatternFile {
    /// The byte at `offset` of every pattern file.
    @inlinable
    public static func byte(at offset: Int) -> UInt8 { UInt8(truncatingIfNeeded: (offset % chunk) &* 31 &+ 7) }

    /// The pattern repeats every mebibyte.
    public static let chunk = 1 << 20

    /// Creates (or truncates) `path` and writes `size` bytes of the pattern to it.
    /// - Throws: ``BenchSupportError`` naming the call that failed and the path.
    public static func write(path: String, size: Int) throws(BenchSupportError) {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw BenchSupportError(operation: "open", path: path, errno: errno) }
        defer { close(descriptor) }
        let block = (0..<chunk).map(byte(at:))
        var written = 0
        while written < size {
            let count = block.withUnsafeBytes { Glibc.write(descriptor, $0.baseAddress!, min(chunk, size - written)) }
            if count < 0 {
                if errno == EINTR { continue }
                throw BenchSupportError(operation: "write", path: path, errno: errno)
            }
            written += count
        }
    }
}

/// A failed system call of the benchmark support: which call, on which path, and errno.
public struct BenchSupportError: Error, CustomStringConvertible, Sendable {
    /// The call that failed (`open`, `write`).
    public var operation: String
    /// The file it was called on.
    public var path: String
    /// The `errno` it set.
    public var errno: Int32

    /// The error of `operation` on `path`.
    public init(operation: String, path: String, errno: Int32) {
        self.operation = operation
        self.path = path
        self.errno = errno
    }

    /// `open /tmp/x: No such file or directory`.
    public var description: String { "\(operation) \(path): \(String(cString: strerror(errno)))" }
}
