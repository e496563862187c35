import Foundation

/// Runs `body` on a new Foundation thread of its own, never on Swift's cooperative pool (two threads on this machine):
/// code that touches registered memory sleeps in the kernel until its fault is resolved, and a pool thread asleep there
/// could starve the very task that resolves it.
///
/// `isFinished` tells whether the body returned (a thread blocked on a fault has not); `value` waits for the result
/// without blocking a pool thread.
///
/// A thread started inside ``withFaultWatchdog(seconds:sourceLocation:_:)`` is tracked by the test's ``FaultScope``.
final class OffPoolThread<T: Sendable>: ThreadCompletion, @unchecked Sendable {
    // @unchecked: all mutable state is guarded by `lock`.
    private let lock = NSLock()
    private var result: T?
    private var waiters: [CheckedContinuation<T, Never>] = []

    init(name: String = "uffd-test", _ body: @escaping @Sendable () -> T) {
        let thread = Thread { [self] in
            let value = body()
            lock.lock()
            result = value
            let waiting = waiters
            waiters = []
            lock.unlock()
            for waiter in waiting { waiter.resume(returning: value) }
        }
        thread.name = name
        thread.stackSize = 1 << 20
        FaultScope.current?.track(thread: self)
        thread.start()
    }

    /// Whether the body has returned.
    var isFinished: Bool {
        lock.lock()
        defer { lock.unlock() }
        return result != nil
    }

    /// The body's result, once it returned.
    var value: T {
        get async {
            await withCheckedContinuation { continuation in
                lock.lock()
                if let result {
                    lock.unlock()
                    continuation.resume(returning: result)
                } else {
                    waiters.append(continuation)
                    lock.unlock()
                }
            }
        }
    }

    /// Waits up to `seconds` for the body to return; true if it did.
    func finishes(within seconds: Double) async -> Bool {
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while ContinuousClock.now < deadline {
            if isFinished { return true }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return isFinished
    }
}
