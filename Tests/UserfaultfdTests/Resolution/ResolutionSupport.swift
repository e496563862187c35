import CUserfaultfdTestSupport
import Dispatch
import Foundation
import Glibc
import Synchronization
import Testing
import UserfaultfdBenchSupport
import Userfaultfd

/// The parent of every resolution suite. Serialized: the suites measure timeouts, saturate the cooperative pool and map
/// 64 MiB regions, and on two cores they are more telling one at a time.
@Suite("Resolution", .serialized)
struct ResolutionTests {}

// MARK: - Data

/// Deterministic pseudo-random bytes (SplitMix64), so every run checks the same content.
enum SeededBytes {
    static func make(count: Int, seed: UInt64) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: count)
        var generator = SplitMix64(seed: seed)
        bytes.withUnsafeMutableBytes { raw in
            let base = raw.baseAddress!
            var index = 0
            while index < count {
                var z = generator.next()
                if index + 8 <= count {
                    base.storeBytes(of: z, toByteOffset: index, as: UInt64.self)
                    index += 8
                } else {
                    while index < count {
                        base.storeBytes(of: UInt8(truncatingIfNeeded: z), toByteOffset: index, as: UInt8.self)
                        z >>= 8
                        index += 1
                    }
                }
            }
        }
        return bytes
    }

    /// 64 MiB of seeded bytes, made once for every test that needs a big source.
    static let big: [UInt8] = make(count: 64 << 20, seed: 0x5eed_0001)
}

/// Per-page checksums of `bytes` (the last page may be short).
func pageChecksums(of bytes: [UInt8], pageSize: Int = systemPageSize) -> [UInt64] {
    let pages = (bytes.count + pageSize - 1) / pageSize
    var sums = [UInt64](repeating: 0, count: pages)
    bytes.withUnsafeBytes { raw in
        sums.withUnsafeMutableBufferPointer { out in
            _ = cuffd_res_page_checksums(raw.baseAddress!, raw.count, pageSize, out.baseAddress!)
        }
    }
    return sums
}

/// A temporary file holding `bytes`, removed by `remove()`.
struct ScratchFile: Sendable {
    let path: String

    init(bytes: [UInt8], name: String = "uffd-res") throws {
        path = FileManager.default.temporaryDirectory
            .appendingPathComponent("\(name)-\(getpid())-\(UUID().uuidString)").path
        guard FileManager.default.createFile(atPath: path, contents: Data(bytes)) else {
            throw TestFailure("could not create \(path)")
        }
    }

    /// An empty file to write into.
    static func empty(name: String) throws -> ScratchFile { try ScratchFile(bytes: [], name: name) }

    func contents() throws -> [UInt8] { [UInt8](try Data(contentsOf: URL(fileURLWithPath: path))) }

    func remove() { try? FileManager.default.removeItem(atPath: path) }
}

// MARK: - Provider instrumentation

/// One provider call: the offset asked for and the buffer's size.
struct ProviderCall: Sendable, Hashable, CustomStringConvertible {
    var offset: Int
    var count: Int
    var description: String { "(\(offset), \(count))" }
}

/// Records every provider call, thread-safely.
final class CallLog: Sendable {
    private let calls = Mutex<[ProviderCall]>([])

    func record(_ offset: Int, _ count: Int) { calls.withLock { $0.append(ProviderCall(offset: offset, count: count)) } }

    var all: [ProviderCall] { calls.withLock { $0 } }
    var count: Int { calls.withLock { $0.count } }
    func count(at offset: Int) -> Int { calls.withLock { $0.filter { $0.offset == offset }.count } }
    func covering(_ offset: Int) -> Int { calls.withLock { $0.filter { $0.offset <= offset && offset < $0.offset + $0.count }.count } }
}

/// A one-shot gate: `wait()` suspends (without holding a thread) until `open()`.
final class ProviderGate: Sendable {
    private struct State {
        var isOpen = false
        var waiters: [CheckedContinuation<Void, Never>] = []
    }

    private let state = Mutex(State())

    func wait() async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let resumeNow = state.withLock { state -> Bool in
                if state.isOpen { return true }
                state.waiters.append(continuation)
                return false
            }
            if resumeNow { continuation.resume() }
        }
    }

    func open() {
        let waiters = state.withLock { state -> [CheckedContinuation<Void, Never>] in
            state.isOpen = true
            defer { state.waiters.removeAll() }
            return state.waiters
        }
        for waiter in waiters { waiter.resume() }
    }

    var isOpen: Bool { state.withLock { $0.isOpen } }
}

/// A counter and flag set from any thread.
final class CallCounter: Sendable {
    private let value = Mutex(0)
    @discardableResult func increment() -> Int { value.withLock { $0 += 1; return $0 } }
    var current: Int { value.withLock { $0 } }
}

/// Suspends until the calling task is cancelled (a provider read that never answers on its own). Returns once cancelled.
func awaitCancellation() async {
    let gate = ProviderGate()
    await withTaskCancellationHandler {
        await gate.wait()
    } onCancel: {
        gate.open()
    }
}

/// Sleeps by resuming a continuation from `DispatchQueue.global().asyncAfter` (no Swift timer, no cooperative pool).
func dispatchSleep(microseconds: Int) async {
    await dispatchSleep(.microseconds(microseconds))
}

/// Fills `buffer` from `source` at `offset` (up to the source's end); returns how many bytes were written.
func fillBuffer(_ buffer: PageBuffer, from source: [UInt8], at offset: Int) -> Int {
    guard offset < source.count else { return 0 }
    let end = min(source.count, offset + buffer.count)
    return source.withUnsafeBytes { buffer.copy(from: UnsafeRawBufferPointer(rebasing: $0[offset..<end])) }
}

/// An error a provider throws on purpose.
struct InjectedFailure: Error, Hashable, CustomStringConvertible {
    var offset: Int
    var description: String { "injected failure at offset \(offset)" }
}

// MARK: - Waiting

/// Polls `condition` every 2 ms for up to `seconds`; true as soon as it holds.
func pollUntil(within seconds: Double = 10, _ condition: () -> Bool) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        if condition() { return true }
        await dispatchSleep(microseconds: 2000)
    }
    return condition()
}

/// The first element of `stream`, or nil if none arrives within `seconds` (or the stream ends).
func firstElement<T: Sendable>(of stream: AsyncStream<T>, within seconds: Double) async -> T? {
    await withTaskGroup(of: T?.self) { group in
        group.addTask {
            var iterator = stream.makeAsyncIterator()
            return await iterator.next()
        }
        group.addTask {
            // Cancellable, so the group does not wait out the whole timeout once the element arrived.
            try? await Task.sleep(for: .milliseconds(Int(seconds * 1000)))
            return nil
        }
        let first = await group.next() ?? nil
        group.cancelAll()
        return first
    }
}

// MARK: - Regions under a watchdog

/// Runs `body` with a LazyRegion whose userfaultfd `scope`'s watchdog closes if the test overruns (which wakes every
/// thread blocked in the region: they then read zeros and the test fails instead of hanging).
func withWatchedRegion<R: Sendable>(
    _ scope: FaultScope,
    length: Int,
    provider: any PageProvider,
    options: FaultResolver.Options = .init(),
    _ body: (LazyRegion) async throws -> R
) async throws -> R {
    try await LazyRegion.with(length: length, provider: provider, options: options) { region in
        scope.track(region.uffd)
        return try await body(region)
    }
}

/// Reads the byte at `offset` of the region on a dedicated thread.
func readByteOnThread(_ region: LazyRegion, at offset: Int) -> OffPoolThread<UInt8> {
    let address = UInt(bitPattern: region.baseAddress) + UInt(offset)
    return readOnThread(address)
}

/// Copies `length` bytes at `offset` of the region on a dedicated thread (faulting pages in as it goes).
func copyOnThread(_ region: LazyRegion, offset: Int, length: Int) -> OffPoolThread<[UInt8]> {
    let address = UInt(bitPattern: region.baseAddress) + UInt(offset)
    return OffPoolThread(name: "uffd-res-copy") {
        var bytes = [UInt8](repeating: 0, count: length)
        bytes.withUnsafeMutableBytes { out in
            // A volatile byte loop: every page is touched in order, one fault at a time.
            for index in 0..<length {
                out[index] = cuffd_test_read_byte(UnsafeRawPointer(bitPattern: address + UInt(index)))
            }
        }
        return bytes
    }
}

/// Reads the first byte of each page in `pages`, in order, on a dedicated thread.
func touchPagesOnThread(_ region: LazyRegion, pages: [Int]) -> OffPoolThread<[UInt8]> {
    let base = UInt(bitPattern: region.baseAddress)
    let pageSize = systemPageSize
    return OffPoolThread(name: "uffd-res-touch") {
        pages.map { cuffd_test_read_byte(UnsafeRawPointer(bitPattern: base + UInt($0 * pageSize))) }
    }
}

/// The bytes of present pages of the region (reading them never blocks once they are resolved).
func regionBytes(_ region: LazyRegion, offset: Int, count: Int) -> [UInt8] {
    Array(UnsafeRawBufferPointer(start: region.baseAddress + offset, count: count))
}

/// Waits for a thread with a bound. If it does not finish, records an issue, closes `uffd` (which wakes a thread blocked
/// or looping on a fault there: it then reads the memory as ordinary anonymous memory) and waits for the thread to
/// return, so that the region is never unmapped under a running thread; then returns nil.
func finished<T: Sendable>(
    _ thread: OffPoolThread<T>, within seconds: Double = 20, _ what: String = "thread", releasing uffd: UserfaultFD,
    sourceLocation: SourceLocation = #_sourceLocation
) async -> T? {
    if await thread.finishes(within: seconds) { return await thread.value }
    Issue.record("\(what) did not finish within \(seconds) s; closing the userfaultfd", sourceLocation: sourceLocation)
    uffd.close()
    if !(await thread.finishes(within: 20)) {
        Issue.record("\(what) still running 20 s after its userfaultfd was closed", sourceLocation: sourceLocation)
    }
    return nil
}

/// Where two byte arrays first differ (the shorter one's length when one is a prefix of the other); nil when equal.
/// Keeps failure messages short where `==` on whole pages would print every byte.
func firstDifference(_ lhs: [UInt8], _ rhs: [UInt8]) -> Int? {
    if lhs == rhs { return nil }
    return (0..<min(lhs.count, rhs.count)).first { lhs[$0] != rhs[$0] } ?? min(lhs.count, rhs.count)
}

extension LazyRegion {
    /// The statistics once the resolver has finished the work in hand: a woken thread can run before the resolver,
    /// still inside the same job on its serial queue, updates the counters after the ioctl that woke it. An empty
    /// prefetch is an actor call that runs after that job.
    var settledStatistics: FaultResolver.Statistics {
        get async {
            try? await resolver.prefetch(MemoryRange(start: range.start, length: 0))
            return statistics
        }
    }
}
