import Dispatch
import Glibc
import Synchronization

/// Serves a file with positional reads (`pread(2)`), run on serial Dispatch queues of the provider's own so that a read
/// that waits for the disk never blocks Swift's cooperative pool or the resolver's event queue.
///
/// Up to ``maxConcurrentReads`` reads run at once, each on its own serial queue (a read goes to the least busy one).
/// Serial on purpose: on Linux a concurrent queue draws on the worker pool that also runs the cooperative pool, and
/// when every thread of that pool is blocked on a fault, a read sent there would wait about a second for a new thread;
/// a serial queue always gets one.
public final class FileProvider: PageProvider {
    private let descriptor: Int32
    private let queues: [DispatchQueue]
    /// Reads queued or running on each queue.
    private let load: Mutex<[Int]>
    /// Bytes in the file when it was opened.
    public let size: Int?
    /// The read size the resolver aligns to (0: none).
    public let preferredReadSize: Int

    /// The path the provider reads.
    public let path: String

    /// Reads that may run at once (one serial queue each).
    public var maxConcurrentReads: Int { queues.count }

    /// Opens `path` for reading.
    /// - Parameters:
    ///   - path: a regular file.
    ///   - preferredReadSize: the read size to align to (0 for none).
    ///   - maxConcurrentReads: reads that may run at once, each on a serial queue of its own (at least 1; default 4).
    /// - Throws: ``FileProviderError`` when the file cannot be opened or is not a regular file.
    public init(path: String, preferredReadSize: Int = 0, maxConcurrentReads: Int = 4) throws(FileProviderError) {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else { throw FileProviderError(path: path, errno: errno, operation: "open") }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else {
            let error = errno
            close(descriptor)
            throw FileProviderError(path: path, errno: error, operation: "fstat")
        }
        self.descriptor = descriptor
        self.path = path
        self.size = Int(info.st_size)
        self.preferredReadSize = preferredReadSize
        let lanes = min(max(1, maxConcurrentReads), 64)
        self.queues = (0..<lanes).map { DispatchQueue(label: "userfaultfd.file-provider.\($0)") }
        self.load = Mutex([Int](repeating: 0, count: lanes))
    }

    deinit {
        close(descriptor)
    }

    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
        let lane = load.withLock { load in
            let lane = load.indices.min { load[$0] < load[$1] }!
            load[lane] += 1
            return lane
        }
        return try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<PageContent, any Error>) in
            queues[lane].async { [self] in
                let result = Result { () throws(FileProviderError) -> PageContent in
                    try Self.readFully(descriptor, path: path, into: buffer, at: offset)
                }
                load.withLock { $0[lane] -= 1 }
                continuation.resume(with: result)
            }
        }
    }

    private static func readFully(_ descriptor: Int32, path: String, into buffer: PageBuffer, at offset: Int) throws(FileProviderError) -> PageContent {
        var done = 0
        while done < buffer.count {
            let count = buffer.withUnsafeMutableBytes { bytes in
                pread(descriptor, bytes.baseAddress! + done, bytes.count - done, off_t(offset + done))
            }
            if count < 0 {
                if errno == EINTR { continue }
                throw FileProviderError(path: path, errno: errno, operation: "pread")
            }
            if count == 0 { break }  // end of file: the resolver zero-fills the rest
            done += count
        }
        return .bytes(done)
    }
}

/// A file could not be opened or read.
public struct FileProviderError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The file.
    public let path: String
    /// The errno of the failed call.
    public let errno: Int32
    /// The call that failed (`open`, `fstat`, `pread`).
    public let operation: String

    public var description: String {
        "\(operation) \(path): \(String(cString: strerror(errno)))"
    }
}
