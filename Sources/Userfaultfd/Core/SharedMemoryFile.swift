import CUserfaultfd
import Glibc
import Synchronization

/// A shared-memory file (`memfd_create(2)`) with a private view of its own: the bytes other mappings of the file show,
/// filled without a page fault in any of them.
///
/// A ``LazyRegion`` with ``LazyRegion/Backing/sharedMemory`` keeps its pages here: a fault is resolved by writing the page into the file's page cache through
/// the unregistered view, then mapping that very page into the faulting mapping with `UFFDIO_CONTINUE`. Any other
/// mapping of ``fileDescriptor`` — in this process, another process, a VMM — sees the same page.
public final class SharedMemoryFile: @unchecked Sendable {
    // @unchecked: the descriptor, view address and length are immutable; the bytes are shared on purpose.

    /// The memfd: pass it to other processes (`SCM_RIGHTS`, inheritance) to map the same pages. Closed on deinit.
    public let fileDescriptor: Int32
    /// The file's size in bytes (whole pages).
    public let length: Int
    private let view: UInt

    /// Creates a memfd of `length` bytes (rounded up to whole pages) and maps a view of it.
    /// - Throws: ``UserfaultError/Code/invalidArgument`` when `length` is not positive or does not round up to whole
    ///   pages within `Int.max`; the errno's code when the memfd cannot be made, sized or mapped.
    public init(length: Int, name: String = "swift-userfaultfd") throws(UserfaultError) {
        let rounded = try wholePages(length, operation: .mapSharedMemory, of: "a shared memory file")
        let descriptor = cuffd_memfd_create(name)
        guard descriptor >= 0 else {
            throw UserfaultError(operation: .mapSharedMemory, errno: Glibc.errno, detail: "memfd_create failed")
        }
        guard ftruncate(descriptor, off_t(rounded)) == 0 else {
            let error = Glibc.errno
            _ = Glibc.close(descriptor)
            throw UserfaultError(operation: .mapSharedMemory, errno: error, detail: "ftruncate of the memfd to \(rounded) bytes failed")
        }
        let view: UInt
        do {
            view = try Self.mapShared(descriptor: descriptor, length: rounded)
        } catch {
            _ = Glibc.close(descriptor)
            throw error
        }
        self.fileDescriptor = descriptor
        self.length = rounded
        self.view = view
    }

    deinit {
        munmap(UnsafeMutableRawPointer(bitPattern: view), length)
        _ = Glibc.close(fileDescriptor)
    }

    /// Maps the whole file again, `MAP_SHARED`, read-write; returns the address. The caller owns the mapping.
    static func mapShared(descriptor: Int32, length: Int) throws(UserfaultError) -> UInt {
        let pointer = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_SHARED, descriptor, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw UserfaultError(operation: .mapSharedMemory, errno: Glibc.errno, detail: "mmap of the memfd failed")
        }
        return UInt(bitPattern: pointer)
    }

    /// A new shared mapping of the whole file (e.g. a second view to check that it shows the same pages).
    public func map() throws(UserfaultError) -> SharedMapping {
        SharedMapping(address: try Self.mapShared(descriptor: fileDescriptor, length: length), length: length)
    }

    /// Which of the pages `offset ..< offset + count` (page-aligned) are in the page cache (`mincore(2)` on the view).
    func residentPages(offset: Int, count: Int) -> [Bool] {
        let pages = count / systemPageSize
        var vector = [UInt8](repeating: 0, count: pages)
        guard mincore(UnsafeMutableRawPointer(bitPattern: view + UInt(offset)), count, &vector) == 0 else {
            return [Bool](repeating: false, count: pages)
        }
        return vector.map { $0 & 1 != 0 }
    }

    /// Writes `count` bytes from `source` into the page cache at `offset` (page-aligned), skipping pages already
    /// there: a page another mapping filled (or wrote) is never overwritten with the provider's copy. `source == nil`
    /// writes zeros.
    func fill(offset: Int, count: Int, from source: UnsafeRawPointer?) {
        let resident = residentPages(offset: offset, count: count)
        for (index, present) in resident.enumerated() where !present {
            let pageOffset = index * systemPageSize
            let destination = UnsafeMutableRawPointer(bitPattern: view + UInt(offset + pageOffset))!
            if let source {
                destination.copyMemory(from: source + pageOffset, byteCount: systemPageSize)
            } else {
                destination.initializeMemory(as: UInt8.self, repeating: 0, count: systemPageSize)
            }
        }
    }
}

/// A `MAP_SHARED` mapping of a ``SharedMemoryFile``, unmapped on deinit or by ``unmap()``.
public final class SharedMapping: @unchecked Sendable {
    // @unchecked: immutable address and length; unmapping is guarded by an atomic flag.

    /// Start of the mapping.
    public let address: UInt
    /// Length in bytes.
    public let length: Int
    private let mapped = Atomic<Bool>(true)

    init(address: UInt, length: Int) {
        self.address = address
        self.length = length
    }

    deinit { unmap() }

    /// Unmaps now (once).
    public func unmap() {
        if mapped.exchange(false, ordering: .acquiringAndReleasing) {
            munmap(UnsafeMutableRawPointer(bitPattern: address), length)
        }
    }

    /// The mapping's range.
    public var range: MemoryRange { MemoryRange(start: address, length: length) }

    /// The bytes, to read (no fault: the mapping is not registered with any userfaultfd unless you register it).
    public func withUnsafeBytes<R>(_ body: (UnsafeRawBufferPointer) throws -> R) rethrows -> R {
        try body(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: address), count: length))
    }
}
