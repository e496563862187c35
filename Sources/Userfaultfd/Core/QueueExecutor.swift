import Dispatch
import Synchronization

/// A serial executor and task executor that runs jobs on one Dispatch queue.
///
/// Every userfaultfd's event reader runs on such a queue. Actors that resolve its faults use it as their serial executor
/// and provider tasks prefer it (or another one owned by the library), so resolution never needs a thread of Swift's
/// cooperative pool, whose threads may all be blocked on faults. (Linux has no `DispatchSerialQueue` executor.)
///
/// The executor counts the work queued on it (jobs and the blocks submitted with its internal `async(_:)` and
/// `asyncAfter(_:_:)`), so the event reader, which runs on the same queue, can stop polling the userfaultfd as soon
/// as anything waits behind it.
public final class QueueExecutor: SerialExecutor, TaskExecutor, @unchecked Sendable {
    // @unchecked: the stored properties are an immutable DispatchQueue and an atomic counter, both thread-safe.

    /// The queue jobs run on.
    public let queue: DispatchQueue
    /// Jobs and blocks submitted but not yet started.
    private let queued = Atomic<Int>(0)

    /// Creates an executor over a new serial queue.
    public init(label: String, qos: DispatchQoS = .userInitiated) {
        self.queue = DispatchQueue(label: label, qos: qos)
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        queued.add(1, ordering: .relaxed)
        queue.async {
            self.queued.subtract(1, ordering: .relaxed)
            job.runSynchronously(isolatedTo: self.asUnownedSerialExecutor(), taskExecutor: self.asUnownedTaskExecutor())
        }
    }

    /// Runs `body` on the queue, counted as queued work until it starts.
    func async(_ body: @escaping @Sendable () -> Void) {
        queued.add(1, ordering: .relaxed)
        queue.async {
            self.queued.subtract(1, ordering: .relaxed)
            body()
        }
    }

    /// Runs `body` on the queue after `delay`; counted as queued work from the deadline on, not while it waits.
    func asyncAfter(_ delay: Duration, _ body: @escaping @Sendable () -> Void) {
        DispatchQueue.global(qos: .userInitiated).asyncAfter(deadline: .now() + delay.timeInterval) {
            self.async(body)
        }
    }

    /// Whether work is queued behind the block running now (a racy snapshot: exact enough to stop polling).
    var hasQueuedWork: Bool {
        queued.load(ordering: .relaxed) > 0
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    public func checkIsolated() {
        dispatchPrecondition(condition: .onQueue(queue))
    }
}

extension Duration {
    /// In nanoseconds, saturated: 0 for a negative duration, `UInt64.max` beyond what fits.
    package var saturatingNanoseconds: UInt64 {
        let (seconds, attoseconds) = components
        guard seconds >= 0, attoseconds >= 0 || seconds > 0 else { return 0 }
        let (whole, overflow) = UInt64(seconds).multipliedReportingOverflow(by: 1_000_000_000)
        guard !overflow else { return .max }
        let (sum, carry) = whole.addingReportingOverflow(UInt64(max(0, attoseconds) / 1_000_000_000))
        return carry ? .max : sum
    }

    /// As a Dispatch time interval, saturated: `.never` beyond what nanoseconds in an `Int` hold (about 292 years),
    /// zero for a negative duration.
    package var timeInterval: DispatchTimeInterval {
        let nanoseconds = saturatingNanoseconds
        return nanoseconds > UInt64(Int.max) ? .never : .nanoseconds(Int(nanoseconds))
    }
}
