import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd
import UserfaultfdFirecracker

extension ReliabilityTests {
    /// Fault injection at the boundaries not covered elsewhere (single-fault provider errors, timeouts, retries and a
    /// 4-thread cancellation are in Resolution/FailureTests and LifecycleTests): many threads at once, the userfaultfd
    /// closed under load, a provider that fails, stalls or never answers under load, a peer killed mid-fault. Each ends
    /// with every faulting thread released and the error reported.
    @Suite("Fault injection")
    struct FaultInjection {
        /// A byte every page of `pages` pages holds: page p is all (p % 251 + 1).
        static func byte(ofPage page: Int) -> UInt8 { UInt8(page % 251 + 1) }

        /// Reads one byte of `address` with the SIGBUS probe: the byte, or nil for SIGBUS.
        static func probeOnThread(_ address: UInt) -> OffPoolThread<Int> {
            OffPoolThread(name: "uffd-injection-reader") {
                var byte: UInt8 = 0
                return cuffd_test_probe_read(UnsafeRawPointer(bitPattern: address), &byte) == 0 ? Int(byte) : -1
            }
        }

        /// 256 threads wait on 256 different pages of a provider that never answers; cancelling the scope releases every
        /// one of them per the cancellation policy (zeros, or SIGBUS), the reads in flight are cancelled, and the scope
        /// returns.
        @Test(.timeLimit(.minutes(2)), arguments: [CancellationResolution.zeroFill, .poison])
        func cancellationReleasesHundredsOfPendingFaults(resolution: CancellationResolution) async throws {
            let pageSize = systemPageSize, threads = 256
            let calls = CallCounter(), cancelled = CallCounter()
            let provider = ClosureProvider(size: threads * pageSize) { _, _ in
                calls.increment()
                await awaitCancellation()
                cancelled.increment()
                throw CancellationError()
            }
            try await withFaultWatchdog(seconds: 90) { scope in
                let faults = Mutex<Int>(0)
                let task = Task { () -> [Int] in
                    try await LazyRegion.with(
                        length: threads * pageSize, provider: provider,
                        options: .init(readahead: .none, providerTimeout: nil, cancellation: resolution)
                    ) { region in
                        scope.track(region.uffd)
                        let base = UInt(bitPattern: region.baseAddress)
                        let readers = (0..<threads).map { Self.probeOnThread(base + UInt($0 * pageSize) + 7) }
                        _ = await pollUntil(within: 30) { region.statistics.faults >= threads }
                        faults.withLock { $0 = region.statistics.faults }
                        var values: [Int] = []
                        for reader in readers { values.append(await reader.value) }
                        return values
                    }
                }
                // 64 reads in flight (maxConcurrentReads), the other 192 faults queued for a slot.
                let inFlight = min(threads, FaultResolver.Options().maxConcurrentReads)
                #expect(await pollUntil(within: 40) { faults.withLock { $0 } >= threads && calls.current == inFlight },
                        "all \(threads) faults pending, \(inFlight) provider reads in flight (\(calls.current) reads)")
                task.cancel()
                guard let values = try await value(of: task, within: 30) else {
                    Issue.record("the scope did not return after cancellation")
                    return
                }
                let expected = resolution == .zeroFill ? 0 : -1
                #expect(values.count == threads)
                #expect(values.allSatisfy { $0 == expected }, "every thread released with \(resolution): \(Set(values))")
                #expect(await pollUntil(within: 10) { cancelled.current == inFlight }, "every read in flight cancelled (\(cancelled.current))")
                #expect(calls.current == inFlight, "no read started for the queued faults after the cancellation")
            }
        }

        /// 64 threads fault while half the provider's pages never answer; closing the userfaultfd under that load wakes
        /// every thread (the pages become ordinary anonymous memory: zeros), the resolver's error stream ends, the
        /// stalled reads are cancelled, and pages already served keep their data.
        @Test(.timeLimit(.minutes(2)))
        func closingTheUserfaultfdUnderLoadReleasesEveryThread() async throws {
            let pageSize = systemPageSize, threads = 64
            let stalled = CallCounter(), cancelled = CallCounter()
            let provider = ClosureProvider(size: 2 * threads * pageSize) { buffer, offset in
                let page = offset / pageSize
                if page % 2 == 1 {
                    stalled.increment()
                    await awaitCancellation()
                    cancelled.increment()
                    throw CancellationError()
                }
                await dispatchSleep(microseconds: 200)
                buffer.fill(Self.byte(ofPage: page), in: 0..<pageSize)
                return .bytes(pageSize)
            }
            try await withFaultWatchdog(seconds: 90) { scope in
                let uffd = try scope.makeUFFD(required: [.eventRemove], optional: [.threadID])
                let mapping = try scope.makeMapping(pages: 2 * threads)
                try uffd.register(mapping.range, mode: .missing)
                let resolver = FaultResolver(uffd: uffd, options: .init(readahead: .none, providerTimeout: nil))
                try await resolver.serve(mapping.range, provider: provider)
                try resolver.start()
                let errors = resolver.errors
                // Every thread reads one served page, then one stalled page.
                let readers = (0..<threads).map { index in
                    OffPoolThread(name: "uffd-injection-close") { () -> [UInt8] in
                        let served = mapping.range.start + UInt(2 * index * pageSize)
                        let stalls = served + UInt(pageSize)
                        return [cuffd_test_read_byte(UnsafeRawPointer(bitPattern: served)),
                                cuffd_test_read_byte(UnsafeRawPointer(bitPattern: stalls))]
                    }
                }
                #expect(await pollUntil(within: 30) { stalled.current == threads }, "\(stalled.current) stalled reads")
                #expect(readers.allSatisfy { !$0.isFinished }, "every thread is blocked on a stalled page")
                uffd.close()
                let released = await pollUntil(within: 20) { readers.allSatisfy(\.isFinished) }
                #expect(released, "every thread returns once the userfaultfd is closed")
                guard released else { return }
                for (index, reader) in readers.enumerated() {
                    let values = await reader.value
                    #expect(values == [Self.byte(ofPage: 2 * index), 0], "thread \(index): served data, then zeros")
                }
                // The resolver saw the end: its error stream finishes, and the stalled reads were cancelled.
                let ended = Task { () throws -> Bool in
                    for await _ in errors {}
                    return true
                }
                #expect(try await value(of: ended, within: 10) == true, "the resolver's error stream ends when its userfaultfd closes")
                #expect(await pollUntil(within: 10) { cancelled.current == threads }, "stalled reads cancelled: \(cancelled.current)")
                #expect(resolver.statistics.pagesCopied == threads)
            }
        }

        /// 8 threads fault 2048 pages of a provider that delays every read (0–2 ms), fails the first attempt of every
        /// third page and never answers for every 257th (from page 5): retries bring the failed pages in, the timeout
        /// releases the stalled ones with zeros and reports each once, and every other page holds its data.
        ///
        /// The checks hold whatever the machine's load: a healthy read that a starved machine lets pass the timeout is
        /// released like a stalled one (zeros, reported once), so the invariant is "every page holds its data, or holds
        /// zeros and was reported", never "finished within a time".
        @Test(.timeLimit(.minutes(2)))
        func providerErrorsDelaysAndStallsUnderLoad() async throws {
            let pageSize = systemPageSize, pages = 2048, threads = 8
            // 257 apart, so each falls to a different thread and the stalls overlap instead of adding up.
            let stalledPages = Set((0..<pages).filter { $0 % 257 == 5 })
            let attempts = Mutex<[Int: Int]>([:])
            let provider = ClosureProvider(size: pages * pageSize) { buffer, offset in
                let page = offset / pageSize
                let attempt = attempts.withLock { $0[page, default: 0] += 1; return $0[page]! }
                if stalledPages.contains(page) {
                    await awaitCancellation()
                    throw CancellationError()
                }
                await dispatchSleep(microseconds: (page * 7919) % 2000)
                if page % 3 == 0 && attempt == 1 { throw InjectedFailure(offset: offset) }
                buffer.fill(Self.byte(ofPage: page), in: 0..<pageSize)
                return .bytes(pageSize)
            }
            let options = FaultResolver.Options(
                readahead: .none, failurePolicy: .retry(attempts: 2, backoff: .milliseconds(1), then: .zeroFill),
                providerTimeout: .seconds(1))
            try await withFaultWatchdog(seconds: 90) { scope in
                try await withWatchedRegion(scope, length: pages * pageSize, provider: provider, options: options) { region in
                    // Reports are sent before the thread they concern is released, so once every reader is done they
                    // are all in the stream; the collector only has to catch up.
                    let reports = Mutex<[Int: Int]>([:])
                    let wrongResolution = Mutex(0)
                    let collector = Task { [errors = region.errors] in
                        for await error in errors {
                            if error.resolution != .zeroFill { wrongResolution.withLock { $0 += 1 } }
                            reports.withLock { $0[error.providerOffset / pageSize, default: 0] += 1 }
                        }
                    }
                    defer { collector.cancel() }
                    let base = UInt(bitPattern: region.baseAddress)
                    let readers = (0..<threads).map { thread in
                        OffPoolThread(name: "uffd-injection-load") { () -> [Int: UInt8] in
                            var seen: [Int: UInt8] = [:]
                            for page in stride(from: thread, to: pages, by: threads) {
                                seen[page] = cuffd_test_read_byte(UnsafeRawPointer(bitPattern: base + UInt(page * pageSize) + 100))
                            }
                            return seen
                        }
                    }
                    var seen: [Int: UInt8] = [:]
                    for reader in readers { seen.merge(await reader.value) { first, _ in first } }
                    #expect(seen.count == pages)
                    let zeroed = Set(seen.filter { $0.value == 0 }.map(\.key))
                    #expect(zeroed.isSuperset(of: stalledPages), "stalled pages read as zeros")
                    let caughtUp = await pollUntil(within: 20) { reports.withLock { Set($0.keys) }.isSuperset(of: zeroed) }
                    #expect(caughtUp, "every page released with zeros was reported")
                    let reported = reports.withLock { $0 }
                    let wrong = seen.filter { page, value in
                        value != (reported[page] == nil ? Self.byte(ofPage: page) : 0)
                    }.map(\.key).sorted()
                    #expect(wrong.isEmpty, "pages with neither their data nor reported zeros: \(wrong.prefix(20))")
                    #expect(reported.values.allSatisfy { $0 == 1 }, "each released page reported once: \(reported.filter { $0.value != 1 })")
                    #expect(wrongResolution.withLock { $0 } == 0, "every report names the zero-fill resolution")
                    // Under a healthy load only the stalled pages time out; a starved machine may add a few more, and
                    // each of those was held to the same rule above.
                    let healthyTimeouts = reported.keys.filter { !stalledPages.contains($0) }.count
                    if healthyTimeouts > 0 { print("providerErrorsDelaysAndStallsUnderLoad: \(healthyTimeouts) healthy reads passed the timeout") }
                    #expect(region.statistics.faults >= pages, "\(region.statistics)")
                    // The failed first attempts were retried, not reported: such a page was read at least twice (a
                    // retry that a starved machine lets time out is retried again, up to the policy's attempts).
                    let retried = attempts.withLock { counts in
                        counts.filter { $0.key % 3 == 0 && reported[$0.key] == nil }
                    }
                    #expect(!retried.isEmpty, "failed first attempts were retried")
                    let wrongCounts = retried.filter { $0.value < 2 || $0.value > 3 }.map { "page \($0.key): \($0.value) reads" }
                    #expect(wrongCounts.isEmpty, "\(wrongCounts.prefix(10))")
                }
            }
        }

        /// A VMM killed (SIGKILL) while its vCPU threads fault without end: the in-process page server records the
        /// disconnect, and keeps serving another VM started right before the kill, to its last page.
        @Test(.timeLimit(.minutes(2)))
        func aPeerKilledMidFaultIsRecordedAndAnotherVMKeepsBeingServed() async throws {
            let regionSize = FirecrackerPageServerTests.regionSize
            let directory = try TemporaryDirectory()
            let memory = try directory.randomFile("snapshot.mem", count: 2 * regionSize, seed: 8)
            let running = try FirecrackerPageServerTests.RunningServer(directory: directory, memoryPath: memory.path)
            let vmm = try ChildProcess.builtExecutable("uffd-fake-vmm")
            let common = ["--socket", running.socketPath, "--memory", memory.path, "--regions", "2", "--region-size", "\(regionSize)"]
            let victim = try ChildProcess.start(vmm, common + ["--mode", "fault-forever"])
            let victimPID = victim.process.processIdentifier
            // Under load: thousands of its faults served, more arriving all the time.
            let loaded = await pollUntil(within: 30) { (running.server.vms.first?.statistics.faults ?? 0) >= 2000 }
            #expect(loaded, "the victim faults: \(running.server.vms.map(\.statistics))")
            async let healthy = ChildProcess.run(vmm, common + ["--balloon"])
            victim.signal(SIGKILL)
            let killed = try await victim.wait(timeout: .seconds(20))
            let good = try await healthy
            #expect(killed.signalled && killed.stdout.contains("FAULTING"), "victim: \(killed.status) \(killed.stderr)")
            #expect(good.status == 0 && good.stdout.contains("OK pages=512 zeroPages=128"), "healthy VM: \(good.stderr)\nlog: \(running.log)")
            let victimID = running.server.vms.first { $0.processID == victimPID }?.id
            let disconnected = await pollUntil(within: 10) {
                running.server.vms.first { $0.id == victimID }.map { !$0.isConnected } ?? false
            }
            await running.stop()
            #expect(victimID != nil, "the victim was registered: \(running.server.vms.map(\.id))")
            #expect(disconnected, "the victim is recorded as disconnected")
            #expect(running.log.contains("disconnected"), "log: \(running.log)")
            let stats = running.server.vms.first { $0.id == victimID }?.statistics
            #expect((stats?.faults ?? 0) >= 2000, "\(String(describing: stats))")
        }
    }
}
