import Foundation
import Glibc
import Userfaultfd
import UserfaultfdHTTP

/// `uffd s3-slice URL --offset N --length N`: a presigned S3 URL (or any URL that serves ranges) exposed as memory; one
/// slice of it is read from that memory and written out, and the statistics show that only the blocks under the slice
/// were fetched.
public struct S3SliceCommand: Sendable {
    /// What one run did.
    public struct Outcome: Sendable {
        /// The region's counters (faults, pages copied...).
        public var resolver: FaultResolver.Statistics
        /// The provider's counters (requests, blocks fetched...).
        public var provider: HTTPRangeProvider.Statistics
        /// Blocks in the whole object.
        public var totalBlocks: Int
        /// Blocks the slice covers.
        public var sliceBlocks: Int
    }

    /// The object's URL (a presigned URL carries its credentials in the query).
    public var url: String
    /// First byte of the slice.
    public var offset: Int
    /// Bytes in the slice (clipped to the end of the object).
    public var length: Int
    /// Range-request block size.
    public var blockSize: Int
    /// Headers for every request (e.g. `Authorization` for a non-presigned URL).
    public var headers: [String: String]
    /// Where the slice goes.
    public var output: Int32
    /// Statistics on stderr.
    public var showStatistics: Bool

    /// A run with the given slice and settings.
    public init(url: String, offset: Int, length: Int, blockSize: Int = 1 << 20, headers: [String: String] = [:],
                output: Int32 = STDOUT_FILENO, showStatistics: Bool = true) {
        self.url = url
        self.offset = offset
        self.length = length
        self.blockSize = blockSize
        self.headers = headers
        self.output = output
        self.showStatistics = showStatistics
    }

    /// Opens the object, maps it lazily, writes the slice, and returns the counters.
    @discardableResult
    public func run() async throws -> Outcome {
        guard let url = URL(string: url) else { throw ToolError("uffd s3-slice: not a valid URL: \(self.url)") }
        let provider = try await HTTPRangeProvider.open(url: url, headers: headers, options: .init(blockSize: blockSize))
        let size = provider.size ?? 0
        guard offset >= 0, offset < size else {
            throw ToolError("uffd s3-slice: --offset \(offset) is outside the object (\(size) bytes)")
        }
        let end = min(size, offset + max(0, length))
        let block = provider.preferredReadSize
        // Readahead up to one block: a cluster never reaches past the block of the fault, so only the slice's blocks come.
        // Only the slice's blocks: no asynchronous readahead past what is touched.
        let options = FaultResolver.Options(readahead: .adaptive(maximum: block, asynchronous: false))
        let resolver = try await LazyRegion.with(length: size, provider: provider, options: options) { region in
            try await CatCommand.copyOut(region, range: offset..<end, output: output, showProgress: false, command: "s3-slice")
            return region.statistics
        }
        let outcome = Outcome(resolver: resolver, provider: provider.statistics, totalBlocks: (size + block - 1) / block,
                              sliceBlocks: end > offset ? (end - 1) / block - offset / block + 1 : 0)
        if showStatistics {
            writeError("""
                uffd s3-slice: bytes \(offset)-\(end - 1) of \(size) (\(provider.version))
                uffd s3-slice: blocks of \(block) bytes: \(outcome.provider.blocksFetched) fetched of \(outcome.totalBlocks) \
                (the slice covers \(outcome.sliceBlocks)); \(outcome.provider.requests) requests, \
                \(outcome.provider.bytesReceived) bytes received
                uffd s3-slice: http: \(outcome.provider)
                uffd s3-slice: region: \(resolver)

                """)
        }
        return outcome
    }
}
