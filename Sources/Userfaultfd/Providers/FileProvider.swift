import CUserfaultfd
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
///
/// Bytes already in the page cache skip that hop: ``readImmediately(into:at:)`` reads them with
/// `preadv2(RWF_NOWAIT)` inside the resolver's event handler, and only a range the kernel would have to wait for
/// (`EAGAIN`, or a short read) goes to a queue.
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

    /// Whether ranges already in the page cache are read inside the resolver's event handler.
    public let readsCachedBytesImmediately: Bool
    /// Cleared when the file system cannot read without blocking (`EOPNOTSUPP`): every read then goes to a queue.
    private let nowaitSupported = Atomic<Bool>(true)
    private let immediateReads = Atomic<Int>(0)

    /// Reads served from the page cache inside the event handler, with no hop to a queue.
    public var immediateReadCount: Int { immediateReads.load(ordering: .relaxed) }

    /// Opens `path` for reading.
    /// - Parameters:
    ///   - path: a regular file.
    ///   - preferredReadSize: the read size to align to (0 for none).
    ///   - maxConcurrentReads: reads that may run at once, each on a serial queue of its own (at least 1; default 4).
    ///   - readsCachedBytesImmediately: read ranges the page cache already holds inside the event handler (default);
    ///     `false` sends every read to a queue.
    /// - Throws: ``FileProviderError`` when the file cannot be opened or is not a regular file.
    public init(path: String, preferredReadSize: Int = 0, maxConcurrentReads: Int = 4,
                readsCachedBytesImmediately: Bool = true) throws(FileProviderError) {
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
        self.readsCachedBytesImmediately = readsCachedBytesImmediately
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

    /// Fills `buffer` from the page cache without waiting for the disk, or returns `nil` when any of the range is not
    /// cached (the resolver then calls ``read(into:at:)``, which reads it all on a queue).
    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? {
        guard readsCachedBytesImmediately, nowaitSupported.load(ordering: .relaxed) else { return nil }
        var done = 0
        while done < buffer.count {
            let count = buffer.withUnsafeMutableBytes { bytes in
                cuffd_pread_nowait(descriptor, bytes.baseAddress! + done, bytes.count - done, Int64(offset + done))
            }
            if count > 0 {
                done += count
                continue
            }
            if count == 0 { break }  // end of file: the resolver zero-fills the rest
            switch errno {
            case EINTR: continue
            case EAGAIN: return nil
            case EOPNOTSUPP, EINVAL, ENOSYS:
                // No RWF_NOWAIT here (an old kernel or a file system without it): stop asking.
                nowaitSupported.store(false, ordering: .relaxed)
                return nil
            default: throw FileProviderError(path: path, errno: errno, operation: "pread")
            }
        }
        immediateReads.add(1, ordering: .relaxed)
        return .bytes(done)
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
