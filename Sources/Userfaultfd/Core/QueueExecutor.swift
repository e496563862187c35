import Dispatch

/// A serial executor and task executor that runs jobs on one Dispatch queue.
///
/// Every userfaultfd's event reader runs on such a queue. Actors that resolve its faults use it as their serial executor
/// and provider tasks prefer it (or another one owned by the library), so resolution never needs a thread of Swift's
/// cooperative pool, whose threads may all be blocked on faults. (Linux has no `DispatchSerialQueue` executor.)
public final class QueueExecutor: SerialExecutor, TaskExecutor, @unchecked Sendable {
    // @unchecked: the only stored property is an immutable DispatchQueue, which is thread-safe.

    /// The queue jobs run on.
    public let queue: DispatchQueue

    /// Creates an executor over a new serial queue.
    public init(label: String, qos: DispatchQoS = .userInitiated) {
        self.queue = DispatchQueue(label: label, qos: qos)
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        queue.async {
            job.runSynchronously(isolatedTo: self.asUnownedSerialExecutor(), taskExecutor: self.asUnownedTaskExecutor())
        }
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    public func checkIsolated() {
        dispatchPrecondition(condition: .onQueue(queue))
    }
}
