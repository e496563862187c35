import CUserfaultfdBaseline
import Foundation
import Glibc
import Userfaultfd
import UserfaultfdBenchSupport

/// P1 of `uffd bench`: the one-page round trip.
struct RoundTripBench: BenchGroup {
    let id = "P1"
    let title = "the one-page round trip"

    func run(in bench: BenchCommand) async throws -> BenchGroupResult {
        let pages = bench.quick ? 4096 : 16384
        let pageSize = systemPageSize
        bench.progress("P1: warming up")
        _ = try await bench.touchLazyRegion(pages: 256, provider: MemoryProvider(repeatElement(0x5A, count: 256 * pageSize)),
                                           readahead: .none, workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        _ = try await BenchCommand.cReference(pages: 256, perCopy: 1, workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)

        bench.progress("P1: library, \(pages) pages, one page per fault")
        let provider = MemoryProvider(repeatElement(0x5A, count: pages * pageSize))
        let library = try await bench.touchLazyRegion(pages: pages, provider: provider, readahead: .none,
                                                     workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        bench.progress("P1: C poll loop, \(pages) pages, one page per COPY")
        let reference = try await BenchCommand.cReference(pages: pages, perCopy: 1, workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)

        let latency = library.statistics.latency
        let rows = [
            BenchCommand.Row(id: "P1", workload: "\(bench.kiPages(pages)) pages touched once, 1 thread, MemoryProvider, readahead none, polling \(bench.pollingLabel)",
                library: bench.format(nsPerPage: library.nsPerPage), reference: "C poll loop 1 page/COPY: " + bench.format(nsPerPage: reference.ns_per_page),
                ratio: reference.ns_per_page / library.nsPerPage, goal: "round trip ≤ 1.10× C (≥ 0.91×)",
                met: reference.ns_per_page / library.nsPerPage >= 1 / 1.10),
            BenchCommand.Row(id: "L1", workload: "fault-to-wake latency p50 / p99 (P1, statistics.latency)",
                library: "\(LatencyHistogram.format(latency.percentile(50))) / \(LatencyHistogram.format(latency.percentile(99)))",
                reference: "—", ratio: nil, goal: "—", met: nil),
        ]
        return BenchGroupResult(rows: rows, details: [
            "P1 library: \(library.statistics)",
            "P1 C: faults \(reference.faults), copies \(reference.copies), already present \(reference.already_present)",
        ])
    }
}
