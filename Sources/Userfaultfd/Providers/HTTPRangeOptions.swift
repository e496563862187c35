extension HTTPRangeProvider {
    /// How an ``HTTPRangeProvider`` reads: block size, concurrency, timeouts, retries, caching.
    ///
    /// The worst case for one block is about `maxAttempts × requestTimeout` plus the backoffs: keep the resolver's
    /// ``FaultResolver/Options/providerTimeout`` above that (the defaults, 4 × 10 s here and 60 s there, fit).
    public struct Options: Sendable, Hashable {
        /// Bytes per request, and the alignment of every request (rounded up to a multiple of 4096). Default 1 MiB.
        ///
        /// Also the provider's ``HTTPRangeProvider/preferredReadSize``, so a ``FaultResolver`` aligns its clusters to it.
        public var blockSize: Int
        /// HTTP requests in flight at most (block reads beyond wait their turn). Default 8.
        public var maxConcurrentRequests: Int
        /// Longest wait for one complete response (headers and body). Default 10 s.
        public var requestTimeout: Duration
        /// Requests per block read at most, first one included (retries on timeouts, connection errors, 408, 429, 5xx).
        /// Default 4.
        public var maxAttempts: Int
        /// Wait before the first retry; doubled for each further one, up to ``maxBackoff``, with jitter (each wait is
        /// drawn from the upper half of its range). Default 50 ms.
        public var initialBackoff: Duration
        /// Longest computed wait between attempts. Default 2 s.
        public var maxBackoff: Duration
        /// Longest `Retry-After` (on 429 and 503) the provider honours; a longer one fails the read at once. Default 30 s.
        public var maxRetryAfter: Duration
        /// An object at most this large may be taken whole when a server answers a range request with `200` and the
        /// full body: it is then kept in memory and served from there. Larger objects fail with
        /// ``HTTPRangeError/Code/fullBodyForRange``. Default 8 MiB.
        public var wholeObjectLimit: Int
        /// Recently fetched blocks kept in memory, so a later read of another part of a block needs no request.
        /// Default 16.
        public var cachedBlocks: Int
        /// Send the version seen when the object was opened with every read (`If-Match` with its ETag, or
        /// `If-Unmodified-Since` with its Last-Modified), and check every response against it: an object replaced
        /// mid-read fails with ``HTTPRangeError/Code/objectChanged`` instead of mixing data. Default true.
        public var pinVersion: Bool
        /// After a permanent failure (403, 404, object changed, no range support...), fail every later read at once with
        /// the same error instead of asking the server again: they would all fail the same way. Default true.
        public var failFastAfterPermanentError: Bool
        /// How ``HTTPRangeProvider/open(url:headers:options:)`` finds the size. Default ``SizeProbe/automatic``.
        public var sizeProbe: SizeProbe

        /// Options with the defaults above, any of them overridden.
        public init(
            blockSize: Int = 1 << 20,
            maxConcurrentRequests: Int = 8,
            requestTimeout: Duration = .seconds(10),
            maxAttempts: Int = 4,
            initialBackoff: Duration = .milliseconds(50),
            maxBackoff: Duration = .seconds(2),
            maxRetryAfter: Duration = .seconds(30),
            wholeObjectLimit: Int = 8 << 20,
            cachedBlocks: Int = 16,
            pinVersion: Bool = true,
            failFastAfterPermanentError: Bool = true,
            sizeProbe: SizeProbe = .automatic
        ) {
            self.blockSize = blockSize
            self.maxConcurrentRequests = maxConcurrentRequests
            self.requestTimeout = requestTimeout
            self.maxAttempts = maxAttempts
            self.initialBackoff = initialBackoff
            self.maxBackoff = maxBackoff
            self.maxRetryAfter = maxRetryAfter
            self.wholeObjectLimit = wholeObjectLimit
            self.cachedBlocks = cachedBlocks
            self.pinVersion = pinVersion
            self.failFastAfterPermanentError = failFastAfterPermanentError
            self.sizeProbe = sizeProbe
        }

        /// The block size actually used: at least 4096, a multiple of 4096.
        var effectiveBlockSize: Int { (max(blockSize, 4096) + 4095) / 4096 * 4096 }
        var effectiveMaxAttempts: Int { max(1, maxAttempts) }
        var effectiveMaxConcurrentRequests: Int { max(1, maxConcurrentRequests) }

        /// The wait before retry number `retry` (1-based): exponential, capped, with jitter in its upper half.
        func backoff(beforeRetry retry: Int) -> Duration {
            let base = min(initialBackoff * (1 << min(max(retry - 1, 0), 20)), maxBackoff)
            return base * Double.random(in: 0.5...1.0)
        }
    }

    /// How the size (and version) of an object is found when it is opened.
    public enum SizeProbe: Sendable, Hashable {
        /// `HEAD`; when it is refused (e.g. `403` on a presigned GET URL) or says nothing usable, `GET` of bytes 0-0.
        case automatic
        /// `GET` of bytes 0-0 only (one request fewer for URLs that only allow GET).
        case rangeGet
    }
}
