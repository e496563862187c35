import Foundation

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
final class ResultBox<T: Sendable>: @unchecked Sendable {
    // @unchecked: all state is guarded by `lock`.
    private let lock = NSLock()
    private var result: T?
    private var waiter: CheckedContinuation<T, Never>?

    func set(_ value: T) {
        lock.lock()
        if let waiter {
            self.waiter = nil
            lock.unlock()
            waiter.resume(returning: value)
        } else {
            result = value
            lock.unlock()
        }
    }

    func value() async -> T {
        await withCheckedContinuation { continuation in
            lock.lock()
            if let result {
                lock.unlock()
                continuation.resume(returning: result)
            } else {
                waiter = continuation
                lock.unlock()
            }
        }
    }
}
