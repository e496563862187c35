import Glibc
import Synchronization

/// A private anonymous mapping (`mmap(MAP_PRIVATE | MAP_ANONYMOUS)`), unmapped when released.
///
/// Untouched pages cost no memory, which makes it the backing of every large, sparse structure here: regions, bitmaps,
/// buffer pools.
public final class AnonymousMemory: @unchecked Sendable {
    // @unchecked: address and length are immutable; the memory is shared with the kernel and the faulting threads on
    // purpose, and its users synchronize their own access.

    /// Start of the mapping (page-aligned).
    public let address: UInt
    /// Length in bytes (a multiple of the page size).
    public let length: Int
    private let mapped = Atomic<Bool>(true)

    /// Maps `length` bytes, rounded up to whole pages.
    /// - Parameters:
    ///   - length: the bytes to map (positive).
    ///   - noReserve: don't reserve swap for the mapping (for huge, sparse regions).
    /// - Throws: ``UserfaultError/Code/invalidArgument`` when `length` is not positive or does not round up to whole
    ///   pages within `Int.max`; ``UserfaultError/Code/system`` when `mmap` fails.
    public init(length: Int, noReserve: Bool = false) throws(UserfaultError) {
        let rounded = try wholePages(length, operation: .mmap, of: "anonymous memory")
        let flags = MAP_PRIVATE | MAP_ANONYMOUS | (noReserve ? MAP_NORESERVE : 0)
        let pointer = mmap(nil, rounded, PROT_READ | PROT_WRITE, flags, -1, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw UserfaultError(.system, operation: .mmap, errno: errno,
                                 detail: "mmap of \(rounded) bytes of anonymous memory failed")
        }
        self.address = UInt(bitPattern: pointer)
        self.length = rounded
    }

    deinit {
        unmap()
    }

    /// Unmaps the memory now (once; later calls do nothing). Any access afterwards is a use after free.
    public func unmap() {
        if mapped.exchange(false, ordering: .acquiringAndReleasing) {
            munmap(UnsafeMutableRawPointer(bitPattern: address), length)
        }
    }

    /// The mapping's range.
    public var range: MemoryRange { MemoryRange(start: address, length: length) }

    /// The start as a pointer, to touch the bytes (``address`` is the same place as a number, for ranges and page math).
    public var baseAddress: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: address)! }

    /// The start as a pointer.
    @available(*, deprecated, renamed: "baseAddress", message: "one name for the pointer on every memory type")
    public var pointer: UnsafeMutableRawPointer { baseAddress }

    /// Gives the pages back to the kernel (`MADV_DONTNEED`): they read as zeros (or fault again) next time.
    public func discard(_ range: MemoryRange) {
        madvise(UnsafeMutableRawPointer(bitPattern: range.start), range.length, MADV_DONTNEED)
    }
}

/// A bit per page, in anonymous memory so that a huge sparse region costs only the bitmap pages it touches.
final class PageBitmap {
    private let memory: AnonymousMemory
    private let words: UnsafeMutablePointer<UInt64>
    let count: Int

    init(pages: Int) throws(UserfaultError) {
        count = pages
        memory = try AnonymousMemory(length: Swift.max(8, (pages + 63) / 64 * 8), noReserve: true)
        words = memory.baseAddress.bindMemory(to: UInt64.self, capacity: (pages + 63) / 64)
    }

    @inline(__always) subscript(page: Int) -> Bool {
        get { words[page >> 6] & (1 << UInt64(page & 63)) != 0 }
        set {
            if newValue { words[page >> 6] |= 1 << UInt64(page & 63) } else { words[page >> 6] &= ~(1 << UInt64(page & 63)) }
        }
    }

    /// Sets or clears every bit in `pages`.
    func set(_ pages: Range<Int>, to value: Bool) {
        var page = pages.lowerBound
        while page < pages.upperBound {
            if page & 63 == 0 && page + 64 <= pages.upperBound {
                words[page >> 6] = value ? ~0 : 0
                page += 64
            } else {
                self[page] = value
                page += 1
            }
        }
    }
}

/// Page-aligned buffers of one size, reused so that resolving a fault allocates nothing in steady state.
final class AlignedBufferPool {
    let bufferSize: Int
    private var free: [AnonymousMemory] = []
    private var all: [AnonymousMemory] = []

    init(bufferSize: Int) {
        self.bufferSize = bufferSize
    }

    /// A buffer, new or reused.
    func take() throws(UserfaultError) -> PooledBuffer {
        if let memory = free.popLast() { return PooledBuffer(memory: memory) }
        let memory = try AnonymousMemory(length: bufferSize)
        all.append(memory)
        return PooledBuffer(memory: memory)
    }

    /// Returns a buffer for reuse.
    func give(_ buffer: PooledBuffer) {
        free.append(buffer.memory)
    }

    /// Buffers created so far.
    var created: Int { all.count }
}

/// One buffer of an ``AlignedBufferPool``.
struct PooledBuffer: Sendable {
    let memory: AnonymousMemory
    var pageBuffer: PageBuffer { PageBuffer(base: memory.baseAddress, count: memory.length) }
    var address: UInt { memory.address }
    var pointer: UnsafeRawPointer { UnsafeRawPointer(memory.baseAddress) }
}
