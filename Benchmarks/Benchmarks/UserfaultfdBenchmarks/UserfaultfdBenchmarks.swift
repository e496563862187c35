// The benchmarks of swift-userfaultfd (P1–P5 of the "Benchmarks" issue), each next to its C reference: userfaultfd(2)'s
// example handler (poll → read up to 64 messages → UFFDIO_COPY) from the CUserfaultfdBaseline target of the main package.
//
// Per-fault benchmarks use `.kilo` scaling: one iteration faults 1000 pages, and every metric (time, mallocs) is shown
// per fault. All faulting happens on threads made in setup (``Workers``), never on Swift's cooperative pool.

import Benchmark
import CUserfaultfdBaseline
import Foundation
import Synchronization
import Userfaultfd
import UserfaultfdBenchSupport

let pageSize = Int(cbaseline_page_size())
let perFaultIterations = 30
let perFaultWarmup = 1

let perFaultMetrics: [BenchmarkMetric] = [
    .wallClock, .throughput, .mallocCountTotal, .mallocBytesCount, .contextSwitches,
]

let latencyP50 = BenchmarkMetric.custom("fault-to-wake p50 (ns)", polarity: .prefersSmaller, useScalingFactor: false)
let latencyP99 = BenchmarkMetric.custom("fault-to-wake p99 (ns)", polarity: .prefersSmaller, useScalingFactor: false)

/// A LazyRegion with room for every iteration, and one thread that touches the next `pagesPerRun` pages each run.
final class RegionFixture: Sendable {
    let region: LazyRegion
    let workers: Workers
    let cursor: Counter

    init(pages: Int, pagesPerRun: Int, provider: any PageProvider, readahead: ReadaheadPolicy,
         workload: cbaseline_workload) async throws {
        let region = try await LazyRegion(length: pages * pageSize, provider: provider, options: .init(readahead: readahead))
        let base = UInt(bitPattern: region.baseAddress)
        let cursor = Counter()
        self.region = region
        self.cursor = cursor
        self.workers = Workers { _ in
            let first = cursor.load()
            guard first + pagesPerRun <= pages else { return }  // out of fresh pages: nothing left to fault
            touch(base + UInt(first * pageSize), pagesPerRun * pageSize, workload)
            cursor.store(first + pagesPerRun)
        }
    }

    func tearDown() async {
        workers.shutdown()
        await region.close()
    }

    /// One measured run, then the latency so far.
    func measure(_ benchmark: Benchmark) {
        benchmark.startMeasurement()
        workers.run()
        benchmark.stopMeasurement()
        let latency = region.statistics.latency
        benchmark.measurement(latencyP50, Int(latency.percentile(50)))
        benchmark.measurement(latencyP99, Int(latency.percentile(99)))
    }
}

/// A per-fault benchmark of the library: 1000 pages per iteration from a region made in setup.
func libraryPerFault(_ name: String, provider: @escaping @Sendable () -> any PageProvider, readahead: ReadaheadPolicy,
                     workload: cbaseline_workload) {
    let pagesPerRun = BenchmarkScalingFactor.kilo.rawValue
    let pages = (perFaultIterations + perFaultWarmup + 2) * pagesPerRun
    nonisolated(unsafe) var fixture: RegionFixture?
    Benchmark(
        name,
        configuration: .init(metrics: perFaultMetrics + [latencyP50, latencyP99], warmupIterations: perFaultWarmup,
                             scalingFactor: .kilo, maxDuration: .seconds(10), maxIterations: perFaultIterations)
    ) { benchmark in
        fixture?.measure(benchmark)
    } setup: {
        fixture = try await RegionFixture(pages: pages, pagesPerRun: pagesPerRun, provider: provider(),
                                          readahead: readahead, workload: workload)
    } teardown: {
        await fixture?.tearDown()
        fixture = nil
    }
}

/// The same run by the C reference: `cbaseline_touch_pages` (map, register, handler thread, touch 1000 pages, tear down).
func cPerFault(_ name: String, pagesPerCopy: Int, workload: cbaseline_workload, fill: UInt8) {
    let pagesPerRun = BenchmarkScalingFactor.kilo.rawValue
    nonisolated(unsafe) var workers: Workers?
    Benchmark(
        name,
        configuration: .init(metrics: perFaultMetrics, warmupIterations: perFaultWarmup, scalingFactor: .kilo,
                             maxDuration: .seconds(10), maxIterations: perFaultIterations)
    ) { _ in
        workers?.run()
    } setup: {
        workers = Workers { _ in
            var result = cbaseline_result()
            if cbaseline_touch_pages(pagesPerRun, pagesPerCopy, workload, fill, &result) < 0 {
                fatalError("C reference failed at \(String(cString: result.failed_step)): errno \(result.error)")
            }
            blackHoleSum.wrappingAdd(result.checksum, ordering: .relaxed)
        }
    } teardown: {
        workers?.shutdown()
        workers = nil
    }
}

let benchmarks: @Sendable () -> Void = {
    // P1: 16 Ki pages touched once by one thread, one page per fault, data from memory.
    libraryPerFault("P1 library: MemoryProvider, readahead none, 1 byte/page (per fault)",
                    provider: { MemoryProvider(repeatElement(0x5A, count: 16384 * pageSize)) },
                    readahead: .none, workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
    cPerFault("P1 C poll loop: 1 page/COPY, 1 byte/page (per fault)", pagesPerCopy: 1,
              workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE, fill: 0x5A)

    // P2: zero pages, every byte read.
    libraryPerFault("P2 library: ZeroProvider, readahead none, every byte (per page)", provider: { ZeroProvider() },
                    readahead: .none, workload: CBASELINE_READ_EVERY_BYTE)
    libraryPerFault("P2 library: ZeroProvider, default readahead, every byte (per page)", provider: { ZeroProvider() },
                    readahead: .default, workload: CBASELINE_READ_EVERY_BYTE)
    for pagesPerCopy in [1, 16, 64] {
        cPerFault("P2 C poll loop: \(pagesPerCopy) page(s)/COPY, every byte (per page)", pagesPerCopy: pagesPerCopy,
                  workload: CBASELINE_READ_EVERY_BYTE, fill: 0)
    }

    // P3: 8 faulting threads, a provider that awaits 2 ms per read. Goal: ≥ 0.8 × 4000 faults/s.
    let p3Threads = 8
    let p3FaultsPerThread = 50
    let faultsPerSecond = BenchmarkMetric.custom("faults/s", polarity: .prefersLarger, useScalingFactor: false)
    nonisolated(unsafe) var p3: RegionFixture?
    nonisolated(unsafe) var p3Workers: Workers?
    Benchmark(
        "P3 library: 8 threads, provider awaits 2 ms (400 faults)",
        configuration: .init(metrics: [.wallClock, .mallocCountTotal, faultsPerSecond, latencyP50, latencyP99],
                             warmupIterations: 1, scalingFactor: .one, maxDuration: .seconds(5), maxIterations: 10)
    ) { benchmark in
        guard let p3Workers, let p3 else { return }
        let before = p3.region.statistics.faults
        let start = DispatchTime.now().uptimeNanoseconds
        p3Workers.run()
        let elapsed = DispatchTime.now().uptimeNanoseconds - start
        benchmark.stopMeasurement()
        let faults = p3.region.statistics.faults - before
        benchmark.measurement(faultsPerSecond, Int(Double(faults) / (Double(elapsed) / 1e9)))
        let latency = p3.region.statistics.latency
        benchmark.measurement(latencyP50, Int(latency.percentile(50)))
        benchmark.measurement(latencyP99, Int(latency.percentile(99)))
    } setup: {
        let runs = 12
        let pages = runs * p3Threads * p3FaultsPerThread
        let provider = ClosureProvider { buffer, offset in
            await dispatchSleep(.milliseconds(2))
            buffer.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(offset), as: UInt64.self) }
            return .bytes(8)
        }
        let fixture = try await RegionFixture(pages: pages, pagesPerRun: 0, provider: provider, readahead: .none,
                                              workload: CBASELINE_TOUCH_ONE_BYTE_PER_PAGE)
        let base = UInt(bitPattern: fixture.region.baseAddress)
        let run = Counter()
        let finished = Counter()
        p3 = fixture
        // Run r, thread t: pages r·400 + t, + 8, + 16...: each touch is a fault of its own.
        p3Workers = Workers(count: p3Threads) { thread in
            let current = run.load()
            guard current < runs else { return }
            var sum: UInt64 = 0
            for index in 0..<p3FaultsPerThread {
                let page = current * p3Threads * p3FaultsPerThread + index * p3Threads + thread
                sum &+= UInt64(UnsafePointer<UInt8>(bitPattern: base + UInt(page * pageSize))!.pointee)
            }
            blackHoleSum.wrappingAdd(sum, ordering: .relaxed)
            if finished.add(1) % p3Threads == 0 { run.add(1) }
        }
    } teardown: {
        p3Workers?.shutdown()
        p3Workers = nil
        await p3?.tearDown()
        p3 = nil
    }

    // P4: a 256 MiB file in the page cache through FileProvider, in order, vs plain anonymous first touch.
    let p4Size = 256 << 20
    let p4Path = NSTemporaryDirectory() + "uffd-benchmarks-\(getpid()).dat"
    let megabytesPerSecond = BenchmarkMetric.custom("MB/s", polarity: .prefersLarger, useScalingFactor: false)
    Benchmark(
        "P4 library: 256 MiB file via FileProvider, default readahead, 1 byte/page",
        configuration: .init(metrics: [.wallClock, .mallocCountTotal, megabytesPerSecond], warmupIterations: 1,
                             scalingFactor: .one, maxDuration: .seconds(5), maxIterations: 5)
    ) { benchmark in
        do {
            let region = try await LazyRegion(length: p4Size, provider: try FileProvider(path: p4Path))
            let base = UInt(bitPattern: region.baseAddress)
            let workers = Workers { _ in touch(base, p4Size, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE) }
            let start = DispatchTime.now().uptimeNanoseconds
            benchmark.startMeasurement()
            workers.run()
            benchmark.stopMeasurement()
            let elapsed = DispatchTime.now().uptimeNanoseconds - start
            workers.shutdown()
            await region.close()
            benchmark.measurement(megabytesPerSecond, Int(Double(p4Size) / Double(elapsed) * 1e3))
        } catch {
            benchmark.error("P4: \(error)")
        }
    } setup: {
        try PatternFile.write(path: p4Path, size: p4Size)
    } teardown: {
        unlink(p4Path)
    }
    nonisolated(unsafe) var p4Reference: Workers?
    let p4ReferenceRate = Counter()
    Benchmark(
        "P4 reference: 256 MiB anonymous first touch (write), 1 byte/page",
        configuration: .init(metrics: [.wallClock, megabytesPerSecond], warmupIterations: 1, scalingFactor: .one,
                             maxDuration: .seconds(5), maxIterations: 5)
    ) { benchmark in
        p4Reference?.run()
        benchmark.stopMeasurement()
        benchmark.measurement(megabytesPerSecond, p4ReferenceRate.load())
    } setup: {
        p4Reference = Workers { _ in
            var result = cbaseline_result()
            _ = cbaseline_anonymous_first_touch(p4Size / pageSize, 1, &result)
            p4ReferenceRate.store(Int(Double(p4Size) / result.nanoseconds * 1e3))
        }
    } teardown: {
        p4Reference?.shutdown()
        p4Reference = nil
    }

    // P4m: a memfd holding 256 MiB (a snapshot another VM already restored), mapped by a shared-memory LazyRegion over
    // it — MINOR faults + UFFDIO_CONTINUE, a readahead window per fault — vs mmap(2) of the same memfd.
    nonisolated(unsafe) var p4Memfd: SharedMemoryFile?
    func touchMemfd(_ benchmark: Benchmark, through map: (SharedMemoryFile) async throws -> (UInt, () async -> Void)) async {
        guard let memfd = p4Memfd else { return benchmark.error("P4m: no memfd") }
        let mapped: (UInt, () async -> Void)
        do {
            mapped = try await map(memfd)
        } catch {
            return benchmark.error("P4m: \(error)")
        }
        let (base, release) = mapped
        let workers = Workers { _ in touch(base, p4Size, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE) }
        let start = DispatchTime.now().uptimeNanoseconds
        benchmark.startMeasurement()
        workers.run()
        benchmark.stopMeasurement()
        let elapsed = DispatchTime.now().uptimeNanoseconds - start
        workers.shutdown()
        await release()
        benchmark.measurement(megabytesPerSecond, Int(Double(p4Size) / Double(elapsed) * 1e3))
    }
    func fillMemfd() throws {
        let memfd = try SharedMemoryFile(length: p4Size, name: "uffd-benchmarks-p4m")
        let view = try memfd.map()
        memset(UnsafeMutableRawPointer(bitPattern: view.address)!, 0x5a, p4Size)
        view.unmap()
        p4Memfd = memfd
    }
    let p4mConfiguration = Benchmark.Configuration(
        metrics: [.wallClock, .mallocCountTotal, megabytesPerSecond], warmupIterations: 1, scalingFactor: .one,
        maxDuration: .seconds(5), maxIterations: 5)
    Benchmark("P4m library: 256 MiB memfd via a shared-memory LazyRegion (MINOR + CONTINUE), 1 byte/page",
              configuration: p4mConfiguration) { benchmark in
        await touchMemfd(benchmark) { memfd in
            let region = try await LazyRegion(length: p4Size, provider: ZeroProvider(), backing: .sharedMemory, sharedFile: memfd)
            return (UInt(bitPattern: region.baseAddress), { await region.close() })
        }
    } setup: {
        try fillMemfd()
    } teardown: {
        p4Memfd = nil
    }
    Benchmark("P4m reference: mmap(2) of the same 256 MiB memfd, 1 byte/page", configuration: p4mConfiguration) { benchmark in
        await touchMemfd(benchmark) { memfd in
            let view = try memfd.map()
            return (view.address, { view.unmap() })
        }
    } setup: {
        try fillMemfd()
    } teardown: {
        p4Memfd = nil
    }

    // P5: 64 GiB sparse region, 100 k random pages; the resident memory the library adds beyond those pages.
    let rssBeyond = BenchmarkMetric.custom("RSS beyond touched pages (KiB)", polarity: .prefersSmaller, useScalingFactor: false)
    let pageTables = BenchmarkMetric.custom("page tables VmPTE growth (KiB)", polarity: .prefersSmaller, useScalingFactor: false)
    Benchmark(
        "P5 library: 64 GiB sparse LazyRegion, 100 k random pages (goal ≤ 32 MiB beyond)",
        configuration: .init(metrics: [.wallClock, .mallocCountTotal, rssBeyond, pageTables], warmupIterations: 0,
                             scalingFactor: .one, maxDuration: .seconds(30), maxIterations: 1)
    ) { benchmark in
        let length = 64 << 30
        let touches = 100_000
        // The same pages as `uffd bench`'s P5: distinct, seeded, chosen before the first RSS reading.
        var random = SplitMix64(seed: 0x5EED)
        var chosen = Set<Int>(minimumCapacity: touches)
        while chosen.count < touches { chosen.insert(Int(random.next() % UInt64(length / pageSize))) }
        var order = Array(chosen)
        order.shuffle(using: &random)
        let pages = order
        let provider = ClosureProvider(immediate: { buffer, offset in
            buffer.withUnsafeMutableBytes { $0.storeBytes(of: UInt64(offset) | 1, as: UInt64.self) }
            return .bytes(8)
        })
        do {
            let before = ProcessMemory.read()
            let region = try await LazyRegion(length: length, provider: provider, options: .init(readahead: .none))
            let base = UInt(bitPattern: region.baseAddress)
            let workers = Workers { _ in
                var sum: UInt64 = 0
                for page in pages { sum &+= UInt64(UnsafePointer<UInt8>(bitPattern: base + UInt(page * pageSize))!.pointee) }
                blackHoleSum.wrappingAdd(sum, ordering: .relaxed)
            }
            benchmark.startMeasurement()
            workers.run()
            benchmark.stopMeasurement()
            let after = ProcessMemory.read()
            workers.shutdown()
            await region.close()
            benchmark.measurement(rssBeyond, (after.residentBytes - before.residentBytes - touches * pageSize) / 1024)
            benchmark.measurement(pageTables, (after.pageTableBytes - before.pageTableBytes) / 1024)
        } catch {
            benchmark.error("P5: \(error)")
        }
    }
}
