import Userfaultfd

extension HTTPRangeProvider {
    /// How an ``HTTPRangeProvider`` reads: block size, concurrency, timeouts, retries, caching.
    ///
    /// The worst case for one block is about `maxAttempts × requestTimeout` plus the backoffs: keep the resolver's
    /// `FaultResolver.Options.providerTimeout` above that (the defaults, 4 × 10 s here and 60 s there, fit).
    public struct Options: Sendable, Hashable {
        /// Bytes per request, and the alignment of every request (rounded up to a multiple of 4096, at most 1 GiB).
        /// Default 1 MiB.
        ///
        /// Also the provider's ``HTTPRangeProvider/preferredReadSize``, so a `FaultResolver` aligns its clusters to it.
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
        /// Which redirects are followed. Default ``RedirectPolicy/sameOrigin``: a redirect to another scheme, host or
        /// port fails with ``HTTPRangeError/Code/redirectRefused`` before anything is sent there.
        public var redirects: RedirectPolicy

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
            sizeProbe: SizeProbe = .automatic,
            redirects: RedirectPolicy = .sameOrigin
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
            self.redirects = redirects
        }

        /// The block size actually used: a multiple of 4096 from 4096 to 1 GiB.
        var effectiveBlockSize: Int { (min(max(blockSize, 4096), 1 << 30) + 4095) / 4096 * 4096 }
        var effectiveMaxAttempts: Int { max(1, maxAttempts) }
        var effectiveMaxConcurrentRequests: Int { max(1, maxConcurrentRequests) }

        /// The wait before retry number `retry` (1-based): exponential, capped, with jitter in its upper half.
        func backoff(beforeRetry retry: Int) -> Duration {
            let base = min(initialBackoff * (1 << min(max(retry - 1, 0), 20)), maxBackoff)
            return base * Double.random(in: 0.5...1.0)
        }
    }

    /// How the size (and version) of an object is found when it is opened.
    ///
    /// Always a `GET` of bytes 0-0, whose `Content-Range` total the provider parses and checks itself. No `HEAD`: on
    /// Linux the transport (FoundationNetworking) converts a response's `Content-Length` through a `Double` and traps on
    /// a hostile one (2^63 − 1) before the provider sees it, and a `HEAD`'s `Content-Length` is the object size.
    public enum SizeProbe: Sendable, Hashable {
        /// `GET` of bytes 0-0 (`206` with `Content-Range: bytes 0-0/SIZE`; `416` with `bytes */0` for an empty object;
        /// `200` with the whole body from a server without ranges, kept if small enough).
        case automatic
        /// The same as ``automatic`` (it used to mean "no `HEAD` first"; no probe sends `HEAD` any more).
        case rangeGet
    }

    /// Which redirects the provider follows. A redirect that is refused fails with
    /// ``HTTPRangeError/Code/redirectRefused`` and nothing is sent to its target. A redirect from `https` to `http` is
    /// always refused.
    public enum RedirectPolicy: Sendable, Hashable {
        /// Only to the origin (scheme, host and port) of the provider's URL, with every header. The default.
        case sameOrigin
        /// To any origin too; a request sent to another origin than the provider's URL goes without `Authorization`,
        /// `Proxy-Authorization`, `Cookie` and the provider's ``HTTPRangeProvider/headers`` (credentials meant for the
        /// first host), as with a presigned URL whose signature travels in the new URL.
        case anyOrigin
        /// None.
        case none
    }
}
