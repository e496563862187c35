import Glibc
import Synchronization

/// A file mapped read-only (`mmap(PROT_READ, MAP_SHARED)`): its bytes straight from the page cache.
public final class FileMapping: @unchecked Sendable {
    // @unchecked: address and size are immutable; the mapping is read-only.
    private let address: UnsafeRawPointer?
    private let mapped = Atomic<Bool>(true)
    /// Bytes in the file when it was mapped.
    public let size: Int
    /// The file's path.
    public let path: String

    /// Maps `path`. An empty file maps to nothing (size 0).
    public init(path: String) throws(UserfaultError) {
        let descriptor = open(path, O_RDONLY | O_CLOEXEC)
        guard descriptor >= 0 else {
            throw UserfaultError(.system, operation: .register, errno: errno, detail: "cannot open \(path)")
        }
        defer { close(descriptor) }
        var info = stat()
        guard fstat(descriptor, &info) == 0 else {
            throw UserfaultError(.system, operation: .register, errno: errno, detail: "cannot stat \(path)")
        }
        self.path = path
        self.size = Int(info.st_size)
        if size == 0 {
            address = nil
            return
        }
        let pointer = mmap(nil, size, PROT_READ, MAP_SHARED, descriptor, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw UserfaultError(.system, operation: .register, errno: errno, detail: "cannot map \(path)")
        }
        address = UnsafeRawPointer(pointer)
    }

    deinit {
        if mapped.exchange(false, ordering: .acquiringAndReleasing), let address {
            munmap(UnsafeMutableRawPointer(mutating: address), size)
        }
    }

    /// Copies the bytes at `offset` into `buffer` (up to the buffer's size or the end of the file); returns the count.
    public func copy(into buffer: PageBuffer, at offset: Int) -> Int {
        guard let address, offset >= 0, offset < size else { return 0 }
        let count = min(buffer.count, size - offset)
        return buffer.copy(from: UnsafeRawBufferPointer(start: address + offset, count: count))
    }
}
