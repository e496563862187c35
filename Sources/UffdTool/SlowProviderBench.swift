import CUserfaultfdBaseline
import Foundation
import Glibc
import Userfaultfd
import UserfaultfdBenchSupport

/// P3 of `uffd bench`: 8 threads against a slow provider.
struct SlowProviderBench: BenchGroup {
    let id = "P3"
    let title = "8 threads against a slow provider"

    func run(in bench: BenchCommand) async throws -> BenchGroupResult {
        let threads = 8
        let delay = Duration.milliseconds(2)
        let faultsPerThread = bench.quick ? 100 : 500
        let pages = threads * faultsPerThread
        let provider = ClosureProvider { buffer, offset in
            await dispatchSleep(delay)
            buffer.withUnsafeMutableBytes { bytes in bytes.storeBytes(of: UInt64(offset), as: UInt64.self) }
            return .bytes(8)
        }
        bench.progress("P3: library, \(threads) threads, provider awaits 2 ms, \(pages) faults")
        let region = try await LazyRegion(length: pages * systemPageSize, provider: provider, options: bench.options(readahead: .none))
        let base = UInt(bitPattern: region.baseAddress)
        let pageSize = systemPageSize
        let elapsed = await BenchCommand.onThreads(threads) { thread in
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
            BenchCommand.Row(id: "P3", workload: "\(threads) threads fault \(pages) pages, provider awaits 2 ms per read (asyncAfter), readahead none",
                library: String(format: "%.0f faults/s", faultsPerSecond),
                reference: String(format: "ideal %.0f faults/s (8 ÷ 2 ms)", ideal), ratio: faultsPerSecond / ideal,
                goal: "≥ 0.80× (3200/s)", met: faultsPerSecond >= 0.8 * ideal),
            BenchCommand.Row(id: "L3", workload: "fault-to-wake latency p50 / p99 (P3, includes the 2 ms read)",
                library: "\(LatencyHistogram.format(latency.percentile(50))) / \(LatencyHistogram.format(latency.percentile(99)))",
                reference: "2.0 ms", ratio: nil, goal: "—", met: nil),
        ]
        return BenchGroupResult(rows: rows, details: ["P3 library: \(statistics)"])
    }
}
