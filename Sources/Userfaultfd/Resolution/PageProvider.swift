/// Where the bytes of a lazily faulted region come from: the Swift counterpart of Go's `io.ReaderAt`, asynchronous.
///
/// A ``FaultResolver`` asks the provider to fill a buffer with the bytes at an offset when a thread touches a page that
/// is not there yet. The faulting thread waits in the kernel while the provider `await`s whatever it needs (a network
/// read, a file read, a computation) without holding any thread.
///
/// Beyond `ReaderAt`, a provider can:
/// - say a range is all zeros (``PageContent/zeros``): the resolver maps the shared zero page, no copy;
/// - say where its data ends (``size``): pages past the end read as zero and are never asked for;
/// - hint its preferred read size (``preferredReadSize``): reads are aligned to it, e.g. a remote block size;
/// - serve from memory at once (``readImmediately(into:at:)``): the resolver then copies inside its event handler,
///   with no thread hop.
///
/// Implementations must be thread-safe and must not block a thread for long: the resolver runs reads on its own
/// executors, and blocking one delays every other fault. Use asynchronous I/O, or move blocking calls to a thread of your
/// own (``FileProvider`` does).
public protocol PageProvider: Sendable {
    /// Bytes of data the provider has; bytes past this read as zero. `nil` when unbounded.
    var size: Int? { get }

    /// The read size the provider prefers, in bytes (0 for no preference). The resolver aligns reads to it.
    var preferredReadSize: Int { get }

    /// Fills `buffer` with the bytes starting at `offset` (the whole buffer, or up to the end of the data).
    ///
    /// - Returns: ``PageContent/bytes(_:)`` with how many bytes were written (the rest is zero-filled by the resolver), or
    ///   ``PageContent/zeros`` if the whole range is zero (the buffer's content is then ignored).
    /// - Throws: anything; the region's ``FailurePolicy`` decides what the faulting threads get.
    func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent

    /// A synchronous fill for data that is already in memory, or `nil` to go through ``read(into:at:)``.
    ///
    /// Called on the resolver's event queue, so it must not block. The default returns `nil`.
    func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent?
}

extension PageProvider {
    public var size: Int? { nil }
    public var preferredReadSize: Int { 0 }
    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? { nil }
}

/// What a provider produced for a read.
public enum PageContent: Sendable, Hashable {
    /// The first `count` bytes of the buffer hold data; the resolver zero-fills the rest.
    case bytes(Int)
    /// The whole range is zero (resolved with `UFFDIO_ZEROPAGE`, without a copy).
    case zeros
}

/// An error a provider throws that can say whether retrying could help.
///
/// The resolver retries failed reads per its ``FailurePolicy``; a ``isPermanent`` failure (an object that does not
/// exist, access denied, a range the source cannot serve) skips those retries and goes straight to the policy's final
/// resolution. Errors that don't conform are retried.
public protocol ProviderFailure: Error {
    /// Whether the same read would fail again.
    var isPermanent: Bool { get }
}
