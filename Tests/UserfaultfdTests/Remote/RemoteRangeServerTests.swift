import Foundation
import Testing
import Userfaultfd
import UserfaultfdHTTP

/// Remote memory from an HTTP range server with fault injection (Tests/Fixtures/range_server.py): retries where they
/// help, permanent errors straight to the failure policy and the application, nothing hangs.
@Suite("Remote: range server with fault injection", .enabled(if: !remoteTestsSkipped, "UFFD_SKIP_REMOTE_TESTS=1"))
struct RemoteRangeServerTests {
    static let block = 64 << 10

    /// Options that keep failing tests short.
    static func options(_ change: (inout HTTPRangeProvider.Options) -> Void = { _ in }) -> HTTPRangeProvider.Options {
        var options = HTTPRangeProvider.Options(blockSize: block, requestTimeout: .seconds(5), initialBackoff: .milliseconds(20))
        change(&options)
        return options
    }

    static func open(_ server: FixtureServer, _ path: String, _ change: (inout HTTPRangeProvider.Options) -> Void = { _ in })
        async throws -> HTTPRangeProvider {
        try await HTTPRangeProvider.open(url: URL(string: server.baseURL + path)!, options: options(change))
    }

    @Test("intermittent 500s: the provider retries and the data is right", .timeLimit(.minutes(1)))
    func intermittentServerErrors() async throws {
        try await withRangeServer(size: 1 << 20) { server in
            let provider = try await Self.open(server, "/flaky?fail_first=3")
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 100_000..<300_000) == Array(server.data[100_000..<300_000]))
            }
            #expect(provider.statistics.retries == 3, "\(provider.statistics)")
            let stats = try await server.stats().scenario("/flaky")
            #expect(stats?.statuses.first == 206, "the size probe: \(String(describing: stats))")
            #expect(stats?.statuses.dropFirst().prefix(3) == [500, 500, 500], "\(String(describing: stats))")
        }
    }

    @Test("429 with Retry-After: the retry waits as long as the server asks", .timeLimit(.minutes(1)))
    func retryAfter() async throws {
        try await withRangeServer(size: 256 << 10) { server in
            let provider = try await Self.open(server, "/busy?fail_first=1&fail_status=429&retry_after=1")
            let started = ContinuousClock.now
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<4096) == Array(server.data[0..<4096]))
            }
            let elapsed = ContinuousClock.now - started
            #expect(elapsed >= .milliseconds(950), "waited \(elapsed)")
            #expect(provider.statistics.retries == 1)
        }
    }

    @Test("a connection dropped mid-body is retried", .timeLimit(.minutes(1)))
    func droppedConnection() async throws {
        try await withRangeServer(size: 1 << 20) { server in
            let provider = try await Self.open(server, "/drop?drop_first=2")
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<(256 << 10)) == Array(server.data[0..<(256 << 10)]))
            }
            #expect(provider.statistics.retries >= 2, "\(provider.statistics)")
        }
    }

    @Test("slow answers within the timeout succeed without retries", .timeLimit(.minutes(1)))
    func slowWithinTimeout() async throws {
        try await withRangeServer(size: 512 << 10) { server in
            let provider = try await Self.open(server, "/slow?latency_ms=300")
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 70_000..<200_000) == Array(server.data[70_000..<200_000]))
            }
            #expect(provider.statistics.retries == 0)
        }
    }

    @Test("an answer slower than the timeout is abandoned and retried", .timeLimit(.minutes(1)))
    func slowBeyondTimeout() async throws {
        try await withRangeServer(size: 512 << 10) { server in
            let provider = try await Self.open(server, "/stall?slow_first=1&slow_ms=20000") { $0.requestTimeout = .milliseconds(500) }
            let started = ContinuousClock.now
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<8192) == Array(server.data[0..<8192]))
            }
            #expect(ContinuousClock.now - started < .seconds(10))
            #expect(provider.statistics.retries == 1, "\(provider.statistics)")
        }
    }

    @Test("404 is permanent: no retries, zeroFill gives zeros, the application gets the HTTPRangeError",
          .timeLimit(.minutes(1)))
    func notFoundZeroFill() async throws {
        try await withRangeServer(size: 512 << 10) { server in
            let provider = try await Self.open(server, "/gone?get_status=404")
            try await withRemoteRegion(provider, failurePolicy: .retry(attempts: 3, backoff: .milliseconds(10), then: .zeroFill)) { region in
                #expect(await readRegion(region, 5000..<9000) == [UInt8](repeating: 0, count: 4000))
                let error = await nextRegionError(region)
                #expect(httpError(error)?.code == .status(404), "\(String(describing: error))")
                #expect(httpError(error)?.isPermanent == true)
                #expect(error?.attempts == 1, "the resolver skipped its retries: \(String(describing: error))")
                #expect(error?.resolution == .zeroFill)
                // Later reads fail at once with the same error: the object is gone for every block.
                #expect(await readRegion(region, 300_000..<300_016) == [UInt8](repeating: 0, count: 16))
                #expect(httpError(await nextRegionError(region))?.code == .status(404))
            }
            #expect(provider.permanentFailure?.code == .status(404))
            let stats = try await server.stats().scenario("/gone")
            #expect(stats?.get == 1, "one request, no retry, nothing more: \(String(describing: stats))")
        }
    }

    @Test("403 is permanent: poison raises SIGBUS in the reading thread", .timeLimit(.minutes(1)))
    func forbiddenPoison() async throws {
        try await withRangeServer(size: 512 << 10) { server in
            let provider = try await Self.open(server, "/denied?get_status=403")
            try await withRemoteRegion(provider, failurePolicy: .poison) { region in
                #expect(await probeRegion(region, at: 12_345) == nil, "SIGBUS expected")
                let error = await nextRegionError(region)
                #expect(httpError(error)?.code == .status(403), "\(String(describing: error))")
                #expect(error?.resolution == .poison)
            }
            #expect(provider.statistics.retries == 0)
        }
    }

    @Test("an object replaced mid-read (412 on If-Match) is objectChanged, not mixed data", .timeLimit(.minutes(1)))
    func replacedMidRead() async throws {
        try await withRangeServer(size: 1 << 20) { server in
            let provider = try await Self.open(server, "/replaced?change_after=2")
            try await withRemoteRegion(provider, failurePolicy: .zeroFill, readahead: .adaptive(maximum: Self.block)) { region in
                // Blocks 0 and 1 come from the original; block 5 is asked for after the replacement.
                #expect(await readRegion(region, 0..<Self.block) == Array(server.data[0..<Self.block]))
                #expect(await readRegion(region, Self.block..<2 * Self.block) == Array(server.data[Self.block..<2 * Self.block]))
                let later = 5 * Self.block..<6 * Self.block
                #expect(await readRegion(region, later) == [UInt8](repeating: 0, count: later.count))
                let error = await nextRegionError(region)
                #expect(httpError(error)?.code == .objectChanged, "\(String(describing: error))")
                #expect(error?.attempts == 1)
            }
            #expect(try await server.stats().scenario("/replaced")?.statuses.last == 412)
        }
    }

    @Test("a server that ignores If-Match: the new ETag in the response is caught", .timeLimit(.minutes(1)))
    func replacedIgnoringIfMatch() async throws {
        try await withRangeServer(size: 1 << 20) { server in
            let provider = try await Self.open(server, "/sloppy?change_after=1&ignore_if_match=1")
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<4096) == Array(server.data[0..<4096]))
                #expect(await readRegion(region, 8 * Self.block..<8 * Self.block + 4096) == [UInt8](repeating: 0, count: 4096))
                let error = await nextRegionError(region)
                #expect(httpError(error)?.code == .objectChanged, "\(String(describing: error))")
            }
        }
    }

    @Test("without an ETag the version is pinned with If-Unmodified-Since", .timeLimit(.minutes(1)))
    func lastModifiedPin() async throws {
        try await withRangeServer(size: 1 << 20) { server in
            let provider = try await Self.open(server, "/noetag?no_etag=1&change_after=1")
            #expect(provider.version.etag == nil)
            #expect(provider.version.lastModified != nil)
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<4096) == Array(server.data[0..<4096]))
                #expect(await readRegion(region, 4 * Self.block..<4 * Self.block + 4096) == [UInt8](repeating: 0, count: 4096))
                #expect(httpError(await nextRegionError(region))?.code == .objectChanged)
            }
        }
    }

    @Test("200 with the whole body for a small object: taken whole and served from memory", .timeLimit(.minutes(1)))
    func fullBodySmallObject() async throws {
        try await withRangeServer(size: 300_000) { server in
            let provider = try await Self.open(server, "/whole?full_body=1")
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<300_000) == server.data)
            }
            #expect(provider.holdsWholeObject)
            let stats = try await server.stats().scenario("/whole")
            #expect(stats?.probe == 1 && stats?.get == 0, "one GET (the size probe), then memory: \(String(describing: stats)), \(provider.statistics)")
        }
    }

    @Test("200 with the whole body for a large object: open fails with fullBodyForRange", .timeLimit(.minutes(1)))
    func fullBodyLargeObject() async throws {
        try await withRangeServer(size: 8 << 20) { server in
            let error = await openFailure(URL(string: server.baseURL + "/norange?full_body=1")!,
                                          options: Self.options { $0.wholeObjectLimit = 1 << 20 })
            #expect(error?.code == .fullBodyForRange, "\(String(describing: error))")
            #expect(error?.isPermanent == true)
            #expect(error?.attempts == 1, "\(String(describing: error))")
        }
    }

    @Test("a server that stops answering ranges after the probe: fullBodyForRange, the transfer stopped early",
          .timeLimit(.minutes(1)))
    func fullBodyAfterProbe() async throws {
        try await withRangeServer(size: 8 << 20) { server in
            let provider = try HTTPRangeProvider(
                url: URL(string: server.baseURL + "/later?full_body=1")!,
                version: HTTPObjectVersion(size: 8 << 20), options: Self.options { $0.wholeObjectLimit = 1 << 20 })
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<4096) == [UInt8](repeating: 0, count: 4096))
                let error = await nextRegionError(region)
                #expect(httpError(error)?.code == .fullBodyForRange, "\(String(describing: error))")
            }
            #expect(provider.statistics.bytesReceived < 8 << 20, "\(provider.statistics)")
        }
    }

    @Test("a Content-Range for other bytes is badContentRange", .timeLimit(.minutes(1)))
    func badContentRange() async throws {
        try await withRangeServer(size: 512 << 10) { server in
            let provider = try await Self.open(server, "/shifted?bad_content_range=1")
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<4096) == [UInt8](repeating: 0, count: 4096))
                #expect(httpError(await nextRegionError(region))?.code == .badContentRange)
            }
        }
    }

    @Test("HEAD refused with 403 (a presigned GET URL): the size comes from a 0-0 range GET, no HEAD sent")
    func headRefused() async throws {
        try await withRangeServer(size: 777_777) { server in
            let provider = try await Self.open(server, "/presigned?head_status=403")
            #expect(provider.size == 777_777)
            #expect(provider.version.etag != nil)
            let stats = try await server.stats().scenario("/presigned")
            #expect(stats?.head == 0)
            #expect(stats?.ranges == ["bytes=0-0"])
        }
    }

    @Test("a dead server: open fails with a transport error after the retries, quickly")
    func deadServer() async throws {
        // A port nobody listens on: bind, read the port, close.
        let port = try await withRangeServer(size: 4096) { $0.port }
        let started = ContinuousClock.now
        let error = await openFailure(URL(string: "http://127.0.0.1:\(port)/x")!, options: Self.options { $0.maxAttempts = 2 })
        #expect(error != nil, "open succeeded against a closed port")
        if let error {
            #expect(!error.isPermanent)
            #expect(error.attempts == 2, "\(error)")
            var isTransport = false
            if case .transport = error.code { isTransport = true }
            #expect(isTransport, "expected a transport error: \(error)")
        }
        #expect(ContinuousClock.now - started < .seconds(10))
    }

    @Test("concurrent reads of one block make one request; the rest join it", .timeLimit(.minutes(1)))
    func coalescing() async throws {
        try await withRangeServer(size: 1 << 20) { server in
            let provider = try await Self.open(server, "/coalesce?latency_ms=300")
            let before = provider.requestCount
            // No readahead: each fault is a provider read of its own page; the provider makes one request for the block.
            try await withRemoteRegion(provider, failurePolicy: .zeroFill, readahead: ReadaheadPolicy.none) { region in
                let offsets = (0..<8).map { 3 * Self.block + $0 * 4096 + 100 }
                let results = await readConcurrently(region, offsets.map { $0..<$0 + 16 })
                #expect(results == offsets.map { Array(server.data[$0..<$0 + 16]) })
            }
            let statistics = provider.statistics
            #expect(provider.requestCount - before == 1, "\(statistics)")
            #expect(statistics.joinedReads + statistics.cacheHits == 7, "\(statistics)")
            #expect(statistics.joinedReads >= 1, "\(statistics)")
        }
    }

    @Test("no more than maxConcurrentRequests requests in flight", .timeLimit(.minutes(1)))
    func concurrencyCap() async throws {
        try await withRangeServer(size: 4 << 20) { server in
            let provider = try await Self.open(server, "/capped?latency_ms=100") { $0.maxConcurrentRequests = 3 }
            try await withRemoteRegion(provider, failurePolicy: .zeroFill, readahead: ReadaheadPolicy.none) { region in
                let offsets = (0..<12).map { $0 * 2 * Self.block }
                let results = await readConcurrently(region, offsets.map { $0..<$0 + 8 })
                #expect(results == offsets.map { Array(server.data[$0..<$0 + 8]) })
            }
            #expect(provider.statistics.peakConcurrentRequests == 3, "\(provider.statistics)")
            let stats = try await server.stats().scenario("/capped")
            #expect((stats?.peak ?? 99) <= 3, "\(String(describing: stats))")
            #expect(stats?.get == 12)
        }
    }

    @Test("adjacent blocks in one read make one request", .timeLimit(.minutes(1)))
    func adjacentBlocksOneRequest() async throws {
        try await withRangeServer(size: 1 << 20) { server in
            let provider = try await Self.open(server, "/adjacent")
            let before = provider.requestCount
            // A first cluster of four blocks: one provider read, one request.
            try await withRemoteRegion(provider, failurePolicy: .zeroFill,
                                       readahead: .adaptive(initial: 4 * Self.block, maximum: 4 * Self.block)) { region in
                #expect(await readRegion(region, Self.block..<Self.block + 1) == [server.data[Self.block]])
                #expect(await readRegion(region, Self.block..<5 * Self.block) == Array(server.data[Self.block..<5 * Self.block]))
            }
            #expect(provider.requestCount - before == 1, "\(provider.statistics)")
            #expect(try await server.stats().scenario("/adjacent")?.ranges.last == "bytes=\(Self.block)-\(5 * Self.block - 1)")
        }
    }

    @Test("custom headers (a bearer token) are sent with every request", .timeLimit(.minutes(1)))
    func customHeaders() async throws {
        try await withRangeServer(size: 256 << 10) { server in
            let url = URL(string: server.baseURL + "/auth?require_bearer=t0ken")!
            await #expect(throws: HTTPRangeError.self) { _ = try await HTTPRangeProvider.open(url: url, options: Self.options()) }
            let provider = try await HTTPRangeProvider.open(url: url, headers: ["Authorization": "Bearer t0ken"], options: Self.options())
            try await withRemoteRegion(provider, failurePolicy: .zeroFill) { region in
                #expect(await readRegion(region, 0..<4096) == Array(server.data[0..<4096]))
            }
            #expect(provider.statistics.failedBlockReads == 0)
        }
    }
}

/// Reads each range of the region on a thread of its own, all at once; the bytes, in order.
func readConcurrently(_ region: LazyRegion, _ ranges: [Range<Int>]) async -> [[UInt8]] {
    let threads = ranges.map { range in
        let base = UInt(bitPattern: region.baseAddress)
        return OffPoolThread(name: "uffd-remote-reader") {
            Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: base + UInt(range.lowerBound)), count: range.count))
        }
    }
    var results: [[UInt8]] = []
    for thread in threads { results.append(await thread.value) }
    return results
}
