import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd
import UserfaultfdHTTP

/// Providers must answer while every thread of Swift's cooperative pool (two here) is blocked on a fault. On Linux the
/// pool, concurrent `DispatchQueue`s, `OperationQueue`s and Swift's own timers share libdispatch's worker pool, which
/// waits about 1 s before it adds a thread when all of them are busy: a provider that sends its work there serves the
/// next page only after that second. After a long enough idle time the extra threads are gone and the stall is back, so
/// the test also runs rounds after an idle pause.
@Suite("Remote: providers with every pool thread blocked on faults", .serialized,
       .enabled(if: !remoteTestsSkipped, "UFFD_SKIP_REMOTE_TESTS=1"))
struct ProviderPoolStallTests {
    static let tasks = 16
    /// Rounds per phase; each faults `tasks` new pages of each region.
    static let roundsPerPhase = 2
    /// The pause between phases: long enough for libdispatch to retire the threads it added (about 12 s measured).
    static let idle = Duration.seconds(13)
    /// The longest single fault of a round. A stall puts 0.8-1 s on one fault (0.80 to 0.97 s in ten measurements); a
    /// healthy fault takes milliseconds, tens of them under TSan or with the whole suite running beside the test (whose
    /// rounds of 16 faults then took up to 0.57 s: the round is printed, the bound is per fault).
    static let bound = Duration.milliseconds(500)

    @Test("16 pool tasks faulting a FileProvider, an HTTPRangeProvider (also one retrying every read), a provider sleeping on PoolFreeClock and one whose reads the resolver retries: every round well under a second",
          .timeLimit(.minutes(2)))
    func noStallWithEveryPoolThreadBlocked() async throws {
        let pageSize = systemPageSize
        let phases = 4
        let pages = Self.tasks * Self.roundsPerPhase * phases
        let size = pages * pageSize
        let path = FileManager.default.temporaryDirectory.appendingPathComponent("uffd-pool-stall-\(UUID().uuidString)").path
        try await withRangeServer(size: size) { server in
            try Data(server.data).write(to: URL(fileURLWithPath: path))
            defer { unlink(path) }
            let data = server.data
            // One request per fault: 4 KiB blocks, no readahead, so each page is a read of its own that needs the provider.
            let http = try await HTTPRangeProvider.open(
                url: URL(string: server.baseURL + "/pool")!,
                options: .init(blockSize: pageSize, requestTimeout: .seconds(10), cachedBlocks: 0))
            // Every read fails once with a 503 and is retried after the backoff: the backoff's timer must fire too.
            let retrying = try await HTTPRangeProvider.open(
                url: URL(string: server.baseURL + "/retry?fail_once_per_range=1&fail_status=503")!,
                options: .init(blockSize: pageSize, requestTimeout: .seconds(10), maxAttempts: 2,
                               initialBackoff: .milliseconds(2), cachedBlocks: 0))
            let sleeping = ClosureProvider(size: size) { buffer, offset in
                try await PoolFreeClock().sleep(for: .milliseconds(1))
                return .bytes(data.withUnsafeBytes { buffer.copy(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + buffer.count])) })
            }
            // Every read fails once and the resolver retries it after its failure policy's backoff: the resolver's
            // own timer must fire too.
            let failedOnce = Mutex(Set<Int>())
            let failingOnce = ClosureProvider(size: size) { buffer, offset in
                if failedOnce.withLock({ $0.insert(offset).inserted }) { throw POSIXError(.EIO) }
                return .bytes(data.withUnsafeBytes { buffer.copy(from: UnsafeRawBufferPointer(rebasing: $0[offset..<offset + buffer.count])) })
            }
            let providers: [(String, any PageProvider)] = [("file", try FileProvider(path: path)), ("http", http), ("clock", sleeping),
                                                        ("retry", retrying), ("resolver retry", failingOnce)]
            try await withFaultWatchdog(seconds: 100) { scope in
                let options = FaultResolver.Options(readahead: ReadaheadPolicy.none, failurePolicy: .zeroFill)
                let retryingOptions = FaultResolver.Options(
                    readahead: ReadaheadPolicy.none,
                    failurePolicy: .retry(attempts: 1, backoff: .milliseconds(2), then: .zeroFill))
                var regions: [(String, LazyRegion)] = []
                for (name, provider) in providers {
                    let region = try await LazyRegion(length: size, provider: provider,
                                                      options: name == "resolver retry" ? retryingOptions : options)
                    scope.track(region.uffd)
                    regions.append((name, region))
                }
                // Phase p starts with provider p, after a pause: it meets the pool without extra threads (the first
                // phase too, in a fresh test process).
                var rounds: [(name: String, elapsed: Duration, slowest: Duration)] = []
                for phase in 0..<phases where !scope.fired {
                    if phase > 0 { try await Task.sleep(for: Self.idle) }
                    let order = Array(regions[phase...] + regions[..<phase])
                    for round in 0..<Self.roundsPerPhase {
                        let first = (phase * Self.roundsPerPhase + round) * Self.tasks
                        for (name, region) in order {
                            let started = ContinuousClock.now
                            let faults = await Self.faultFromPool(region, pages: first..<first + Self.tasks)
                            let elapsed = ContinuousClock.now - started
                            rounds.append(("\(name) phase \(phase) round \(round)", elapsed, faults.map(\.elapsed).max()!))
                            let values = faults.map(\.value)
                            let expected = (first..<first + Self.tasks).map { data[$0 * pageSize + 7] }
                            #expect(values == expected, "\(name) phase \(phase) round \(round): wrong bytes")
                        }
                    }
                }
                print("pool stall rounds (round, slowest fault): "
                      + rounds.map { "\($0.name) \($0.elapsed) \($0.slowest)" }.joined(separator: ", "))
                for (name, elapsed, slowest) in rounds {
                    #expect(slowest < Self.bound,
                            "\(name): a fault took \(slowest) (round \(elapsed)): its provider waited for libdispatch's worker pool")
                }
                #expect(retrying.statistics.retries == pages, "one retry per read: \(retrying.statistics)")
                #expect(failedOnce.withLock(\.count) == pages, "one failed first attempt per page")
                for (_, region) in regions { await region.close() }
            }
        }
    }

    @Test("PoolFreeClock: sleeps about as long as asked; a cancelled sleep throws at once", .timeLimit(.minutes(1)))
    func poolFreeClockSleeps() async throws {
        let clock = PoolFreeClock()
        let started = clock.now
        try await clock.sleep(for: .milliseconds(50))
        let slept = clock.now - started
        #expect(slept >= .milliseconds(50) && slept < .seconds(2), "slept \(slept)")

        let sleeper = Task { try await clock.sleep(for: .seconds(30)) }
        try await Task.sleep(for: .milliseconds(20))
        let cancelled = clock.now
        sleeper.cancel()
        await #expect(throws: CancellationError.self) { try await sleeper.value }
        #expect(clock.now - cancelled < .seconds(2))
    }

    /// Reads one byte of each page in `pages` from its own task of the global executor (each blocks its pool thread in
    /// the kernel until the fault is resolved); the bytes and how long each read took, in page order.
    static func faultFromPool(_ region: LazyRegion, pages: Range<Int>) async -> [(value: UInt8, elapsed: Duration)] {
        let base = UInt(bitPattern: region.baseAddress), pageSize = systemPageSize
        return await withTaskGroup(of: (Int, UInt8, Duration).self) { group in
            for page in pages {
                group.addTask {
                    let started = ContinuousClock.now
                    let value = cuffd_test_read_byte(UnsafeRawPointer(bitPattern: base + UInt(page * pageSize + 7)))
                    return (page, value, ContinuousClock.now - started)
                }
            }
            var faults = [(value: UInt8, elapsed: Duration)](repeating: (0, .zero), count: pages.count)
            for await (page, value, elapsed) in group { faults[page - pages.lowerBound] = (value, elapsed) }
            return faults
        }
    }
}
