import Foundation
import Synchronization

/// Runs blocking work on a new thread of its own, never on Swift's cooperative pool.
///
/// Code that touches userfaultfd-registered memory blocks its thread in the kernel until the fault is resolved; on a
/// cooperative-pool thread that can starve the very tasks that resolve it.
enum DedicatedThread {
    /// Starts `body` on a new thread; the returned task's value is its result.
    static func run<T: Sendable>(_ body: @escaping @Sendable () -> T) -> Task<T, Never> {
        let box = ResultBox<T>()
        let thread = Thread {
            box.set(body())
        }
        thread.stackSize = 1 << 20
        thread.start()
        return Task { await box.value() }
    }
}

/// A one-shot value handed from a thread to a task.
final class ResultBox<T: Sendable>: Sendable {
    private enum State {
        case empty
        case waiting(CheckedContinuation<T, Never>)
        case ready(T)
    }

    private let state = Mutex(State.empty)

    func set(_ value: T) {
        let waiter = state.withLock { state -> CheckedContinuation<T, Never>? in
            if case .waiting(let continuation) = state {
                state = .empty
                return continuation
            }
            state = .ready(value)
            return nil
        }
        waiter?.resume(returning: value)
    }

    func value() async -> T {
        await withCheckedContinuation { continuation in
            let ready = state.withLock { state -> T? in
                if case .ready(let value) = state { return value }
                state = .waiting(continuation)
                return nil
            }
            if let ready { continuation.resume(returning: ready) }
        }
    }
}
