import CUserfaultfdBaseline
import Dispatch
import Foundation
import Synchronization
import Userfaultfd

// The workloads and references the groups share.
extension BenchCommand {
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

    // MARK: - Workloads

    struct LibraryRun: Sendable {
        var nanoseconds: Double
        var nsPerPage: Double
        var statistics: FaultResolver.Statistics
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
}
