import Glibc
import Synchronization

/// A file opened read-only whose bytes are read with `pread(2)`, straight from the page cache.
///
/// It is not `mmap`ed: reading a mapping past the end of a file that shrank after it was mapped raises SIGBUS in
/// the reading thread — in a server, the whole process. `pread` instead comes up short, which ``read(into:at:)``
/// reports as ``UserfaultError/Code/fileTruncated``, so a file truncated under a running server costs that read only.
public final class FileMapping: Sendable {
    private let lease: DescriptorLease
    /// Bytes in the file when it was opened.
    public let size: Int
    /// The file's path.
    public let path: String

    /// Opens `path`. An empty file has size 0.
    public init(path: String) throws(UserfaultError) {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
            throw UserfaultError(.system, operation: .open, errno: errno, detail: "cannot open \(path)")
        }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else {
            let error = errno
            close(descriptor)
            throw UserfaultError(.system, operation: .fstat, errno: error, detail: "cannot stat \(path)")
        }
        self.path = path
        self.size = Int(info.st_size)
        lease = DescriptorLease(descriptor: descriptor)
    }

    deinit { lease.markClosed() }

    /// Reads the bytes at `offset` into `buffer`: up to the buffer's size or the end of the file (as it was when
    /// opened); returns the count.
    /// - Throws: ``UserfaultError/Code/fileTruncated`` when the file now ends before that; ``UserfaultError/Code/system``
    ///   when `pread` fails.
    public func read(into buffer: PageBuffer, at offset: Int) throws(UserfaultError) -> Int {
        guard offset >= 0, offset < size else { return 0 }
        let wanted = min(buffer.count, size - offset)
        guard lease.acquire() else { throw UserfaultError(.closed, operation: .pread, detail: "\(path) is closed") }
        defer { lease.release() }
        var done = 0
        while done < wanted {
            let count = buffer.withUnsafeMutableBytes { bytes in
                pread(lease.descriptor, bytes.baseAddress! + done, wanted - done, off_t(offset + done))
            }
            if count < 0 {
                if errno == EINTR { continue }
                throw UserfaultError(.system, operation: .pread, errno: errno,
                                     detail: "cannot read \(path) at offset \(offset + done)")
            }
            if count == 0 {
                var info = stat()
                let now = fstat(lease.descriptor, &info) == 0 ? " is now \(info.st_size) bytes," : ""
                throw UserfaultError(.fileTruncated, operation: .pread,
                                     detail: "\(path) was truncated:\(now) was \(size); read at offset \(offset + done)")
            }
            done += count
        }
        return done
    }

    /// Like ``read(into:at:)``, but a failed read (or one past the end) returns 0.
    public func copy(into buffer: PageBuffer, at offset: Int) -> Int {
        (try? read(into: buffer, at: offset)) ?? 0
    }
}
