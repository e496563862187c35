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

/// The process's resident set and page tables, from /proc/self/status.
func processMemory() -> (resident: Int, pageTables: Int) {
    guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else { return (0, 0) }
    func kilobytes(_ key: String) -> Int {
        for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
            return (Int(String(line.dropFirst(key.count + 1).filter(\.isNumber))) ?? 0) * 1024
        }
        return 0
    }
    return (kilobytes("VmRSS"), kilobytes("VmPTE"))
}

/// Waits `duration` without holding a thread: a continuation that a Dispatch timer resumes.
func dispatchSleep(_ duration: Duration) async {
    let nanoseconds = Int(duration.components.seconds) * 1_000_000_000 + Int(duration.components.attoseconds / 1_000_000_000)
    await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
        DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(nanoseconds)) { continuation.resume() }
    }
}

/// Writes a file of `size` bytes of a pattern (it stays in the page cache).
func writeFile(path: String, size: Int) throws {
    let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
    guard descriptor >= 0 else { throw BenchmarkSetupError("open \(path): errno \(errno)") }
    defer { close(descriptor) }
    let chunk = 1 << 20
    let block = (0..<chunk).map { UInt8(truncatingIfNeeded: $0 &* 31 &+ 7) }
    var written = 0
    while written < size {
        let count = block.withUnsafeBytes { write(descriptor, $0.baseAddress!, min(chunk, size - written)) }
        if count < 0 {
            if errno == EINTR { continue }
            throw BenchmarkSetupError("write \(path): errno \(errno)")
        }
        written += count
    }
}

struct BenchmarkSetupError: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
