extension FaultResolver {
    /// Counters of a ``FaultResolver`` (and of the ``LazyRegion`` it serves).
    public struct Statistics: Sendable, Hashable, CustomStringConvertible {
        /// Page-fault messages received.
        public var faults = 0
        /// Pages filled by copy.
        public var pagesCopied = 0
        /// Pages resolved with zeros: past the provider's data, removed under the zero-fill policy, left without data by
        /// the failure policy or cancellation, or faulted outside any served range.
        public var zeroPages = 0
        /// Bytes copied into the region.
        public var bytesCopied = 0
        /// Faults that joined a read already in flight for their page (no provider call, no copy of their own).
        public var deduplicatedFaults = 0
        /// Faults on pages already present (a re-fault after a signal, or a race): woken without work.
        public var alreadyPresentFaults = 0
        /// Provider reads started (for faults, readahead and prefetch).
        public var providerReads = 0
        /// Of those, reads started ahead of any fault by asynchronous readahead.
        public var readaheadReads = 0
        /// Provider reads that failed (each attempt).
        public var providerErrors = 0
        /// Pages poisoned by the failure policy or cancellation.
        public var pagesPoisoned = 0
        /// Resolutions the kernel deferred (`EAGAIN` while a non-fault event was unread) and that were retried.
        public var deferredRetries = 0
        /// Faults outside any served range (resolved with a zero page so the thread does not hang).
        public var unservedFaults = 0
        /// Non-fault events handled.
        public var events = 0
        /// MINOR faults: pages already in a shared file's page cache, mapped with `UFFDIO_CONTINUE` without a provider read.
        public var minorFaults = 0
        /// Forked children given a resolver of their own (``FaultResolver/Options/serveForkedChildren``).
        public var forkedChildrenServed = 0
        /// Of those, children whose process has exited and whose resolver was let go (checked about once a second).
        public var forkedChildrenExited = 0
        /// Forked children's userfaultfds closed unconsumed: ``FaultResolver/forkedChildren`` kept its limit already.
        public var forkedChildrenDropped = 0
        /// Fault-to-wake latency: from reading the fault message to the ioctl that woke the thread.
        public var latency = LatencyHistogram()

        /// All counters at zero.
        public init() {}

        public var description: String {
            """
            faults \(faults), pages copied \(pagesCopied), zero pages \(zeroPages), bytes \(bytesCopied), \
            dedup joins \(deduplicatedFaults), already present \(alreadyPresentFaults), provider reads \(providerReads) (readahead \(readaheadReads)), \
            provider errors \(providerErrors), minor \(minorFaults), poisoned \(pagesPoisoned), deferred \(deferredRetries), \
            fault-to-wake p50 \(LatencyHistogram.format(latency.percentile(50))) \
            p99 \(LatencyHistogram.format(latency.percentile(99))) max \(LatencyHistogram.format(latency.maximum))
            """
        }
    }
}

/// The resolver's counters under their old name.
@available(*, deprecated, renamed: "FaultResolver.Statistics", message: "statistics types are Owner.Statistics")
public typealias ResolverStatistics = FaultResolver.Statistics

/// A fixed-size log-linear histogram of durations in nanoseconds (no allocation per sample; about 6% resolution).
public struct LatencyHistogram: Sendable, Hashable {
    private static let subBuckets = 16
    private var counts = [UInt64](repeating: 0, count: 64 * 16)
    /// Samples recorded.
    public private(set) var count: UInt64 = 0
    /// The largest sample, in nanoseconds.
    public private(set) var maximum: UInt64 = 0

    /// An empty histogram.
    public init() {}

    /// Records one duration in nanoseconds.
    public mutating func record(nanoseconds: UInt64) {
        counts[Self.bucket(for: nanoseconds)] += 1
        count += 1
        maximum = max(maximum, nanoseconds)
    }

    /// The smallest recorded value v such that `percent`% of samples are ≤ v (upper bound of its bucket), in ns.
    public func percentile(_ percent: Double) -> UInt64 {
        guard count > 0 else { return 0 }
        let target = UInt64((Double(count) * percent / 100).rounded(.up))
        var seen: UInt64 = 0
        for (index, bucketCount) in counts.enumerated() where bucketCount > 0 {
            seen += bucketCount
            if seen >= max(1, target) { return min(Self.upperBound(of: index), maximum) }
        }
        return maximum
    }

    static func bucket(for value: UInt64) -> Int {
        if value < UInt64(subBuckets) { return Int(value) }
        let magnitude = 63 - value.leadingZeroBitCount  // ≥ 4
        let shift = magnitude - 4
        let sub = Int((value >> UInt64(shift)) & UInt64(subBuckets - 1))
        return (shift + 1) * subBuckets + sub
    }

    static func upperBound(of bucket: Int) -> UInt64 {
        let group = bucket / subBuckets, sub = bucket % subBuckets
        if group == 0 { return UInt64(sub) }
        let shift = group - 1
        return ((UInt64(subBuckets + sub) + 1) << UInt64(shift)) - 1
    }

    /// "12.3 µs" style text for a duration in nanoseconds.
    public static func format(_ nanoseconds: UInt64) -> String {
        switch nanoseconds {
        case ..<1_000: return "\(nanoseconds) ns"
        case ..<1_000_000: return String(format1: Double(nanoseconds) / 1_000) + " µs"
        case ..<1_000_000_000: return String(format1: Double(nanoseconds) / 1_000_000) + " ms"
        default: return String(format1: Double(nanoseconds) / 1_000_000_000) + " s"
        }
    }
}

extension String {
    /// One decimal place, without Foundation.
    init(format1 value: Double) {
        let tenths = Int((value * 10).rounded())
        self = "\(tenths / 10).\(tenths % 10)"
    }
}
