import CUserfaultfdBaseline
import Dispatch
import Foundation
import Synchronization

/// Threads of their own that run a fixed job each time they are released: the faulting side of every benchmark.
///
/// Faults must never happen on Swift's cooperative pool, and the hand-off must not allocate (the benchmarks count
/// allocations), so the threads and their jobs are made once, in setup; ``run()`` only signals semaphores.
final class Workers: @unchecked Sendable {
    // @unchecked: `jobs` is written once before the threads start; the semaphores order everything else.
    private let start: [DispatchSemaphore]
    private let done = DispatchSemaphore(value: 0)
    private let stop = Counter()
    let count: Int

    /// `count` threads; thread `i` runs `job(i)` each time ``run()`` is called.
    init(count: Int = 1, job: @escaping @Sendable (Int) -> Void) {
        self.count = count
        start = (0..<count).map { _ in DispatchSemaphore(value: 0) }
        for index in 0..<count {
            let thread = Thread { [start, done, stop] in
                while true {
                    start[index].wait()
                    if stop.load() != 0 { return }
                    job(index)
                    done.signal()
                }
            }
            thread.stackSize = 1 << 20
            thread.start()
        }
    }

    /// Releases every thread once and waits until all have finished their job.
    func run() {
        for semaphore in start { semaphore.signal() }
        for _ in 0..<count { done.wait() }
    }

    /// Ends the threads.
    func shutdown() {
        stop.store(1)
        for semaphore in start { semaphore.signal() }
    }
}

/// An atomic integer that closures can share (an `Atomic` itself can't be captured).
final class Counter: Sendable {
    private let value = Atomic<Int>(0)
    init(_ initial: Int = 0) { value.store(initial, ordering: .relaxed) }
    func load() -> Int { value.load(ordering: .acquiring) }
    func store(_ newValue: Int) { value.store(newValue, ordering: .releasing) }
    /// Adds `amount`; returns the new value.
    @discardableResult func add(_ amount: Int) -> Int { value.wrappingAdd(amount, ordering: .acquiringAndReleasing).newValue }
}

/// A value written by the faulting threads so the reads are not optimized away.
let blackHoleSum = Atomic<UInt64>(0)

/// Touches `length` bytes at `address` with the C reference's loop.
@inline(never)
func touch(_ address: UInt, _ length: Int, _ workload: cbaseline_workload) {
    let sum = cbaseline_touch_region(UnsafeRawPointer(bitPattern: address), length, workload)
    blackHoleSum.wrappingAdd(sum, ordering: .relaxed)
}
