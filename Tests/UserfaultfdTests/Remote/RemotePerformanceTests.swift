import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import Userfaultfd
import UserfaultfdHTTP

/// A measurement, not a speed goal (those live with the benchmarks): faults resolved per second over a server that adds
/// 2 ms to every request, with 8 faulting threads on a 64 MiB object in 64 KiB blocks. The goal to compare with is
/// 0.8 × (8 requests in flight / 2 ms) = 3200 faults/s. Prints the figure; asserts only that the data is right.
@Suite("Remote: throughput measurement", .enabled(if: !remoteTestsSkipped, "UFFD_SKIP_REMOTE_TESTS=1"))
struct RemotePerformanceTests {
    @Test("faults per second with 2 ms per request and 8 faulting threads", .timeLimit(.minutes(1)))
    func faultsPerSecond() async throws {
        let size = 64 << 20, block = 64 << 10, threads = 8
        let latency = Int(ProcessInfo.processInfo.environment["UFFD_REMOTE_PERF_LATENCY_MS"] ?? "") ?? 2
        try await withRangeServer(size: size) { server in
            let provider = try await HTTPRangeProvider.open(url: URL(string: server.baseURL + "/perf?latency_ms=\(latency)")!,
                                                            options: .init(blockSize: block, maxConcurrentRequests: 8))
            try await withRemoteRegion(provider, failurePolicy: .zeroFill, readahead: .adaptive(maximum: block)) { region in
                let base = UInt(bitPattern: region.baseAddress)
                // Every block once, in random order, dealt to the threads: each touch is a fault that needs a request.
                let blocks = Array(0..<(size / block)).shuffled()
                let started = ContinuousClock.now
                let cpuBefore = processCPUSeconds(), serverCPUBefore = childCPUSeconds(server.process.processIdentifier)
                let workers = (0..<threads).map { index in
                    let mine = stride(from: index, to: blocks.count, by: threads).map { blocks[$0] }
                    return OffPoolThread(name: "uffd-remote-perf") { () -> Int in
                        var mismatches = 0
                        for block in mine {
                            let offset = block * 64 * 1024 + (block % 16) * 4096 + 7
                            if cuffd_test_read_byte(UnsafeRawPointer(bitPattern: base + UInt(offset))) != server.data[offset] {
                                mismatches += 1
                            }
                        }
                        return mismatches
                    }
                }
                var mismatches = 0
                for worker in workers { mismatches += await worker.value }
                let elapsed = ContinuousClock.now - started
                let cpu = processCPUSeconds() - cpuBefore
                let serverCPU = childCPUSeconds(server.process.processIdentifier) - serverCPUBefore
                let statistics = region.statistics
                let rate = Double(statistics.faults) / elapsed.asSeconds
                print("""
                    remote throughput: \(statistics.faults) faults in \(elapsed) = \(Int(rate)) faults/s \
                    (goal ≥ 3200/s with 2 ms per request; this run \(latency) ms, 8 threads, \(block >> 10) KiB blocks); \
                    p50 \(LatencyHistogram.format(statistics.latency.percentile(50))) \
                    p99 \(LatencyHistogram.format(statistics.latency.percentile(99)))
                    remote throughput: CPU per fault: this process \(Int(cpu / Double(statistics.faults) * 1e6)) µs, \
                    server \(Int(serverCPU / Double(statistics.faults) * 1e6)) µs; load average \(loadAverage())
                    remote throughput: http \(provider.statistics)
                    """)
                if let stats = try? await server.stats() {
                    print("remote throughput: server: \(stats.connections) connections, peak \(stats.peak) requests in flight")
                }
                #expect(mismatches == 0)
                #expect(statistics.faults >= blocks.count)
            }
        }
    }
}

/// User + system CPU time of this process, in seconds.
func processCPUSeconds() -> Double {
    var usage = rusage()
    getrusage(RUSAGE_SELF.rawValue, &usage)
    return Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6
}

/// User + system CPU time of process `pid` (from /proc), in seconds.
func childCPUSeconds(_ pid: Int32) -> Double {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8),
          let close = text.lastIndex(of: ")") else { return 0 }
    let fields = text[text.index(after: close)...].split(separator: " ")
    // After the command: state is field 3, utime 14 and stime 15 (1-based over the whole line).
    guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return 0 }
    return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
}

/// The 1-minute load average.
func loadAverage() -> String {
    (try? String(contentsOfFile: "/proc/loadavg", encoding: .utf8))?.split(separator: " ").first.map(String.init) ?? "?"
}
