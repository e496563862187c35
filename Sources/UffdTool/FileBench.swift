import CUserfaultfdBaseline
import Foundation
import Glibc
import Userfaultfd
import UserfaultfdBenchSupport

/// P4 of `uffd bench`: a file through FileProvider.
struct FileBench: BenchGroup {
    let id = "P4"
    let title = "a file through FileProvider"

    func run(in bench: BenchCommand) async throws -> BenchGroupResult {
        let size = bench.quick ? 64 << 20 : 256 << 20
        let pages = size / systemPageSize
        bench.progress("P4: writing a \(size >> 20) MiB file")
        let path = NSTemporaryDirectory() + "uffd-bench-\(getpid()).dat"
        try PatternFile.write(path: path, size: size)
        defer { unlink(path) }

        bench.progress("P4: library, FileProvider, default readahead, \(size >> 20) MiB")
        let library = try await bench.touchLazyRegion(pages: pages, provider: try FileProvider(path: path), readahead: .default,
                                                     workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        bench.progress("P4: plain anonymous first touch, \(size >> 20) MiB")
        let reference = await DedicatedThread.run { () -> BenchCommand.CRun in
            var result = cbaseline_result()
            _ = cbaseline_anonymous_first_touch(pages, 1, &result)
            return BenchCommand.CRun(result)
        }.value
        try reference.check("anonymous first touch")

        // MINOR: a first shared-memory region fills a memfd's page cache from the file (MISSING faults, then
        // CONTINUE); a second region over the same memfd — a second VM restoring the same snapshot — then only maps
        // those pages (MINOR faults + CONTINUE). Its reference is mmap(2) of the same memfd, the kernel mapping the
        // same pages by itself.
        bench.progress("P4m: shared-memory LazyRegion filling a memfd from the file (MISSING + CONTINUE), \(size >> 20) MiB")
        let first = try await LazyRegion(length: size, provider: try FileProvider(path: path), options: bench.options(), backing: .sharedMemory)
        let firstTouch = await BenchCommand.touch(first, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        let firstStatistics = first.statistics
        guard let memfd = first.sharedFile else { throw ToolError("a shared-memory LazyRegion without its file") }
        await first.close()
        bench.progress("P4m: a second shared-memory LazyRegion over the filled memfd (MINOR + CONTINUE), \(size >> 20) MiB")
        let second = try await LazyRegion(length: size, provider: ZeroProvider(), options: bench.options(), backing: .sharedMemory,
                                          sharedFile: memfd)
        let minorTouch = await BenchCommand.touch(second, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        let minorStatistics = second.statistics
        await second.close()
        bench.progress("P4m: mmap(2) of the same memfd, \(size >> 20) MiB")
        let view = try memfd.map()
        let viewBase = view.address
        let mapped = await BenchCommand.onThreads(1) { _ in
            cbaseline_touch_region(UnsafeRawPointer(bitPattern: viewBase), size, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        }
        view.unmap()

        let libraryRate = Double(size) / library.nanoseconds * 1e3
        let referenceRate = Double(size) / reference.nanoseconds * 1e3
        let firstRate = Double(size) / firstTouch * 1e3
        let minorRate = Double(size) / minorTouch * 1e3
        let mappedRate = Double(size) / mapped * 1e3
        let rows = [
            BenchCommand.Row(id: "P4", workload: "\(size >> 20) MiB file (page cache) read in order via FileProvider, 1 byte/page, default readahead",
                library: bench.format(mbps: libraryRate), reference: "anonymous first touch (write): " + bench.format(mbps: referenceRate),
                ratio: libraryRate / referenceRate, goal: "≥ 0.80×", met: libraryRate / referenceRate >= 0.8),
            BenchCommand.Row(id: "P4m", workload: "a memfd holding the data, mapped by a shared-memory LazyRegion: MINOR faults + CONTINUE",
                library: bench.format(mbps: minorRate), reference: "mmap(2) of the memfd: " + bench.format(mbps: mappedRate),
                ratio: minorRate / mappedRate, goal: "≥ 0.50×", met: minorRate / mappedRate >= 0.5),
            BenchCommand.Row(id: "P4s", workload: "filling that memfd from the file: shared-memory LazyRegion (MISSING, page cache + CONTINUE)",
                library: bench.format(mbps: firstRate), reference: "COPY (P4): " + bench.format(mbps: libraryRate),
                ratio: firstRate / libraryRate, goal: "—", met: nil),
        ]
        return BenchGroupResult(rows: rows, details: ["P4 library: \(library.statistics)", "P4s library: \(firstStatistics)", "P4m library: \(minorStatistics)"])
    }
}
