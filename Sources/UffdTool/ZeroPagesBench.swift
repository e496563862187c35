import CUserfaultfdBaseline
import Foundation
import Glibc
import Userfaultfd
import UserfaultfdBenchSupport

/// P2 of `uffd bench`: reading every byte of zero pages.
struct ZeroPagesBench: BenchGroup {
    let id = "P2"
    let title = "reading every byte of zero pages"

    func run(in bench: BenchCommand) async throws -> BenchGroupResult {
        let pages = bench.quick ? 8192 : 65536
        let bytes = Double(pages * systemPageSize)
        let workload = CBASELINE_READ_EVERY_BYTE
        bench.progress("P2a: library, ZeroProvider, readahead none, \(pages) pages")
        let none = try await bench.touchLazyRegion(pages: pages, provider: ZeroProvider(), readahead: .none, workload: workload)
        bench.progress("P2b: library, ZeroProvider, default readahead, \(pages) pages")
        let adaptive = try await bench.touchLazyRegion(pages: pages, provider: ZeroProvider(), readahead: .default, workload: workload)
        var references: [Int: BenchCommand.CRun] = [:]
        for perCopy in [1, 16, 64] {
            bench.progress("P2: C poll loop, \(perCopy) page(s) per COPY, \(pages) pages")
            references[perCopy] = try await BenchCommand.cReference(pages: pages, perCopy: perCopy, workload: workload, fill: 0)
        }
        func rate(_ ns: Double) -> Double { bytes / ns * 1e3 }  // MB/s
        let c1 = references[1]!, c16 = references[16]!, c64 = references[64]!
        let what = "\(bench.kiPages(pages)) pages, ZeroProvider, every byte read, polling \(bench.pollingLabel)"
        let rows = [
            BenchCommand.Row(id: "P2a", workload: what + ", readahead none", library: bench.format(mbps: rate(none.nanoseconds)),
                reference: "C 1 page/COPY: " + bench.format(mbps: rate(c1.nanoseconds)), ratio: c1.nanoseconds / none.nanoseconds,
                goal: "≥ 1.00×", met: c1.nanoseconds / none.nanoseconds >= 1),
            BenchCommand.Row(id: "P2b", workload: what + ", default readahead", library: bench.format(mbps: rate(adaptive.nanoseconds)),
                reference: "C 1 page/COPY: " + bench.format(mbps: rate(c1.nanoseconds)), ratio: c1.nanoseconds / adaptive.nanoseconds,
                goal: "≥ 25×", met: c1.nanoseconds / adaptive.nanoseconds >= 25),
            BenchCommand.Row(id: "P2c", workload: what + ", default readahead", library: bench.format(mbps: rate(adaptive.nanoseconds)),
                reference: "C 16 pages/COPY: " + bench.format(mbps: rate(c16.nanoseconds)), ratio: c16.nanoseconds / adaptive.nanoseconds,
                goal: "—", met: nil),
            BenchCommand.Row(id: "P2d", workload: what + ", default readahead", library: bench.format(mbps: rate(adaptive.nanoseconds)),
                reference: "C 64 pages/COPY: " + bench.format(mbps: rate(c64.nanoseconds)), ratio: c64.nanoseconds / adaptive.nanoseconds,
                goal: "—", met: nil),
        ]
        let latency = none.statistics.latency
        return BenchGroupResult(rows: rows, details: [
            "P2a library: \(none.statistics)",
            "P2b library: \(adaptive.statistics)",
            "P2 C: faults/copies 1 page \(c1.faults)/\(c1.copies), 16 pages \(c16.faults)/\(c16.copies), 64 pages \(c64.faults)/\(c64.copies)",
            "P2a fault-to-wake p50 \(LatencyHistogram.format(latency.percentile(50))) p99 \(LatencyHistogram.format(latency.percentile(99)))",
        ])
    }
}
