import CUserfaultfdTestSupport
import Foundation
import Glibc

/// Waits (without blocking a pool thread) for child `pid` to exit, up to `seconds`. Returns its exit code (or -signal),
/// or nil if it is still running.
func waitForChild(_ pid: pid_t, seconds: Double) async -> Int32? {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while true {
        var status: Int32 = 0
        let result = cuffd_test_waitpid(pid, &status, 1)
        if result == pid { return cuffd_test_decode_status(status) }
        if result < 0 { return -1001 }
        if ContinuousClock.now >= deadline { return nil }
        try? await Task.sleep(for: .milliseconds(5))
    }
}

/// The task's value, or nil (and the task cancelled) if it takes longer than `seconds`.
func value<T: Sendable>(of task: Task<T, any Error>, within seconds: Double) async throws -> T? {
    let box = TaskOutcome<T>()
    let watcher = Task {
        do { box.set(.success(try await task.value)) } catch { box.set(.failure(error)) }
    }
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if let outcome = box.get() { return try outcome.get() }
        try? await Task.sleep(for: .milliseconds(5))
    }
    task.cancel()
    watcher.cancel()
    return nil
}

private final class TaskOutcome<T: Sendable>: @unchecked Sendable {
    // @unchecked: guarded by `lock`.
    private let lock = NSLock()
    private var outcome: Result<T, any Error>?
    func set(_ value: Result<T, any Error>) { lock.withLock { outcome = value } }
    func get() -> Result<T, any Error>? { lock.withLock { outcome } }
}
