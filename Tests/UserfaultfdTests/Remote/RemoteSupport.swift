import CUserfaultfdTestSupport
import Foundation
import Glibc
import Testing
import Userfaultfd
import UserfaultfdHTTP

/// Runs `body` with a ``LazyRegion`` over `provider` under a fault watchdog: if the test overruns `seconds`, the region's
/// userfaultfd is closed (every blocked thread wakes) and an issue is recorded.
func withRemoteRegion(
    _ provider: HTTPRangeProvider,
    failurePolicy: FailurePolicy = .default,
    readahead: ReadaheadPolicy? = nil,
    seconds: Double = 45,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (LazyRegion) async throws -> Void
) async throws {
    try await withFaultWatchdog(seconds: seconds, sourceLocation: sourceLocation) { scope in
        let options = FaultResolver.Options(
            readahead: readahead ?? .adaptive(maximum: provider.preferredReadSize),
            failurePolicy: failurePolicy)
        let region = try await LazyRegion(length: provider.size!, provider: provider, options: options)
        scope.track(region.uffd)
        do {
            try await body(region)
            await region.close()
        } catch {
            await region.close()
            throw error
        }
    }
}

/// Copies `range` of the region out on a thread of its own (the copy faults the pages in).
func readRegion(_ region: LazyRegion, _ range: Range<Int>) async -> [UInt8] {
    let base = UInt(bitPattern: region.baseAddress)
    return await OffPoolThread(name: "uffd-remote-reader") {
        Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: base + UInt(range.lowerBound)), count: range.count))
    }.value
}

/// Reads one byte of the region on a thread of its own through the SIGBUS probe: the byte, or nil if SIGBUS was raised.
func probeRegion(_ region: LazyRegion, at offset: Int) async -> UInt8? {
    let address = UInt(bitPattern: region.baseAddress) + UInt(offset)
    return await OffPoolThread(name: "uffd-remote-probe") { () -> UInt8? in
        var byte: UInt8 = 0
        let signal = cuffd_test_probe_read(UnsafeRawPointer(bitPattern: address), &byte)
        return signal == 0 ? byte : nil
    }.value
}

/// The next error the region reports, or nil after `seconds`.
func nextRegionError(_ region: LazyRegion, seconds: Double = 10) async -> RegionError? {
    let errors = region.errors
    let task = Task { () throws -> RegionError? in
        for await error in errors { return error }
        return nil
    }
    return (try? await value(of: task, within: seconds)) ?? nil
}

/// The underlying ``HTTPRangeError`` of a region error.
func httpError(_ error: RegionError?) -> HTTPRangeError? {
    error?.underlying as? HTTPRangeError
}

/// Block indexes touched by reading `ranges` (object offsets) with `blockSize`-byte blocks.
func touchedBlocks(_ ranges: [Range<Int>], blockSize: Int) -> Set<Int> {
    var blocks = Set<Int>()
    for range in ranges where !range.isEmpty {
        for block in (range.lowerBound / blockSize)...((range.upperBound - 1) / blockSize) { blocks.insert(block) }
    }
    return blocks
}

/// The error `HTTPRangeProvider.open` throws, or nil if it succeeds.
func openFailure(_ url: URL, headers: [String: String] = [:],
                 options: HTTPRangeProvider.Options = .init()) async -> HTTPRangeError? {
    do {
        _ = try await HTTPRangeProvider.open(url: url, headers: headers, options: options)
        return nil
    } catch {
        return error
    }
}

extension Duration {
    /// The duration in seconds.
    var asSeconds: Double { Double(components.seconds) + Double(components.attoseconds) / 1e18 }
}
