/// Serves a file through a read-only mapping, synchronously: reads copy straight from the page cache inside the
/// resolver's event handler, with no thread hop.
///
/// Fastest for files that are in the page cache (VM snapshots being restored, hot data). A read of a page that is not
/// cached waits for the disk on the resolver's queue, delaying other faults meanwhile; for cold files on slow storage
/// prefer ``FileProvider``.
public struct MappedFileProvider: PageProvider {
    private let mapping: FileMapping

    /// Maps `path` read-only.
    public init(path: String) throws(UserfaultError) {
        mapping = try FileMapping(path: path)
    }

    /// Shares an existing mapping (several regions, or several VMs, served from one file).
    public init(mapping: FileMapping) {
        self.mapping = mapping
    }

    public var size: Int? { mapping.size }

    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
        .bytes(mapping.copy(into: buffer, at: offset))
    }

    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? {
        .bytes(mapping.copy(into: buffer, at: offset))
    }
}
