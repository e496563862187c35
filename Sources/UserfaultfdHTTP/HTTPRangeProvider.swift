import Foundation
import Synchronization
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Userfaultfd

/// Serves a remote object over HTTP with range requests (`Range: bytes=a-b`), so any URL that supports them — an S3
/// presigned URL, a GCS signed URL, a file behind nginx — can back a `LazyRegion`.
///
/// ```swift
/// let provider = try await HTTPRangeProvider.open(url: url, headers: ["Authorization": "Bearer \(token)"])
/// try await LazyRegion.with(length: provider.size!, provider: provider) { region in
///     // the first touch of a page fetches its block
/// }
/// print(provider.statistics)   // requests, retries, bytes, joined reads...
/// ```
///
/// ## Reads
/// - Every request is aligned to ``Options/blockSize`` (default 1 MiB), which is also ``preferredReadSize``, so a
///   `FaultResolver` aligns its clusters to blocks; one read covering adjacent blocks makes one request.
/// - A read of a block that is already being fetched joins that request (one request per block in flight), and the
///   most recent blocks are kept (``Options/cachedBlocks``) so a later read of another part of one needs no request.
/// - At most ``Options/maxConcurrentRequests`` requests are in flight; each has a timeout (``Options/requestTimeout``)
///   and is retried on timeouts, connection errors, 408, 429 and 5xx with exponential backoff and jitter, honouring
///   `Retry-After`.
/// - Only `206 Partial Content` with the matching `Content-Range` is accepted. A `200` with the whole object is used
///   (and the object kept in memory) only if the object is at most ``Options/wholeObjectLimit`` bytes.
/// - The object's version is pinned (``Options/pinVersion``): `If-Match` with its ETag, or `If-Unmodified-Since` with its
///   Last-Modified, and every response is checked against it, so an object replaced mid-read fails with
///   ``HTTPRangeError/Code/objectChanged`` rather than mixing two versions.
/// - 403, 404, 416 and the like are permanent ``HTTPRangeError``s (`ProviderFailure`): the resolver skips its retries
///   and applies the region's `FailurePolicy` at once.
///
/// Authentication travels in the URL (presigned and signed URLs: no signing here) or in ``headers``.
/// Requests run on a `URLSession` whose callbacks use a serial queue of their own, and its timeouts and backoffs use
/// `PoolFreeClock`'s: nothing waits on Swift's cooperative pool or libdispatch's shared workers (see the Executors article of `Userfaultfd`).
public final class HTTPRangeProvider: PageProvider {
    private struct State {
        /// Block index → the block read that is fetching it.
        var inFlight: [Int: Int] = [:]
        var reads: [Int: BlockRead] = [:]
        var nextReadID = 0
        /// Recently fetched blocks (most recent last in `cacheOrder`).
        var cache: [Int: Data] = [:]
        var cacheOrder: [Int] = []
        /// The whole object, when a server sent it whole and it was small enough to keep.
        var whole: Data?
        /// The first permanent failure (see ``Options/failFastAfterPermanentError``).
        var permanentFailure: HTTPRangeError?
    }

    private struct BlockRead {
        let blocks: Range<Int>
        var waiters: [HTTPPendingRead]
        var request: HTTPRetryingRequest?
    }

    /// The object's URL (with its query, e.g. a presigned signature).
    public let url: URL
    /// Headers sent with every request (e.g. `Authorization`).
    public let headers: [String: String]
    /// How the provider reads.
    public let options: Options
    /// The object's size and validators, as seen when it was opened.
    public let version: HTTPObjectVersion
    private let blockSize: Int
    private let transport: HTTPTransport
    private let counters: HTTPCounters
    private let state: Mutex<State>

    /// Bytes in the object; the region reads zeros past them.
    public var size: Int? { version.size }

    /// The block size: the resolver aligns its reads to it.
    public var preferredReadSize: Int { blockSize }

    /// A provider for an object whose size (and, ideally, ETag or Last-Modified) you already know: no request is made
    /// until the first read. Use ``open(url:headers:options:)`` to find them.
    /// - Throws: ``HTTPRangeError/Code/invalidURL`` unless `url` is `http` or `https`.
    /// - Throws: ``HTTPRangeError/Code/missingSize`` for a negative size, ``HTTPRangeError/Code/objectTooLarge`` for one
    ///   above ``maximumObjectSize``.
    public convenience init(url: URL, version: HTTPObjectVersion, headers: [String: String] = [:], options: Options = .init()) throws(HTTPRangeError) {
        try Self.checkScheme(url)
        try Self.checkSize(version.size, url: url.absoluteString)
        let counters = HTTPCounters()
        self.init(url: url, version: version, headers: headers, options: options,
                  transport: Self.transport(headers: headers, options: options, counters: counters),
                  counters: counters, whole: nil)
    }

    /// The largest object a provider accepts: 2^56 bytes, more than the address space Linux gives a process (57-bit
    /// virtual addresses leave 2^56 bytes to user space). A larger size from a server is a lie or an attack, and is
    /// refused with ``HTTPRangeError/Code/objectTooLarge`` before any arithmetic is done on it.
    public static let maximumObjectSize = 1 << 56

    /// Checks a size from a server or a caller: 0 up to ``maximumObjectSize``.
    static func checkSize(_ size: Int, url: String, range: ClosedRange<Int>? = nil) throws(HTTPRangeError) {
        guard size >= 0 else { throw HTTPRangeError(.missingSize, url: url, range: range, detail: "size \(size)") }
        guard size <= maximumObjectSize else {
            throw HTTPRangeError(.objectTooLarge, url: url, range: range, detail: "\(size) bytes, more than \(maximumObjectSize)")
        }
    }

    private static func transport(headers: [String: String], options: Options, counters: HTTPCounters) -> HTTPTransport {
        HTTPTransport(maxConcurrentRequests: options.effectiveMaxConcurrentRequests, counters: counters,
                      redirects: HTTPRedirectCheck(policy: options.redirects, headers: headers))
    }

    private init(url: URL, version: HTTPObjectVersion, headers: [String: String], options: Options,
                 transport: HTTPTransport, counters: HTTPCounters, whole: Data?) {
        self.url = url
        self.headers = headers
        self.options = options
        self.version = version
        self.blockSize = options.effectiveBlockSize
        self.transport = transport
        self.counters = counters
        self.state = Mutex(State(whole: whole))
    }

    /// Opens the object at `url`: finds its size and version with a `GET` of bytes 0-0 (see ``SizeProbe``), so a
    /// `LazyRegion` can be made from the URL alone.
    ///
    /// A server that answers the probe with the whole object (no range support) is accepted if the object is at most
    /// ``Options/wholeObjectLimit`` bytes: it is kept and served from memory.
    /// - Throws: ``HTTPRangeError``: the status of a refused `GET`, ``HTTPRangeError/Code/missingSize``,
    ///   ``HTTPRangeError/Code/badContentRange``, ``HTTPRangeError/Code/objectTooLarge`` (a size above
    ///   ``maximumObjectSize``), ``HTTPRangeError/Code/fullBodyForRange``, ``HTTPRangeError/Code/redirectRefused``, a
    ///   timeout or transport error after the retries.
    public static func open(url: URL, headers: [String: String] = [:], options: Options = .init()) async throws(HTTPRangeError) -> HTTPRangeProvider {
        try checkScheme(url)
        let counters = HTTPCounters()
        let transport = Self.transport(headers: headers, options: options, counters: counters)
        let probe = HTTPSizeProbe(url: url, headers: headers, options: options, transport: transport)
        let found = try await probe.run()
        return HTTPRangeProvider(url: url, version: found.version, headers: headers, options: options,
                                 transport: transport, counters: counters, whole: found.whole)
    }

    private static func checkScheme(_ url: URL) throws(HTTPRangeError) {
        guard let scheme = url.scheme?.lowercased(), scheme == "http" || scheme == "https", url.host != nil else {
            throw HTTPRangeError(.invalidURL, url: url.absoluteString)
        }
    }

    /// The counters so far.
    public var statistics: Statistics { counters.value.withLock { $0 } }

    /// HTTP requests sent so far (probes, block reads, retries).
    public var requestCount: Int { statistics.requests }

    /// The first permanent failure of a read, if any: with ``Options/failFastAfterPermanentError``, every later read
    /// fails with it at once.
    public var permanentFailure: HTTPRangeError? { state.withLock { $0.permanentFailure } }

    /// Whether the whole object is held in memory (the server sent it whole).
    public var holdsWholeObject: Bool { state.withLock { $0.whole != nil } }

    /// Serves the read from memory when every byte of it is there (the whole object, or recently fetched blocks);
    /// `nil` otherwise.
    public func readImmediately(into buffer: PageBuffer, at offset: Int) throws -> PageContent? {
        let length = min(buffer.count, version.size - offset)
        guard length > 0 else { return .zeros }
        guard let pieces = memoryPieces(offset: offset, length: length) else { return nil }
        for (data, dataOffset) in pieces {
            Self.copy(data, at: dataOffset, into: buffer, bufferOffset: offset, length: length)
        }
        counters.value.withLock { $0.cacheHits += 1 }
        return .bytes(length)
    }

    /// Fills `buffer` with the object bytes at `offset`: from memory, by joining requests already in flight for its
    /// blocks, or with one range request per run of adjacent missing blocks.
    /// - Throws: ``HTTPRangeError`` (after the provider's retries), or `CancellationError` when the task is cancelled.
    public func read(into buffer: PageBuffer, at offset: Int) async throws -> PageContent {
        if let content = try readImmediately(into: buffer, at: offset) { return content }
        let length = min(buffer.count, version.size - offset)
        let firstBlock = offset / blockSize, endBlock = (offset + length - 1) / blockSize + 1
        // One pass under the lock: blocks in memory, blocks some read is fetching (join it), runs of adjacent blocks
        // nobody has asked for (one request each). The waiter knows how many deliveries to expect before any can come.
        let (pending, cached, started, joinedAny) = try state.withLock { state throws(HTTPRangeError) in
            if options.failFastAfterPermanentError, let failure = state.permanentFailure { throw failure }
            var cached: [(Data, Int)] = []
            var joined: [Int] = []
            var runs: [Range<Int>] = []
            var block = firstBlock
            while block < endBlock {
                if let data = state.cache[block] {
                    cached.append((data, block * blockSize))
                    touch(block, in: &state)
                    block += 1
                } else if let id = state.inFlight[block] {
                    if !joined.contains(id) { joined.append(id) }
                    block += 1
                } else {
                    var end = block + 1
                    while end < endBlock, state.cache[end] == nil, state.inFlight[end] == nil { end += 1 }
                    runs.append(block..<end)
                    block = end
                }
            }
            let pending = HTTPPendingRead(buffer: buffer, offset: offset, length: length,
                                          pieces: cached.count + joined.count + runs.count)
            for id in joined { state.reads[id]?.waiters.append(pending) }
            let started = runs.map { startBlockRead($0, waiter: pending, state: &state) }
            return (pending, cached, started, !joined.isEmpty)
        }
        if joinedAny { counters.value.withLock { $0.joinedReads += 1 } }
        for (data, dataOffset) in cached { pending.deliver(data, at: dataOffset) }
        for request in started { request.start() }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { pending.arm($0) }
        } onCancel: {
            pending.fail(CancellationError())
        }
    }

    /// Registers a block read of `blocks` with `waiter`; the caller starts it after releasing the lock.
    private func startBlockRead(_ blocks: Range<Int>, waiter: HTTPPendingRead, state: inout State) -> HTTPRetryingRequest {
        let id = state.nextReadID
        state.nextReadID += 1
        for block in blocks { state.inFlight[block] = id }
        let first = blocks.lowerBound * blockSize
        let last = min(blocks.upperBound * blockSize, version.size) - 1
        let request = HTTPRetryingRequest(
            transport: transport, options: options, request: makeRequest(range: first...last), range: first...last,
            bodyLimit: max(last - first + 1, version.size <= options.wholeObjectLimit ? version.size : 0),
            accept: { [version, options, url] response in
                if response.statusCode == 206 {
                    // A 206 whose length is not the range's: stop before the body.
                    return HTTPSizeProbe.lengthMismatch(response, range: first...last, url: url.absoluteString)
                }
                // A whole body for a large object: stop the transfer before it arrives.
                guard response.statusCode == 200, version.size > options.wholeObjectLimit else { return nil }
                return HTTPRangeError(.fullBodyForRange, url: url.absoluteString, range: first...last,
                                      detail: "\(version.size) bytes, more than the \(options.wholeObjectLimit) taken whole")
            },
            validate: { [self] reply in validateBlock(reply, range: first...last) },
            completion: { [self] result in blockReadEnded(id, result: result, range: first...last) })
        state.reads[id] = BlockRead(blocks: blocks, waiters: [waiter], request: request)
        counters.value.withLock { $0.blockReads += 1 }
        return request
    }

    /// Checks a reply to a range request: `206` with the exact `Content-Range` and body, or the whole small object; and
    /// the object's version.
    private func validateBlock(_ reply: HTTPReply, range: ClosedRange<Int>) -> HTTPRangeError? {
        let url = url.absoluteString
        switch reply.status {
        case 206:
            guard let header = reply.header("Content-Range"), let contentRange = HTTPContentRange(header) else {
                return HTTPRangeError(.badContentRange, url: url, range: range, detail: "Content-Range: \(reply.header("Content-Range") ?? "(none)")")
            }
            if let total = contentRange.total, total != version.size {
                return HTTPRangeError(.objectChanged, url: url, range: range, detail: "size \(total), was \(version.size)")
            }
            guard contentRange.first == range.lowerBound, contentRange.last == range.upperBound else {
                return HTTPRangeError(.badContentRange, url: url, range: range, detail: "Content-Range: \(header)")
            }
            if let changed = versionMismatch(reply, range: range) { return changed }
            guard reply.body.count == range.count else {
                return HTTPRangeError(.truncatedBody, url: url, range: range, detail: "\(reply.body.count) of \(range.count) bytes")
            }
            return nil
        case 200:
            guard version.size <= options.wholeObjectLimit else {
                return HTTPRangeError(.fullBodyForRange, url: url, range: range)
            }
            if let changed = versionMismatch(reply, range: range) { return changed }
            guard reply.body.count == version.size else {
                return HTTPRangeError(.objectChanged, url: url, range: range, detail: "whole body of \(reply.body.count) bytes, was \(version.size)")
            }
            return nil
        case 412:
            return HTTPRangeError(.objectChanged, url: url, range: range, detail: "412 Precondition Failed on \(pinDescription)")
        default:
            return HTTPRangeError(.status(reply.status), url: url, range: range)
        }
    }

    private var pinDescription: String {
        version.hasStrongETag ? "If-Match \(version.etag!)" : "If-Unmodified-Since \(version.lastModified ?? "?")"
    }

    /// An error if the reply names another version than the pinned one.
    private func versionMismatch(_ reply: HTTPReply, range: ClosedRange<Int>) -> HTTPRangeError? {
        guard options.pinVersion else { return nil }
        if let pinned = version.etag {
            if let etag = reply.header("ETag"), etag != pinned {
                return HTTPRangeError(.objectChanged, url: url.absoluteString, range: range, detail: "ETag \(etag), was \(pinned)")
            }
        } else if let pinned = version.lastModified, let modified = reply.header("Last-Modified"), modified != pinned {
            return HTTPRangeError(.objectChanged, url: url.absoluteString, range: range, detail: "Last-Modified \(modified), was \(pinned)")
        }
        return nil
    }

    private func makeRequest(range: ClosedRange<Int>) -> URLRequest {
        var request = URLRequest(url: url)
        request.httpMethod = "GET"
        for (name, value) in headers { request.setValue(value, forHTTPHeaderField: name) }
        request.setValue("bytes=\(range.lowerBound)-\(range.upperBound)", forHTTPHeaderField: "Range")
        request.setValue("identity", forHTTPHeaderField: "Accept-Encoding")
        if options.pinVersion {
            if version.hasStrongETag {
                request.setValue(version.etag, forHTTPHeaderField: "If-Match")
            } else if let lastModified = version.lastModified {
                request.setValue(lastModified, forHTTPHeaderField: "If-Unmodified-Since")
            }
        }
        return request
    }

    /// A block read ended: its blocks leave the in-flight table (and enter the cache), its waiters get their part.
    private func blockReadEnded(_ id: Int, result: Result<HTTPReply, HTTPRangeError>, range: ClosedRange<Int>) {
        let waiters = state.withLock { state -> [HTTPPendingRead] in
            guard let read = state.reads.removeValue(forKey: id) else { return [] }
            for block in read.blocks where state.inFlight[block] == id { state.inFlight[block] = nil }
            if case .success(let reply) = result {
                if reply.status == 200 {
                    state.whole = reply.body
                } else {
                    for block in read.blocks {
                        let start = block * blockSize - range.lowerBound
                        let end = min(start + blockSize, reply.body.count)
                        state.cache[block] = reply.body.subdata(in: start..<end)
                        touch(block, in: &state)
                    }
                }
            }
            return read.waiters
        }
        switch result {
        case .success(let reply):
            counters.value.withLock { $0.blocksFetched += reply.status == 200 ? (version.size + blockSize - 1) / blockSize : (range.count + blockSize - 1) / blockSize }
            let dataOffset = reply.status == 200 ? 0 : range.lowerBound
            for waiter in waiters { waiter.deliver(reply.body, at: dataOffset) }
        case .failure(let error):
            counters.value.withLock { $0.failedBlockReads += 1 }
            if error.isPermanent {
                state.withLock { state in
                    if state.permanentFailure == nil { state.permanentFailure = error }
                }
            }
            for waiter in waiters { waiter.fail(error) }
        }
    }

    /// Marks `block` most recently used, evicting the least recent beyond ``Options/cachedBlocks``.
    private func touch(_ block: Int, in state: inout State) {
        if let index = state.cacheOrder.lastIndex(of: block) { state.cacheOrder.remove(at: index) }
        state.cacheOrder.append(block)
        while state.cacheOrder.count > max(0, options.cachedBlocks) {
            state.cache[state.cacheOrder.removeFirst()] = nil
        }
    }

    /// The in-memory data covering `length` bytes at `offset` (whole object, or every block cached), or nil.
    private func memoryPieces(offset: Int, length: Int) -> [(Data, Int)]? {
        state.withLock { state -> [(Data, Int)]? in
            if let whole = state.whole { return [(whole, 0)] }
            let firstBlock = offset / blockSize, endBlock = (offset + length - 1) / blockSize + 1
            var pieces: [(Data, Int)] = []
            for block in firstBlock..<endBlock {
                guard let data = state.cache[block] else { return nil }
                pieces.append((data, block * blockSize))
            }
            for block in firstBlock..<endBlock { touch(block, in: &state) }
            return pieces
        }
    }

    /// Copies the part of `data` (object bytes from `dataOffset`) inside `bufferOffset..<bufferOffset + length`.
    private static func copy(_ data: Data, at dataOffset: Int, into buffer: PageBuffer, bufferOffset: Int, length: Int) {
        let start = max(bufferOffset, dataOffset), end = min(bufferOffset + length, dataOffset + data.count)
        guard start < end else { return }
        _ = data.withUnsafeBytes { bytes in
            buffer.copy(from: UnsafeRawBufferPointer(rebasing: bytes[(start - dataOffset)..<(end - dataOffset)]), at: start - bufferOffset)
        }
    }
}
