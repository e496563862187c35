import CUserfaultfdBaseline
import Foundation
import Glibc
import Userfaultfd
import UserfaultfdBenchSupport

/// P5 of `uffd bench`: a huge sparse region.
struct SparseRegionBench: BenchGroup {
    let id = "P5"
    let title = "a huge sparse region"

    func run(in bench: BenchCommand) async throws -> BenchGroupResult {
        let length = bench.quick ? 16 << 30 : 64 << 30
        let touches = bench.quick ? 25_000 : 100_000
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

        bench.progress("P5: library, \(length >> 30) GiB region, \(touches) random pages")
        let before = ProcessMemory.read()
        let region = try await LazyRegion(length: length, provider: provider, options: bench.options(readahead: .none))
        let base = UInt(bitPattern: region.baseAddress)
        let elapsed = await BenchCommand.onThreads(1) { _ in
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
            BenchCommand.Row(id: "P5", workload: "\(length >> 30) GiB sparse LazyRegion, \(touches / 1000) k random pages touched, readahead none",
                library: String(format: "%.1f MiB RSS beyond the pages", mib),
                reference: String(format: "touched pages %.1f MiB", Double(touched) / Double(1 << 20)), ratio: nil,
                goal: "≤ 32 MiB", met: mib <= goal),
        ]
        return BenchGroupResult(rows: rows, details: [
            String(format: "P5 RSS %.1f → %.1f MiB; page tables (VmPTE, not in RSS) %.1f → %.1f MiB; %.1f µs/fault",
                   Double(before.residentBytes) / 1048576, Double(after.residentBytes) / 1048576,
                   Double(before.pageTableBytes) / 1048576, Double(after.pageTableBytes) / 1048576,
                   elapsed / Double(touches) / 1e3),
            "P5 library: \(statistics)",
        ])
    }
}
