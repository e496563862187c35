import CUserfaultfd
import Glibc
import Synchronization

/// A shared-memory file (`memfd_create(2)`) with a private view of its own: the bytes other mappings of the file show,
/// filled without a page fault in any of them.
///
/// The view is registered ``RegistrationMode/missing`` with a userfaultfd of its own, and pages go into the page cache
/// only through `UFFDIO_COPY`/`UFFDIO_ZEROPAGE` on it: the kernel adds a page only where the file has none (no page,
/// and no swapped-out one), atomically, and answers `EEXIST` otherwise, so a fill never overwrites what another
/// mapping wrote, even while it runs. (Deciding with `mincore(2)` and then copying was racy, and took swapped-out pages
/// for absent ones.) Creating one therefore needs a userfaultfd with ``UserfaultFeatures/missingShmem``.
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
    /// The view's userfaultfd: fills are copies through it. Its events are never read; nothing touches the view.
    private let filler: UserfaultFD

    /// Creates a memfd of `length` bytes (rounded up to whole pages) and maps a view of it.
    /// - Throws: ``UserfaultError/Code/invalidArgument`` when `length` is not positive or does not round up to whole
    ///   pages within `Int.max`; the errno's code when the memfd cannot be made, sized or mapped; the userfaultfd's
    ///   errors (``UserfaultError/Code/unsupportedFeatures(_:)`` without MISSING on shmem) for the view's registration.
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
        let filler: UserfaultFD
        do {
            filler = try UserfaultFD(requiredFeatures: [.missingShmem])
            try filler.register(MemoryRange(start: view, length: rounded), mode: .missing)
        } catch {
            munmap(UnsafeMutableRawPointer(bitPattern: view), rounded)
            _ = Glibc.close(descriptor)
            throw error
        }
        self.fileDescriptor = descriptor
        self.length = rounded
        self.view = view
        self.filler = filler
    }

    deinit {
        filler.close()
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

    /// Puts `count` bytes from `source` into the page cache at `offset` (page-aligned), skipping pages already there:
    /// a page another mapping filled or wrote — before or during the call — or that is swapped out is never
    /// overwritten with the provider's copy. `source == nil` writes zeros.
    ///
    /// Each page is added by the kernel with `UFFDIO_COPY` (`UFFDIO_ZEROPAGE`) through the registered view, only where
    /// the file has no page; `EEXIST` (or a copy that stopped at such a page) skips it. A page the kernel refuses for any
    /// other reason (no memory) is left out: `UFFDIO_CONTINUE` on it then fails with
    /// ``UserfaultError/Code/badAddress``, which the caller reports.
    package func fill(offset: Int, count: Int, from source: UnsafeRawPointer?) {
        var done = 0
        while done < count {
            let range = MemoryRange(start: view + UInt(offset + done), length: count - done)
            do throws(UserfaultError) {
                if let source {
                    try filler.copy(from: source + done, to: range.start, length: range.length, mode: .dontWake)
                } else {
                    try filler.zeroPage(range, wake: false)
                }
                return
            } catch {
                switch error.code {
                case .tryAgain(let completed) where completed > 0:
                    done += completed  // stopped at a page that is there: the next attempt skips it
                case .pageExists:
                    done += systemPageSize
                default:
                    return
                }
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
