import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import Userfaultfd

/// The parent of the reliability suites (stress, fault injection). Serialized: the stress test maps a 1 GiB region and
/// keeps both cores busy, and the injection tests start hundreds of threads.
@Suite("Reliability", .serialized)
struct ReliabilityTests {}

/// The stress test's size, from the environment (defaults sized for CI: a few minutes in all).
struct StressConfiguration: Sendable, CustomStringConvertible {
    /// Seconds of load per run (`UFFD_STRESS_SECONDS`, default 20; the test runs once per `afterRemove` policy).
    var seconds: Double
    /// Threads reading and writing pages (`UFFD_STRESS_THREADS`, default 8).
    var threads: Int
    /// Threads giving pages back with MADV_DONTNEED (`UFFD_STRESS_REMOVERS`, default 2).
    var removers: Int
    /// The region, in MiB (`UFFD_STRESS_REGION_MIB`, default 1024).
    var regionMiB: Int
    /// The seed of every random choice (`UFFD_STRESS_SEED`).
    var seed: UInt64

    static let current: StressConfiguration = {
        let environment = ProcessInfo.processInfo.environment
        func value<T: LosslessStringConvertible>(_ name: String, _ fallback: T) -> T {
            environment[name].flatMap { T($0) } ?? fallback
        }
        return StressConfiguration(
            seconds: max(1, value("UFFD_STRESS_SECONDS", 20.0)),
            threads: max(1, value("UFFD_STRESS_THREADS", 8)),
            removers: max(0, value("UFFD_STRESS_REMOVERS", 2)),
            regionMiB: max(1, value("UFFD_STRESS_REGION_MIB", 1024)),
            seed: value("UFFD_STRESS_SEED", UInt64(0x5eed_0008)))
    }()

    /// The test's time limit: the load, the final check of every page, and a generous margin.
    var timeLimitMinutes: Int { Int(seconds / 60) + 5 + regionMiB / 4096 }
    /// The watchdog's deadline, inside the time limit.
    var watchdogSeconds: Double { seconds + 150 + Double(regionMiB) / 64 }

    var description: String {
        "\(String(format: "%.0f", seconds)) s, \(threads) threads, \(removers) removers, \(regionMiB) MiB, seed 0x\(String(seed, radix: 16))"
    }
}

/// What the stress test believes every page holds, under one lock per page.
///
/// `content[p]`: 0 = the provider's data, 1 = zeros, anything else = the seed a writer filled the page with.
/// `tracking[p]`: what write tracking must show — unknown, protected and not written since, or written since protected.
final class StressModel: @unchecked Sendable {
    // @unchecked: `content` and `tracking` entries are only touched with the page's lock held (or after every thread
    // stopped); the counters are atomics.
    enum Tracking: UInt8 { case unknown = 0, protectedClean = 1, written = 2 }
    static let providerContent: UInt64 = 0
    static let zeroContent: UInt64 = 1

    let pageCount: Int
    let pageSize: Int
    let base: UInt
    let dataSeed: UInt64
    private let locks: UnsafeMutableRawPointer
    let content: UnsafeMutablePointer<UInt64>
    let tracking: UnsafeMutablePointer<UInt8>
    let zeroChecksum: UInt64

    let readsVerified = Atomic<Int>(0)
    let writes = Atomic<Int>(0)
    let removes = Atomic<Int>(0)
    let pagesRemoved = Atomic<Int>(0)
    let protectRounds = Atomic<Int>(0)
    let writesToProtectedPages = Atomic<Int>(0)
    let repeatedCopies = Atomic<Int>(0)
    let corruptions = Atomic<Int>(0)
    let trackingErrors = Atomic<Int>(0)
    let copyOverPresentPage = Atomic<Int>(0)
    let stop = Atomic<Bool>(false)
    private let problems = Mutex<[String]>([])

    init(pageCount: Int, pageSize: Int, base: UInt, dataSeed: UInt64) throws {
        self.pageCount = pageCount
        self.pageSize = pageSize
        self.base = base
        self.dataSeed = dataSeed
        guard let locks = cuffd_stress_locks_create(pageCount) else { throw TestFailure("cannot allocate \(pageCount) locks") }
        self.locks = locks
        content = .allocate(capacity: pageCount)
        content.initialize(repeating: Self.providerContent, count: pageCount)
        tracking = .allocate(capacity: pageCount)
        tracking.initialize(repeating: Tracking.unknown.rawValue, count: pageCount)
        let zeros = [UInt8](repeating: 0, count: pageSize)
        zeroChecksum = zeros.withUnsafeBytes { cuffd_res_checksum($0.baseAddress!, pageSize) }
    }

    /// Frees the model (after every thread stopped).
    func release() {
        cuffd_stress_locks_destroy(locks, pageCount)
        content.deallocate()
        tracking.deallocate()
    }

    /// The seed of the provider's bytes for page `page`.
    func providerSeed(_ page: Int) -> UInt64 { dataSeed ^ (UInt64(page) &* 0x9e37_79b9_7f4a_7c15) }

    func address(_ page: Int) -> UInt { base + UInt(page * pageSize) }

    func lock(_ page: Int) { cuffd_stress_lock(locks, page) }
    func unlock(_ page: Int) { cuffd_stress_unlock(locks, page) }
    func lock(_ pages: Range<Int>) { for page in pages { lock(page) } }
    func unlock(_ pages: Range<Int>) { for page in pages { unlock(page) } }

    /// The checksum page `page` must have now (lock held).
    func expectedChecksum(_ page: Int) -> UInt64 {
        switch content[page] {
        case Self.providerContent: cuffd_stress_expected_checksum(pageSize, providerSeed(page))
        case Self.zeroContent: zeroChecksum
        case let seed: cuffd_stress_expected_checksum(pageSize, seed)
        }
    }

    /// Reads page `page` (faulting it in if it is missing) and compares it with the model (lock held).
    @discardableResult
    func verify(_ page: Int, when: String) -> Bool {
        let actual = cuffd_res_checksum(UnsafeRawPointer(bitPattern: address(page)), pageSize)
        let expected = expectedChecksum(page)
        guard actual != expected else { return true }
        corruptions.add(1, ordering: .relaxed)
        let state = content[page] == Self.providerContent ? "provider data" : content[page] == Self.zeroContent ? "zeros" : "written"
        record("corruption \(when): page \(page) should hold \(state), checksum 0x\(String(actual, radix: 16)) instead of 0x\(String(expected, radix: 16))")
        return false
    }

    func record(_ problem: String) {
        problems.withLock { if $0.count < 20 { $0.append(problem) } }
    }

    var recordedProblems: [String] { problems.withLock { $0 } }

    var isStopped: Bool { stop.load(ordering: .relaxed) }
}
