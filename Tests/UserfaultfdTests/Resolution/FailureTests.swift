import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd

extension ResolutionTests {
    /// Requirements 6 and 7: providers that throw or never answer. The faulting thread never hangs; what it gets is
    /// the failure policy's; the failure is reported.
    @Suite("Provider failures")
    struct Failures {
        enum Path: String, CaseIterable, Sendable, CustomTestStringConvertible {
            /// The async `read(into:at:)` throws.
            case async
            /// `readImmediately` throws inside the event handler.
            case immediate
            var testDescription: String { rawValue }
        }

        static func failingProvider(_ path: Path, calls: CallLog) -> ClosureProvider {
            switch path {
            case .async:
                return ClosureProvider(size: 1 << 20) { buffer, offset in
                    calls.record(offset, buffer.count)
                    await dispatchSleep(microseconds: 100)
                    throw InjectedFailure(offset: offset)
                }
            case .immediate:
                return ClosureProvider(size: 1 << 20, immediate: { buffer, offset in
                    calls.record(offset, buffer.count)
                    throw InjectedFailure(offset: offset)
                })
            }
        }

        @Test(.timeLimit(.minutes(1)), arguments: Path.allCases)
        func poisonGivesTheFaultingThreadSIGBUS(path: Path) async throws {
            let pageSize = systemPageSize
            let calls = CallLog()
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 8 * pageSize, provider: Self.failingProvider(path, calls: calls),
                                            options: .init(readahead: .none, failurePolicy: .poison)) { region in
                    let address = UInt(bitPattern: region.baseAddress) + UInt(2 * pageSize + 5)
                    let probe = OffPoolThread(name: "uffd-res-probe") { () -> (signal: Int32, code: Int32) in
                        var byte: UInt8 = 0
                        let signal = cuffd_test_probe_read(UnsafeRawPointer(bitPattern: address), &byte)
                        return (signal, cuffd_test_last_probe_code())
                    }
                    guard let outcome = await finished(probe, releasing: region.uffd) else { return }
                    #expect(outcome.signal == SIGBUS, "the read of a poisoned page must raise SIGBUS")
                    #expect(outcome.code == cuffd_test_bus_adrerr())
                    #expect(calls.count == 1, "no retries under .poison: \(calls.all)")
                    let error = await firstElement(of: region.errors, within: 5)
                    #expect(error != nil, "a RegionError is reported")
                    if let error {
                        #expect(error.underlying as? InjectedFailure == InjectedFailure(offset: 2 * pageSize), "\(error)")
                        #expect(error.resolution == .poison)
                        #expect(error.attempts == 1)
                        #expect(error.providerOffset == 2 * pageSize)
                        #expect(error.range == MemoryRange(start: UInt(bitPattern: region.baseAddress) + UInt(2 * pageSize),
                                                           length: pageSize))
                    }
                    let stats = await region.settledStatistics
                    #expect(stats.providerErrors == 1, "\(stats)")
                    #expect(stats.pagesPoisoned == 1, "\(stats)")
                    // The neighbouring page is untouched by the failure (still missing, fails again when touched).
                    #expect(stats.faults == 1, "\(stats)")
                }
            }
        }

        @Test(.timeLimit(.minutes(1)), arguments: Path.allCases)
        func zeroFillGivesZeros(path: Path) async throws {
            let pageSize = systemPageSize
            let calls = CallLog()
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 8 * pageSize, provider: Self.failingProvider(path, calls: calls),
                                            options: .init(readahead: .none, failurePolicy: .zeroFill)) { region in
                    guard let bytes = await finished(copyOnThread(region, offset: 4 * pageSize, length: pageSize), releasing: region.uffd) else { return }
                    #expect(firstDifference(bytes, [UInt8](repeating: 0, count: pageSize)) == nil)
                    #expect(calls.count == 1, "\(calls.all)")
                    let error = await firstElement(of: region.errors, within: 5)
                    #expect(error?.resolution == .zeroFill)
                    #expect(error?.underlying is InjectedFailure)
                    let stats = await region.settledStatistics
                    #expect(stats.providerErrors == 1, "\(stats)")
                    #expect(stats.zeroPages == 1, "\(stats)")
                    #expect(stats.pagesCopied == 0, "\(stats)")
                }
            }
        }

        /// `.retry(attempts: 2, ...)` with a provider that fails twice then succeeds: the data arrives.
        @Test(.timeLimit(.minutes(1)), arguments: Path.allCases)
        func retriesThenSucceeds(path: Path) async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 8 * pageSize, seed: 60)
            let calls = CallLog()
            let attempt: @Sendable (PageBuffer, Int) throws -> PageContent = { buffer, offset in
                calls.record(offset, buffer.count)
                if calls.count(at: offset) <= 2 { throw InjectedFailure(offset: offset) }
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            let provider = path == .immediate
                ? ClosureProvider(size: source.count, immediate: attempt)
                : ClosureProvider(size: source.count) { buffer, offset in
                    await dispatchSleep(microseconds: 100)
                    return try attempt(buffer, offset)
                }
            let policy = FailurePolicy.retry(attempts: 2, backoff: .milliseconds(1), then: .zeroFill)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: .none, failurePolicy: policy)) { region in
                    guard let bytes = await finished(copyOnThread(region, offset: 6 * pageSize, length: pageSize), releasing: region.uffd) else { return }
                    #expect(firstDifference(bytes, Array(source[6 * pageSize..<7 * pageSize])) == nil)
                    #expect(calls.count(at: 6 * pageSize) == 3, "\(calls.all)")
                    let stats = await region.settledStatistics
                    #expect(stats.providerErrors == 2, "\(stats)")
                    #expect(stats.pagesCopied == 1, "\(stats)")
                    #expect(stats.zeroPages == 0, "\(stats)")
                    // Retries that end well are not reported as failures.
                    #expect(await firstElement(of: region.errors, within: 0.2) == nil)
                }
            }
        }

        /// Retries exhausted: the terminal policy applies and the error says how many attempts were made.
        @Test(.timeLimit(.minutes(1)))
        func retriesExhaustedThenZeroFill() async throws {
            let pageSize = systemPageSize
            let calls = CallLog()
            let policy = FailurePolicy.retry(attempts: 2, backoff: .milliseconds(1), then: .zeroFill)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 4 * pageSize, provider: Self.failingProvider(.async, calls: calls),
                                            options: .init(readahead: .none, failurePolicy: policy)) { region in
                    #expect(await finished(readByteOnThread(region, at: 100), releasing: region.uffd) == 0)
                    #expect(calls.count == 3, "\(calls.all)")
                    let error = await firstElement(of: region.errors, within: 5)
                    #expect(error?.attempts == 3)
                    #expect(error?.resolution == .zeroFill)
                    #expect(await region.settledStatistics.providerErrors == 3, "\(region.statistics)")
                }
            }
        }

        /// A failure the provider marks permanent (``ProviderFailure``) skips the retries of the policy.
        @Test(.timeLimit(.minutes(1)))
        func permanentFailureSkipsRetries() async throws {
            struct Gone: ProviderFailure { var isPermanent: Bool { true } }
            let pageSize = systemPageSize
            let calls = CallLog()
            let provider = ClosureProvider(size: 4 * pageSize) { buffer, offset in
                calls.record(offset, buffer.count)
                throw Gone()
            }
            let policy = FailurePolicy.retry(attempts: 3, backoff: .milliseconds(1), then: .zeroFill)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 4 * pageSize, provider: provider,
                                            options: .init(readahead: .none, failurePolicy: policy)) { region in
                    #expect(await finished(readByteOnThread(region, at: 3), releasing: region.uffd) == 0)
                    #expect(calls.count == 1, "a permanent failure is not retried: \(calls.all)")
                    let error = await firstElement(of: region.errors, within: 5)
                    #expect(error?.underlying is Gone)
                    #expect(error?.attempts == 1)
                    #expect(error?.resolution == .zeroFill)
                }
            }
        }

        /// Requirement 7: a provider that never answers (until cancelled) is abandoned after the timeout; the thread
        /// reads zeros and the error is a ProviderTimeoutError. The abandoned read is cancelled.
        @Test(.timeLimit(.minutes(1)))
        func providerTimeoutReleasesTheThreadWithZeros() async throws {
            let pageSize = systemPageSize
            let calls = CallLog(), cancelled = CallCounter()
            let provider = ClosureProvider(size: 1 << 20) { buffer, offset in
                calls.record(offset, buffer.count)
                await awaitCancellation()
                cancelled.increment()
                throw CancellationError()
            }
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: 4 * pageSize, provider: provider,
                                            options: .init(readahead: .none, failurePolicy: .zeroFill,
                                                           providerTimeout: .milliseconds(100))) { region in
                    let started = ContinuousClock.now
                    guard let bytes = await finished(copyOnThread(region, offset: pageSize, length: pageSize), releasing: region.uffd) else { return }
                    let elapsed = ContinuousClock.now - started
                    #expect(firstDifference(bytes, [UInt8](repeating: 0, count: pageSize)) == nil)
                    #expect(elapsed >= .milliseconds(100), "released before the timeout: \(elapsed)")
                    #expect(elapsed < .seconds(10), "\(elapsed)")
                    let error = await firstElement(of: region.errors, within: 5)
                    #expect((error?.underlying as? ProviderTimeoutError)?.timeout == .milliseconds(100),
                            "\(String(describing: error))")
                    #expect(error?.resolution == .zeroFill)
                    #expect(calls.count == 1)
                    #expect(await pollUntil(within: 5) { cancelled.current == 1 }, "the abandoned read was not cancelled")
                    let stats = await region.settledStatistics
                    #expect(stats.providerErrors == 1, "\(stats)")
                    #expect(stats.zeroPages == 1, "\(stats)")
                }
            }
        }

        /// Each attempt gets the whole timeout: an attempt that fails quickly, and a retry that answers within its own
        /// timeout, must not be cut short by the first attempt's timer.
        @Test(.timeLimit(.minutes(1)))
        func retryGetsItsOwnTimeout() async throws {
            let pageSize = systemPageSize
            let source = SeededBytes.make(count: 4 * pageSize, seed: 70)
            let calls = CallLog()
            // Attempt 1: fails after 250 ms (inside its 400 ms). Attempt 2 starts ~1 ms later and answers after 250 ms,
            // well inside its own 400 ms, but across the moment attempt 1's timer would fire (400 ms).
            let provider = ClosureProvider(size: source.count) { buffer, offset in
                calls.record(offset, buffer.count)
                await dispatchSleep(microseconds: 250_000)
                if calls.count(at: offset) == 1 { throw InjectedFailure(offset: offset) }
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            let policy = FailurePolicy.retry(attempts: 1, backoff: .milliseconds(1), then: .zeroFill)
            try await withFaultWatchdog(seconds: 30) { scope in
                try await withWatchedRegion(scope, length: source.count, provider: provider,
                                            options: .init(readahead: .none, failurePolicy: policy,
                                                           providerTimeout: .milliseconds(400))) { region in
                    guard let bytes = await finished(copyOnThread(region, offset: 0, length: pageSize), releasing: region.uffd) else { return }
                    #expect(firstDifference(bytes, Array(source[0..<pageSize])) == nil, "the retry's answer was discarded")
                    #expect(calls.count == 2, "\(calls.all)")
                    #expect(await region.settledStatistics.providerErrors == 1, "\(region.statistics)")
                    let error = await firstElement(of: region.errors, within: 0.2)
                    #expect(error == nil, "\(String(describing: error))")
                }
            }
        }
    }
}
