import Userfaultfd

extension HTTPRangeProvider {
    /// Counters of an ``HTTPRangeProvider``: what went over the wire, and how often a read needed no request.
    public struct Statistics: Sendable, Hashable, CustomStringConvertible {
        /// HTTP requests sent: size probes, block reads and their retries.
        public var requests = 0
        /// Body bytes received.
        public var bytesReceived = 0
        /// Requests that were a retry of a failed one.
        public var retries = 0
        /// Block reads started (each one request for a run of adjacent blocks, plus its retries).
        public var blockReads = 0
        /// Blocks received.
        public var blocksFetched = 0
        /// Provider reads that waited for a block another read had already asked for, instead of asking again.
        public var joinedReads = 0
        /// Provider reads served entirely from memory (recent blocks, or an object taken whole).
        public var cacheHits = 0
        /// Block reads that failed for good (after their retries).
        public var failedBlockReads = 0
        /// The most requests in flight at once.
        public var peakConcurrentRequests = 0

        /// All zero.
        public init() {}

        /// One line with every counter.
        public var description: String {
            """
            requests \(requests), retries \(retries), bytes received \(bytesReceived), block reads \(blockReads), \
            blocks fetched \(blocksFetched), joined reads \(joinedReads), cache hits \(cacheHits), \
            failed block reads \(failedBlockReads), peak concurrent requests \(peakConcurrentRequests)
            """
        }
    }
}

/// The version of a remote object an ``HTTPRangeProvider`` reads: its size and validators, as seen when it was opened.
public struct HTTPObjectVersion: Sendable, Hashable, CustomStringConvertible {
    /// Bytes in the object.
    public var size: Int
    /// The `ETag` header, quotes included (`"…"`, or `W/"…"` for a weak one), if the server sent one.
    public var etag: String?
    /// The `Last-Modified` header, if the server sent one.
    public var lastModified: String?

    /// A version; with neither validator, reads cannot detect a replaced object.
    public init(size: Int, etag: String? = nil, lastModified: String? = nil) {
        self.size = size
        self.etag = etag
        self.lastModified = lastModified
    }

    /// Whether the ETag is a strong one (usable with `If-Match`).
    var hasStrongETag: Bool {
        guard let etag else { return false }
        return !etag.hasPrefix("W/")
    }

    /// Size and validators, e.g. `1048576 bytes, ETag "…"`.
    public var description: String {
        "\(size) bytes" + (etag.map { ", ETag \($0)" } ?? "") + (lastModified.map { ", Last-Modified \($0)" } ?? "")
    }
}
