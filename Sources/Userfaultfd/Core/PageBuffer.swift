/// Bytes a ``PageProvider`` fills for one read: page-aligned memory owned by the resolver for the duration of the read.
///
/// A `PageBuffer` is handed to exactly one read at a time, so a provider may write it from whatever thread its
/// asynchronous work finishes on. Don't keep it after the read returns.
public struct PageBuffer: @unchecked Sendable {
    // @unchecked: the resolver hands each buffer to one read at a time and does not touch it until the read returns.
    let base: UnsafeMutableRawPointer

    /// How many bytes the read should produce (it may produce fewer: see ``PageContent/bytes(_:)``).
    public let count: Int

    init(base: UnsafeMutableRawPointer, count: Int) {
        self.base = base
        self.count = count
    }

    /// Gives `body` the buffer's memory.
    public func withUnsafeMutableBytes<Result>(_ body: (UnsafeMutableRawBufferPointer) throws -> Result) rethrows -> Result {
        try body(UnsafeMutableRawBufferPointer(start: base, count: count))
    }

    /// Copies `bytes` into the buffer at `offset`. Returns the number of bytes copied (clipped to the buffer's end).
    @discardableResult
    public func copy(from bytes: UnsafeRawBufferPointer, at offset: Int = 0) -> Int {
        precondition(offset >= 0 && offset <= count, "offset outside the buffer")
        let length = Swift.min(bytes.count, count - offset)
        if length > 0, let source = bytes.baseAddress { (base + offset).copyMemory(from: source, byteCount: length) }
        return length
    }

    /// Copies a collection of bytes into the buffer at `offset`; returns the number copied.
    @discardableResult
    public func copy<Bytes: Collection<UInt8>>(_ bytes: Bytes, at offset: Int = 0) -> Int {
        if let copied = bytes.withContiguousStorageIfAvailable({ copy(from: UnsafeRawBufferPointer($0), at: offset) }) {
            return copied
        }
        return Array(bytes).withUnsafeBytes { copy(from: $0, at: offset) }
    }

    /// Sets `range` of the buffer to `value`.
    public func fill(_ value: UInt8, in range: Range<Int>) {
        precondition(range.lowerBound >= 0 && range.upperBound <= count, "range outside the buffer")
        (base + range.lowerBound).initializeMemory(as: UInt8.self, repeating: value, count: range.count)
    }

    /// A view of the first `count` bytes.
    func prefix(_ count: Int) -> PageBuffer { PageBuffer(base: base, count: Swift.min(count, self.count)) }
}
