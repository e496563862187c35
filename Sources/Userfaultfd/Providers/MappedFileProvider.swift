/// Serves a file synchronously: reads copy straight from the page cache (`pread(2)`, see ``FileMapping``) inside the
/// resolver's event handler, with no thread hop. A file truncated meanwhile fails the reads past its new end with
/// ``UserfaultError/Code/fileTruncated`` (then the resolver's ``FailurePolicy``) instead of raising SIGBUS.
///
/// Fastest for files that are in the page cache (VM snapshots being restored, hot data). A read of a page that is not
/// cached waits for the disk on the resolver's queue, delaying other faults meanwhile; for cold files on slow storage
/// prefer ``FileProvider``.
public struct MappedFileProvider: PageProvider {
    private let mapping: FileMapping

    /// Opens `path` read-only.
    public init(path: String) throws(UserfaultError) {
        mapping = try FileMapping(path: path)
    }

    /// Shares an open file (several regions, or several VMs, served from one file).
    public init(mapping: FileMapping) {
        self.mapping = mapping
    }

    public var size: Int? { mapping.size }

    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
        .bytes(try mapping.read(into: buffer, at: offset))
    }

    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? {
        .bytes(try mapping.read(into: buffer, at: offset))
    }
}
