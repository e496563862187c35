import Dispatch
import Synchronization

/// A clock whose sleeps never wait for Swift's cooperative pool or libdispatch's shared worker threads: for providers
/// that back off, poll or pace their reads.
///
/// On Linux, Swift's timers (`Task.sleep`, `ContinuousClock.sleep`), concurrent `DispatchQueue`s, `OperationQueue`s and
/// `DispatchQueue.global()` all draw on the worker pool that also runs the cooperative pool. When every thread of it is
/// blocked on a fault (two threads on a 2-core machine), work sent there waits about a second for libdispatch to add a
/// thread, so a provider that sleeps with `Task.sleep` resolves its fault a second late. This clock's timers fire on a
/// serial queue of the library's own, which always gets a thread:
///
/// ```swift
/// let clock = PoolFreeClock()
/// try await clock.sleep(for: .milliseconds(20))   // instead of Task.sleep(for:)
/// ```
///
/// Its instants are `ContinuousClock`'s. A sleep throws `CancellationError` as soon as its task is cancelled.
/// `UserfaultfdHTTP`'s `HTTPRangeProvider` waits for its timeouts and retry backoffs the same way.
public struct PoolFreeClock: Clock, Sendable {
    public typealias Instant = ContinuousClock.Instant
    public typealias Duration = Swift.Duration

    /// The clock.
    public init() {}

    /// Now, on `ContinuousClock`.
    public var now: Instant { ContinuousClock.now }

    /// The timers' resolution (Dispatch timers: a microsecond at best).
    public var minimumResolution: Duration { .microseconds(1) }

    /// Suspends until `deadline`, on a timer of the library's own serial queue.
    /// - Throws: `CancellationError` when the task is cancelled before the deadline (at once, not at the deadline).
    public func sleep(until deadline: Instant, tolerance: Duration? = nil) async throws {
        try Task.checkCancellation()
        let sleeper = Sleeper()
        try await withTaskCancellationHandler {
            try await withUnsafeThrowingContinuation { (continuation: UnsafeContinuation<Void, any Error>) in
                sleeper.arm(continuation)
                Self.schedule(after: deadline - now) { sleeper.finish(nil) }
            }
        } onCancel: {
            sleeper.finish(CancellationError())
        }
    }

    /// The library's timer queue: serial, so Dispatch gives it a thread of its own whenever it has work, even when every
    /// worker thread is blocked.
    static let queue = DispatchQueue(label: "userfaultfd.timers")

    /// Runs `body` on the timer queue after `delay` (at once if it is not positive). `body` must be short: every timer
    /// of the library shares the queue.
    package static func schedule(after delay: Duration, _ body: @escaping @Sendable () -> Void) {
        queue.asyncAfter(deadline: .now() + delay.timeInterval, execute: body)
    }

    /// One sleep: whichever comes first, the timer or the cancellation, resumes the continuation; the other does nothing.
    /// (A cancelled sleep's timer still fires at its deadline, and then finds nothing to do.)
    private final class Sleeper: Sendable {
        private struct State {
            var continuation: UnsafeContinuation<Void, any Error>?
            /// Set once the sleep ended (nil error: the deadline came).
            var outcome: (any Error)??
        }

        private let state = Mutex(State())

        func arm(_ continuation: UnsafeContinuation<Void, any Error>) {
            let outcome = state.withLock { state -> (any Error)?? in
                if state.outcome == nil { state.continuation = continuation }
                return state.outcome
            }
            guard let outcome else { return }
            if let error = outcome { continuation.resume(throwing: error) } else { continuation.resume() }
        }

        func finish(_ error: (any Error)?) {
            let continuation = state.withLock { state -> UnsafeContinuation<Void, any Error>? in
                guard state.outcome == nil else { return nil }
                state.outcome = .some(error)
                defer { state.continuation = nil }
                return state.continuation
            }
            guard let continuation else { return }
            if let error { continuation.resume(throwing: error) } else { continuation.resume() }
        }
    }
}
