import Glibc

/// A range of virtual addresses in a process: `start ..< start + length`.
///
/// Every userfaultfd ioctl takes a range; most require it to be page-aligned with a non-zero length. `MemoryRange` itself
/// accepts any values, so that the ioctls can reject bad ones with a typed ``UserfaultError`` instead of trapping.
public struct MemoryRange: Sendable, Hashable, CustomStringConvertible {
    /// First address of the range.
    public var start: UInt
    /// Length of the range in bytes.
    public var length: Int

    /// A range of `length` bytes starting at `start`.
    public init(start: UInt, length: Int) {
        self.start = start
        self.length = length
    }

    /// A range covering `[start, end)`. `end` must not be below `start`.
    public init(start: UInt, end: UInt) {
        precondition(end >= start, "MemoryRange end below start")
        self.start = start
        self.length = Int(end - start)
    }

    /// The range covered by a buffer.
    public init(_ buffer: UnsafeMutableRawBufferPointer) {
        self.start = UInt(bitPattern: buffer.baseAddress)
        self.length = buffer.count
    }

    /// One past the last address.
    public var end: UInt { start &+ UInt(bitPattern: length) }

    /// Whether the range holds no bytes.
    public var isEmpty: Bool { length == 0 }

    /// Whether `address` lies inside the range.
    public func contains(_ address: UInt) -> Bool { address >= start && address < end }

    /// Whether `other` lies entirely inside this range.
    public func contains(_ other: MemoryRange) -> Bool { other.start >= start && other.end <= end }

    /// Whether the two ranges share at least one byte.
    public func overlaps(_ other: MemoryRange) -> Bool { start < other.end && other.start < end }

    /// The bytes both ranges cover, or `nil` when they don't overlap.
    public func intersection(_ other: MemoryRange) -> MemoryRange? {
        let lower = Swift.max(start, other.start)
        let upper = Swift.min(end, other.end)
        return lower < upper ? MemoryRange(start: lower, end: upper) : nil
    }

    /// Whether start and length are both multiples of `pageSize` (a power of two).
    public func isAligned(to pageSize: Int) -> Bool {
        let mask = UInt(pageSize - 1)
        return start & mask == 0 && UInt(bitPattern: length) & mask == 0
    }

    /// The smallest page-aligned range that covers this one. Saturates instead of trapping: its end stops at `UInt.max`
    /// for a range whose last page reaches the end of the address space, its length at the largest multiple of the
    /// page below `Int.max`, and a range that is not ``isWithinAddressSpace`` expands to an empty range at its start's
    /// page. (Check ``contains(_:)-(MemoryRange)`` on the result when the input is not trusted.)
    public func expandedToPages(of pageSize: Int) -> MemoryRange {
        let mask = UInt(pageSize - 1)
        let lower = start & ~mask
        guard isWithinAddressSpace else { return MemoryRange(start: lower, length: 0) }
        let (rounded, overflow) = end.addingReportingOverflow(mask)
        let upper = overflow ? UInt.max : rounded & ~mask
        let span = upper - lower
        return MemoryRange(start: lower, length: span > UInt(Int.max) ? Int.max & ~Int(mask) : Int(span))
    }

    /// Whether the length is not negative and `start + length` does not run past the end of the address space.
    public var isWithinAddressSpace: Bool {
        length >= 0 && !start.addingReportingOverflow(UInt(bitPattern: length)).overflow
    }

    /// The start address as a raw pointer (nil for address 0).
    public var pointer: UnsafeMutableRawPointer? { UnsafeMutableRawPointer(bitPattern: start) }

    public var description: String {
        "0x\(String(start, radix: 16))..<0x\(String(end, radix: 16)) (\(length) bytes)"
    }
}

/// `length` rounded up to whole pages of `pageSize` (a power of two), with overflow-checked arithmetic: a length that
/// is not positive, or whose rounding does not fit an `Int`, is a ``UserfaultError/Code/invalidArgument`` for
/// `operation` (`what` names the thing being sized, for the message).
func wholePages(
    _ length: Int, pageSize: Int = systemPageSize, operation: UserfaultError.Operation, of what: String
) throws(UserfaultError) -> Int {
    guard length > 0 else {
        throw UserfaultError(.invalidArgument, operation: operation, detail: "\(what) needs a positive length, got \(length)")
    }
    let (sum, overflow) = length.addingReportingOverflow(pageSize - 1)
    guard !overflow else {
        throw UserfaultError(.invalidArgument, operation: operation,
                             detail: "\(what): \(length) bytes do not round up to whole \(pageSize)-byte pages within Int.max")
    }
    return sum & ~(pageSize - 1)
}

/// The system's base page size in bytes (`sysconf(_SC_PAGESIZE)`).
public let systemPageSize: Int = {
    Int(sysconf(Int32(_SC_PAGESIZE)))
}()
