/// Serves bytes held in memory. Reads complete at once, inside the resolver's event handler.
public struct MemoryProvider: PageProvider {
    private let storage: [UInt8]

    /// Serves `bytes`; the region reads zero past their end.
    public init<Bytes: Sequence<UInt8>>(_ bytes: Bytes) {
        storage = Array(bytes)
    }

    public var size: Int? { storage.count }

    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
        fill(buffer, at: offset)
    }

    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? {
        fill(buffer, at: offset)
    }

    private func fill(_ buffer: PageBuffer, at offset: Int) -> PageContent {
        guard offset < storage.count else { return .zeros }
        let end = min(storage.count, offset + buffer.count)
        let copied = storage.withUnsafeBytes { buffer.copy(from: UnsafeRawBufferPointer(rebasing: $0[offset..<end])) }
        return .bytes(copied)
    }
}

/// Serves zeros everywhere, with the shared zero page (no copy).
public struct ZeroProvider: PageProvider {
    private let dataSize: Int?

    /// A provider of `size` zero bytes, or unbounded.
    public init(size: Int? = nil) {
        dataSize = size
    }

    public var size: Int? { dataSize }

    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent { .zeros }

    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? { .zeros }
}

/// A provider made of a closure: `{ buffer, offset in ... }` fills the buffer with the bytes at `offset`.
///
/// ```swift
/// let letters = ClosureProvider(size: 1 << 20) { buffer, offset in
///     buffer.withUnsafeMutableBytes { bytes in
///         for i in bytes.indices { bytes[i] = UInt8(ascii: "a") + UInt8((offset + i) / 4096 % 26) }
///     }
///     return .bytes(buffer.count)
/// }
/// ```
public struct ClosureProvider: PageProvider {
    /// The fill function: write the bytes at `offset` into the buffer and say what was produced.
    public typealias Fill = @Sendable (_ buffer: PageBuffer, _ offset: Int) async throws -> PageContent

    private let fill: Fill
    private let synchronousFill: (@Sendable (PageBuffer, Int) throws -> PageContent)?
    /// Bytes of data (nil: unbounded).
    public let size: Int?
    /// The read size the resolver aligns to (0: none).
    public let preferredReadSize: Int

    /// A provider whose reads run `fill` asynchronously.
    public init(size: Int? = nil, preferredReadSize: Int = 0, fill: @escaping Fill) {
        self.size = size
        self.preferredReadSize = preferredReadSize
        self.fill = fill
        self.synchronousFill = nil
    }

    /// A provider whose reads are synchronous computations (run inside the resolver's event handler; keep them quick).
    public init(size: Int? = nil, preferredReadSize: Int = 0, immediate: @escaping @Sendable (PageBuffer, Int) throws -> PageContent) {
        self.size = size
        self.preferredReadSize = preferredReadSize
        self.fill = { buffer, offset in try immediate(buffer, offset) }
        self.synchronousFill = immediate
    }

    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
        try await fill(buffer, offset)
    }

    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? {
        try synchronousFill?(buffer, offset)
    }
}
