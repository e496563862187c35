/// How a ``DirtyTracker`` detects writes (also spelled `DirtyTracker.Engine`).
///
/// A core type because two layers name it: a ``LazyRegion`` created with `tracking:` installs its pages for this engine,
/// and the tracker made from the region (``DirtyTracker/init(region:)``) reads them with it. Tracking depends on
/// resolution, never the reverse.
public enum DirtyTrackingEngine: Sendable, Hashable, CustomStringConvertible {
    /// Write-protect faults, resolved by the tracker.
    case writeProtectFaults
    /// `UFFD_FEATURE_WP_ASYNC` and `PAGEMAP_SCAN`: no faults at all.
    case asyncScan

    /// The best engine for a userfaultfd with `features` enabled (or offered): ``asyncScan`` with
    /// ``UserfaultFeatures/wpAsync``, else ``writeProtectFaults``.
    public static func best(for features: UserfaultFeatures) -> DirtyTrackingEngine {
        features.contains(.wpAsync) ? .asyncScan : .writeProtectFaults
    }

    /// The features a userfaultfd needs for this engine (those also offered by the kernel are worth asking for).
    public var features: UserfaultFeatures {
        switch self {
        case .writeProtectFaults: [.pagefaultFlagWP, .wpUnpopulated, .wpHugetlbfsShmem]
        case .asyncScan: [.pagefaultFlagWP, .wpAsync, .wpUnpopulated, .wpHugetlbfsShmem]
        }
    }

    public var description: String {
        switch self {
        case .writeProtectFaults: "write-protect faults"
        case .asyncScan: "WP_ASYNC + PAGEMAP_SCAN"
        }
    }
}
