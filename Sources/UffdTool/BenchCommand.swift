import CUserfaultfdBaseline
import Dispatch
import Foundation
import Glibc
import Synchronization
import Userfaultfd

/// `uffd bench`: the library against the C reference (userfaultfd(2)'s poll → read → UFFDIO_COPY handler), in one run.
///
/// Every workload faults from threads of its own (never from Swift's cooperative pool), and each row compares the library
/// with its reference measured in the same process, right after it. The full suite for the benchmark plugin lives in
/// Benchmarks/ (with allocation counts); this one needs nothing but the toolchain.
public struct BenchCommand: Sendable {
    /// Smaller sizes: the whole run in seconds instead of a minute.
    public var quick: Bool
    /// Only these ids (P1…P5, or a row id such as P2b); all when nil.
    public var only: Set<String>?
    /// The resolver's polling window in the library runs (``FaultResolver/Options/pollingWindow``; its default when nil).
    public var pollingWindow: Duration?
    /// Progress on stderr.
    public var showProgress: Bool
    /// Where the table goes.
    public var log: @Sendable (String) -> Void

    public init(quick: Bool = false, only: Set<String>? = nil, pollingWindow: Duration? = nil, showProgress: Bool = true,
                log: @escaping @Sendable (String) -> Void = { print($0) }) {
        self.quick = quick
        self.only = only
        self.pollingWindow = pollingWindow
        self.showProgress = showProgress
        self.log = log
    }

    /// One line of the table.
    public struct Row: Sendable {
        public var id: String
        public var workload: String
        public var library: String
        public var reference: String
        /// Library speed ÷ reference speed (1.00 = as fast), when the two compare.
        public var ratio: Double?
        public var goal: String
        /// nil when the row has no goal.
        public var met: Bool?
    }

    /// The benchmark groups, in order.
    public static let groups = ["P1", "P2", "P3", "P4", "P5"]

    /// Runs the selected benchmarks, prints the table and the details, and returns the rows.
    @discardableResult
    public func run() async throws -> [Row] {
        var rows: [Row] = []
        var details: [String] = []
        let started = ContinuousClock.now
        for group in Self.groups where only == nil || only!.contains(where: { $0.hasPrefix(group) }) {
            let (groupRows, groupDetails) = try await runGroup(group)
            rows += groupRows.filter { selected($0.id) }
            details += groupDetails
        }
        clearProgress()
        log(Self.table(rows))
        if !details.isEmpty {
            log("")
            details.forEach(log)
        }
        log("")
        log("ratio = library speed ÷ reference speed (1.00× = as fast). \(quick ? "--quick sizes. " : "")"
            + "Total \(format(seconds: seconds(ContinuousClock.now - started)))."
            + " Allocation counts per fault: `swift package benchmark` in Benchmarks/.")
        return rows
    }

    private func selected(_ id: String) -> Bool {
        guard let only else { return true }
        // A group (P2) selects its rows (P2a…), a row id (P2A: ids are compared uppercased) itself.
        return only.contains(id.uppercased()) || only.contains(String(id.prefix(2)))
    }

    private func runGroup(_ group: String) async throws -> ([Row], [String]) {
        switch group {
        case "P1": return try await p1()
        case "P2": return try await p2()
        case "P3": return try await p3()
        case "P4": return try await p4()
        case "P5": return try await p5()
        default: return ([], [])
        }
    }

    // MARK: - P1: the one-page round trip

    private func p1() async throws -> ([Row], [String]) {
        let pages = quick ? 4096 : 16384
        let pageSize = systemPageSize
        progress("P1: warming up")
        _ = try await touchLazyRegion(pages: 256, provider: MemoryProvider(repeatElement(0x5A, count: 256 * pageSize)),
                                           readahead: .none, workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        _ = try await Self.cReference(pages: 256, perCopy: 1, workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)

        progress("P1: library, \(pages) pages, one page per fault")
        let provider = MemoryProvider(repeatElement(0x5A, count: pages * pageSize))
        let library = try await touchLazyRegion(pages: pages, provider: provider, readahead: .none,
                                                     workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        progress("P1: C poll loop, \(pages) pages, one page per COPY")
        let reference = try await Self.cReference(pages: pages, perCopy: 1, workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)

        let latency = library.statistics.latency
        let rows = [
            Row(id: "P1", workload: "\(kiPages(pages)) pages touched once, 1 thread, MemoryProvider, readahead none, polling \(pollingLabel)",
                library: format(nsPerPage: library.nsPerPage), reference: "C poll loop 1 page/COPY: " + format(nsPerPage: reference.ns_per_page),
                ratio: reference.ns_per_page / library.nsPerPage, goal: "round trip ≤ 1.10× C (≥ 0.91×)",
                met: reference.ns_per_page / library.nsPerPage >= 1 / 1.10),
            Row(id: "L1", workload: "fault-to-wake latency p50 / p99 (P1, statistics.latency)",
                library: "\(LatencyHistogram.format(latency.percentile(50))) / \(LatencyHistogram.format(latency.percentile(99)))",
                reference: "—", ratio: nil, goal: "—", met: nil),
        ]
        return (rows, [
            "P1 library: \(library.statistics)",
            "P1 C: faults \(reference.faults), copies \(reference.copies), already present \(reference.already_present)",
        ])
    }

    // MARK: - P2: reading every byte of zero pages

    private func p2() async throws -> ([Row], [String]) {
        let pages = quick ? 8192 : 65536
        let bytes = Double(pages * systemPageSize)
        let workload = CBASELINE_READ_EVERY_BYTE
        progress("P2a: library, ZeroProvider, readahead none, \(pages) pages")
        let none = try await touchLazyRegion(pages: pages, provider: ZeroProvider(), readahead: .none, workload: workload)
        progress("P2b: library, ZeroProvider, default readahead, \(pages) pages")
        let adaptive = try await touchLazyRegion(pages: pages, provider: ZeroProvider(), readahead: .default, workload: workload)
        var references: [Int: CRun] = [:]
        for perCopy in [1, 16, 64] {
            progress("P2: C poll loop, \(perCopy) page(s) per COPY, \(pages) pages")
            references[perCopy] = try await Self.cReference(pages: pages, perCopy: perCopy, workload: workload, fill: 0)
        }
        func rate(_ ns: Double) -> Double { bytes / ns * 1e3 }  // MB/s
        let c1 = references[1]!, c16 = references[16]!, c64 = references[64]!
        let what = "\(kiPages(pages)) pages, ZeroProvider, every byte read, polling \(pollingLabel)"
        let rows = [
            Row(id: "P2a", workload: what + ", readahead none", library: format(mbps: rate(none.nanoseconds)),
                reference: "C 1 page/COPY: " + format(mbps: rate(c1.nanoseconds)), ratio: c1.nanoseconds / none.nanoseconds,
                goal: "≥ 1.00×", met: c1.nanoseconds / none.nanoseconds >= 1),
            Row(id: "P2b", workload: what + ", default readahead", library: format(mbps: rate(adaptive.nanoseconds)),
                reference: "C 1 page/COPY: " + format(mbps: rate(c1.nanoseconds)), ratio: c1.nanoseconds / adaptive.nanoseconds,
                goal: "≥ 25×", met: c1.nanoseconds / adaptive.nanoseconds >= 25),
            Row(id: "P2c", workload: what + ", default readahead", library: format(mbps: rate(adaptive.nanoseconds)),
                reference: "C 16 pages/COPY: " + format(mbps: rate(c16.nanoseconds)), ratio: c16.nanoseconds / adaptive.nanoseconds,
                goal: "—", met: nil),
            Row(id: "P2d", workload: what + ", default readahead", library: format(mbps: rate(adaptive.nanoseconds)),
                reference: "C 64 pages/COPY: " + format(mbps: rate(c64.nanoseconds)), ratio: c64.nanoseconds / adaptive.nanoseconds,
                goal: "—", met: nil),
        ]
        let latency = none.statistics.latency
        return (rows, [
            "P2a library: \(none.statistics)",
            "P2b library: \(adaptive.statistics)",
            "P2 C: faults/copies 1 page \(c1.faults)/\(c1.copies), 16 pages \(c16.faults)/\(c16.copies), 64 pages \(c64.faults)/\(c64.copies)",
            "P2a fault-to-wake p50 \(LatencyHistogram.format(latency.percentile(50))) p99 \(LatencyHistogram.format(latency.percentile(99)))",
        ])
    }

    // MARK: - P3: 8 threads against a slow provider

    private func p3() async throws -> ([Row], [String]) {
        let threads = 8
        let delay = Duration.milliseconds(2)
        let faultsPerThread = quick ? 100 : 500
        let pages = threads * faultsPerThread
        let provider = ClosureProvider { buffer, offset in
            await Self.sleep(delay)
            buffer.withUnsafeMutableBytes { bytes in bytes.storeBytes(of: UInt64(offset), as: UInt64.self) }
            return .bytes(8)
        }
        progress("P3: library, \(threads) threads, provider awaits 2 ms, \(pages) faults")
        let region = try await LazyRegion(length: pages * systemPageSize, provider: provider, options: options(readahead: .none))
        let base = UInt(bitPattern: region.baseAddress)
        let pageSize = systemPageSize
        let elapsed = await Self.onThreads(threads) { thread in
            // Thread t touches pages t, t + 8, t + 16...: every touch is a fault of its own.
            var sum: UInt64 = 0
            for index in 0..<faultsPerThread {
                let page = index * threads + thread
                sum &+= UInt64(UnsafePointer<UInt8>(bitPattern: base + UInt(page * pageSize))!.pointee)
            }
            return sum
        }
        let statistics = region.statistics
        await region.close()
        let faultsPerSecond = Double(statistics.faults) / (elapsed / 1e9)
        let ideal = Double(threads) / (Double(delay.components.attoseconds) / 1e18 + Double(delay.components.seconds))
        let latency = statistics.latency
        let rows = [
            Row(id: "P3", workload: "\(threads) threads fault \(pages) pages, provider awaits 2 ms per read (asyncAfter), readahead none",
                library: String(format: "%.0f faults/s", faultsPerSecond),
                reference: String(format: "ideal %.0f faults/s (8 ÷ 2 ms)", ideal), ratio: faultsPerSecond / ideal,
                goal: "≥ 0.80× (3200/s)", met: faultsPerSecond >= 0.8 * ideal),
            Row(id: "L3", workload: "fault-to-wake latency p50 / p99 (P3, includes the 2 ms read)",
                library: "\(LatencyHistogram.format(latency.percentile(50))) / \(LatencyHistogram.format(latency.percentile(99)))",
                reference: "2.0 ms", ratio: nil, goal: "—", met: nil),
        ]
        return (rows, ["P3 library: \(statistics)"])
    }

    // MARK: - P4: a file through FileProvider

    private func p4() async throws -> ([Row], [String]) {
        let size = quick ? 64 << 20 : 256 << 20
        let pages = size / systemPageSize
        progress("P4: writing a \(size >> 20) MiB file")
        let path = NSTemporaryDirectory() + "uffd-bench-\(getpid()).dat"
        try Self.writeFile(path: path, size: size)
        defer { unlink(path) }

        progress("P4: library, FileProvider, default readahead, \(size >> 20) MiB")
        let library = try await touchLazyRegion(pages: pages, provider: try FileProvider(path: path), readahead: .default,
                                                     workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        progress("P4: plain anonymous first touch, \(size >> 20) MiB")
        let reference = await DedicatedThread.run { () -> CRun in
            var result = cbaseline_result()
            _ = cbaseline_anonymous_first_touch(pages, 1, &result)
            return CRun(result)
        }.value
        try reference.check("anonymous first touch")

        // MINOR: a first shared-memory region fills a memfd's page cache from the file (MISSING faults, then
        // CONTINUE); a second region over the same memfd — a second VM restoring the same snapshot — then only maps
        // those pages (MINOR faults + CONTINUE). Its reference is mmap(2) of the same memfd, the kernel mapping the
        // same pages by itself.
        progress("P4m: shared-memory LazyRegion filling a memfd from the file (MISSING + CONTINUE), \(size >> 20) MiB")
        let first = try await LazyRegion(length: size, provider: try FileProvider(path: path), options: options(), backing: .sharedMemory)
        let firstTouch = await Self.touch(first, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        let firstStatistics = first.statistics
        guard let memfd = first.sharedFile else { throw ToolError("a shared-memory LazyRegion without its file") }
        await first.close()
        progress("P4m: a second shared-memory LazyRegion over the filled memfd (MINOR + CONTINUE), \(size >> 20) MiB")
        let second = try await LazyRegion(length: size, provider: ZeroProvider(), options: options(), backing: .sharedMemory,
                                          sharedFile: memfd)
        let minorTouch = await Self.touch(second, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        let minorStatistics = second.statistics
        await second.close()
        progress("P4m: mmap(2) of the same memfd, \(size >> 20) MiB")
        let view = try memfd.map()
        let viewBase = view.address
        let mapped = await Self.onThreads(1) { _ in
            cbaseline_touch_region(UnsafeRawPointer(bitPattern: viewBase), size, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        }
        view.unmap()

        let libraryRate = Double(size) / library.nanoseconds * 1e3
        let referenceRate = Double(size) / reference.nanoseconds * 1e3
        let firstRate = Double(size) / firstTouch * 1e3
        let minorRate = Double(size) / minorTouch * 1e3
        let mappedRate = Double(size) / mapped * 1e3
        let rows = [
            Row(id: "P4", workload: "\(size >> 20) MiB file (page cache) read in order via FileProvider, 1 byte/page, default readahead",
                library: format(mbps: libraryRate), reference: "anonymous first touch (write): " + format(mbps: referenceRate),
                ratio: libraryRate / referenceRate, goal: "≥ 0.80×", met: libraryRate / referenceRate >= 0.8),
            Row(id: "P4m", workload: "a memfd holding the data, mapped by a shared-memory LazyRegion: MINOR faults + CONTINUE",
                library: format(mbps: minorRate), reference: "mmap(2) of the memfd: " + format(mbps: mappedRate),
                ratio: minorRate / mappedRate, goal: "≥ 0.50×", met: minorRate / mappedRate >= 0.5),
            Row(id: "P4s", workload: "filling that memfd from the file: shared-memory LazyRegion (MISSING, page cache + CONTINUE)",
                library: format(mbps: firstRate), reference: "COPY (P4): " + format(mbps: libraryRate),
                ratio: firstRate / libraryRate, goal: "—", met: nil),
        ]
        return (rows, ["P4 library: \(library.statistics)", "P4s library: \(firstStatistics)", "P4m library: \(minorStatistics)"])
    }

    /// The polling window, for the table.
    var pollingLabel: String {
        let window = options().pollingWindow
        return window == .zero ? "off" : "\(window.components.attoseconds / 1_000_000_000_000 + window.components.seconds * 1_000_000) µs"
    }

    /// Resolver options for the library runs: the default, with `readahead` and the chosen polling window.
    func options(readahead: ReadaheadPolicy = .default) -> FaultResolver.Options {
        var options = FaultResolver.Options(readahead: readahead)
        if let pollingWindow { options.pollingWindow = pollingWindow }
        return options
    }

    /// Nanoseconds for one dedicated thread to touch all of `region` in order with the C reference's loop.
    static func touch(_ region: LazyRegion, _ workload: cbaseline_workload) async -> Double {
        let base = UInt(bitPattern: region.baseAddress), length = region.count
        return await onThreads(1) { _ in
            cbaseline_touch_region(UnsafeRawPointer(bitPattern: base), length, workload)
        }
    }

    // MARK: - P5: a huge sparse region

    private func p5() async throws -> ([Row], [String]) {
        let length = quick ? 16 << 30 : 64 << 30
        let touches = quick ? 25_000 : 100_000
        let pageSize = systemPageSize
        let regionPages = length / pageSize
        // Distinct random pages, chosen before the first RSS reading.
        var generator = SplitMix64(seed: 0x5EED)
        var chosen = Set<Int>(minimumCapacity: touches)
        while chosen.count < touches { chosen.insert(Int(generator.next() % UInt64(regionPages))) }
        var order = Array(chosen)
        order.shuffle(using: &generator)
        let pageList = order
        let provider = ClosureProvider(immediate: { buffer, offset in
            buffer.withUnsafeMutableBytes { bytes in bytes.storeBytes(of: UInt64(offset) | 1, as: UInt64.self) }
            return .bytes(8)
        })

        progress("P5: library, \(length >> 30) GiB region, \(touches) random pages")
        let before = ProcessMemory.read()
        let region = try await LazyRegion(length: length, provider: provider, options: options(readahead: .none))
        let base = UInt(bitPattern: region.baseAddress)
        let elapsed = await Self.onThreads(1) { _ in
            var sum: UInt64 = 0
            for page in pageList { sum &+= UInt64(UnsafePointer<UInt8>(bitPattern: base + UInt(page * pageSize))!.pointee) }
            return sum
        }
        let after = ProcessMemory.read()
        let statistics = region.statistics
        await region.close()

        let touched = touches * pageSize
        let overhead = after.residentBytes - before.residentBytes - touched
        let mib = Double(overhead) / Double(1 << 20)
        let goal = 32.0
        let rows = [
            Row(id: "P5", workload: "\(length >> 30) GiB sparse LazyRegion, \(touches / 1000) k random pages touched, readahead none",
                library: String(format: "%.1f MiB RSS beyond the pages", mib),
                reference: String(format: "touched pages %.1f MiB", Double(touched) / Double(1 << 20)), ratio: nil,
                goal: "≤ 32 MiB", met: mib <= goal),
        ]
        return (rows, [
            String(format: "P5 RSS %.1f → %.1f MiB; page tables (VmPTE, not in RSS) %.1f → %.1f MiB; %.1f µs/fault",
                   Double(before.residentBytes) / 1048576, Double(after.residentBytes) / 1048576,
                   Double(before.pageTableBytes) / 1048576, Double(after.pageTableBytes) / 1048576,
                   elapsed / Double(touches) / 1e3),
            "P5 library: \(statistics)",
        ])
    }

    // MARK: - Workloads

    struct LibraryRun: Sendable {
        var nanoseconds: Double
        var nsPerPage: Double
        var statistics: ResolverStatistics
    }

    /// A LazyRegion of `pages` pages touched in order by one dedicated thread with the C reference's loop.
    func touchLazyRegion(pages: Int, provider: any PageProvider, readahead: ReadaheadPolicy,
                         workload: cbaseline_workload) async throws -> LibraryRun {
        let length = pages * systemPageSize
        let region = try await LazyRegion(length: length, provider: provider, options: options(readahead: readahead))
        let elapsed = await Self.touch(region, workload)
        let statistics = region.statistics
        await region.close()
        return LibraryRun(nanoseconds: elapsed, nsPerPage: elapsed / Double(pages), statistics: statistics)
    }

    /// The C reference, run on a thread of its own.
    static func cReference(pages: Int, perCopy: Int, workload: cbaseline_workload, fill: UInt8 = 0x5A) async throws -> CRun {
        let result = await DedicatedThread.run { () -> CRun in
            var result = cbaseline_result()
            _ = cbaseline_touch_pages(pages, perCopy, workload, fill, &result)
            return CRun(result)
        }.value
        try result.check("the C reference")
        return result
    }

    /// A `cbaseline_result`, as a Sendable value.
    struct CRun: Sendable {
        var nanoseconds: Double
        var ns_per_page: Double
        var faults: UInt64
        var copies: UInt64
        var already_present: UInt64
        var error: Int32
        var step: String

        init(_ result: cbaseline_result) {
            nanoseconds = result.nanoseconds
            ns_per_page = result.ns_per_page
            faults = result.faults
            copies = result.copies
            already_present = result.already_present
            error = result.error
            step = result.failed_step.map { String(cString: $0) } ?? ""
        }

        func check(_ what: String) throws {
            if error != 0 { throw ToolError("\(what) failed at \(step): \(String(cString: strerror(error)))") }
        }
    }

    /// Runs `body(index)` on `count` new threads released together; returns the nanoseconds from the release until the
    /// last one finished.
    static func onThreads(_ count: Int, _ body: @escaping @Sendable (Int) -> UInt64) async -> Double {
        let ready = DispatchSemaphore(value: 0)
        let go = DispatchSemaphore(value: 0)
        let done = DispatchGroup()
        let sink = Atomic<UInt64>(0)
        for index in 0..<count {
            done.enter()
            let thread = Thread {
                ready.signal()
                go.wait()
                let value = body(index)
                _ = sink.wrappingAdd(value, ordering: .relaxed)
                done.leave()
            }
            thread.stackSize = 1 << 20
            thread.start()
        }
        // Wait for the threads and time them from a thread of its own too (never block the cooperative pool).
        return await DedicatedThread.run { () -> Double in
            for _ in 0..<count { ready.wait() }
            let start = DispatchTime.now().uptimeNanoseconds
            for _ in 0..<count { go.signal() }
            done.wait()
            return Double(DispatchTime.now().uptimeNanoseconds - start)
        }.value
    }

    /// Waits `duration` without holding a thread: a continuation resumed by Dispatch's timer.
    static func sleep(_ duration: Duration) async {
        let nanoseconds = Int(duration.components.seconds) * 1_000_000_000 + Int(duration.components.attoseconds / 1_000_000_000)
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(nanoseconds)) { continuation.resume() }
        }
    }

    static func writeFile(path: String, size: Int) throws {
        let descriptor = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
        guard descriptor >= 0 else { throw ToolError("open \(path): \(String(cString: strerror(errno)))") }
        defer { close(descriptor) }
        let chunk = 1 << 20
        var block = [UInt8](repeating: 0, count: chunk)
        for index in block.indices { block[index] = UInt8(truncatingIfNeeded: index &* 31 &+ 7) }
        var written = 0
        while written < size {
            let count = block.withUnsafeBytes { write(descriptor, $0.baseAddress!, min(chunk, size - written)) }
            if count < 0 {
                if errno == EINTR { continue }
                throw ToolError("write \(path): \(String(cString: strerror(errno)))")
            }
            written += count
        }
    }

    // MARK: - Output

    static func table(_ rows: [Row]) -> String {
        let header = ["id", "workload", "library", "reference", "ratio", "goal", "met?"]
        let cells = rows.map { row in
            [row.id, row.workload, row.library, row.reference, row.ratio.map { String(format: "%.2f×", $0) } ?? "—", row.goal,
             row.met.map { $0 ? "yes" : "no" } ?? "—"]
        }
        let widths = header.indices.map { column in
            ([header] + cells).map { $0[column].count }.max() ?? 0
        }
        func line(_ values: [String]) -> String {
            "| " + values.enumerated().map { $0.element.padding(toLength: widths[$0.offset], withPad: " ", startingAt: 0) }
                .joined(separator: " | ") + " |"
        }
        let separator = "|" + widths.map { String(repeating: "-", count: $0 + 2) }.joined(separator: "|") + "|"
        return ([line(header), separator] + cells.map(line)).joined(separator: "\n")
    }

    private func progress(_ text: String) {
        guard showProgress else { return }
        if isatty(STDERR_FILENO) == 1 {
            writeError("\r\u{1B}[K" + text + "…")
        } else {
            writeError(text + "…\n")
        }
    }

    private func clearProgress() {
        if showProgress, isatty(STDERR_FILENO) == 1 { writeError("\r\u{1B}[K") }
    }

    private func kiPages(_ pages: Int) -> String { pages % 1024 == 0 ? "\(pages / 1024) Ki" : "\(pages)" }
    private func format(nsPerPage: Double) -> String { String(format: "%.1f µs/page", nsPerPage / 1e3) }
    private func format(mbps: Double) -> String { String(format: "%.0f MB/s", mbps) }
    private func format(seconds: Double) -> String { String(format: "%.1f s", seconds) }
    private func seconds(_ duration: Duration) -> Double {
        Double(duration.components.seconds) + Double(duration.components.attoseconds) / 1e18
    }
}

/// The process's resident set and page tables, from /proc/self/status.
struct ProcessMemory {
    var residentBytes: Int
    var pageTableBytes: Int

    static func read() -> ProcessMemory {
        guard let text = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8) else {
            return ProcessMemory(residentBytes: 0, pageTableBytes: 0)
        }
        func kilobytes(_ key: String) -> Int {
            for line in text.split(separator: "\n") where line.hasPrefix(key + ":") {
                let digits = line.dropFirst(key.count + 1).filter(\.isNumber)
                return (Int(String(digits)) ?? 0) * 1024
            }
            return 0
        }
        return ProcessMemory(residentBytes: kilobytes("VmRSS"), pageTableBytes: kilobytes("VmPTE"))
    }
}

/// A small deterministic generator (SplitMix64), so every run touches the same "random" pages.
struct SplitMix64: RandomNumberGenerator {
    private var state: UInt64
    init(seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}
