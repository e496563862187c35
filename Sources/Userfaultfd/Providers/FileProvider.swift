import Dispatch
import Glibc

/// Serves a file with positional reads (`pread(2)`), run on a Dispatch queue of the provider's own so that a read that
/// waits for the disk never blocks Swift's cooperative pool or the resolver's event queue.
public final class FileProvider: PageProvider {
    private let descriptor: Int32
    private let queue: DispatchQueue
    /// Bytes in the file when it was opened.
    public let size: Int?
    /// The read size the resolver aligns to (0: none).
    public let preferredReadSize: Int

    /// The path the provider reads.
    public let path: String

    /// Opens `path` for reading.
    /// - Parameter preferredReadSize: the read size to align to (0 for none).
    /// - Throws: ``FileProviderError`` when the file cannot be opened or is not a regular file.
    public init(path: String, preferredReadSize: Int = 0) throws {
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
        self.queue = DispatchQueue(label: "userfaultfd.file-provider", attributes: .concurrent)
    }

    deinit {
        close(descriptor)
    }

    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
        try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<PageContent, any Error>) in
            queue.async { [descriptor, path] in
                continuation.resume(with: Result { () throws(FileProviderError) -> PageContent in
                    try Self.readFully(descriptor, path: path, into: buffer, at: offset)
                })
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
