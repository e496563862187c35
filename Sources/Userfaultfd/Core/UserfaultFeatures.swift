/// The feature bits of the `UFFDIO_API` handshake (`UFFD_FEATURE_*`).
///
/// Kernel 6.18 offers all seventeen. Ask for what you need with ``UserfaultFD/init(requiredFeatures:optionalFeatures:userModeOnly:path:)``:
/// missing *required* features throw ``UserfaultError/Code/unsupportedFeatures(_:)`` naming them; missing *optional* ones are
/// left out. Unknown bits are kept as they are, so a newer kernel's offer survives a round trip.
public struct UserfaultFeatures: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Write-protect mode on anonymous memory (5.7).
    public static let pagefaultFlagWP = UserfaultFeatures(rawValue: 1 << 0)
    /// A forked child gets its own uffd, announced by a FORK event (4.11). Needs CAP_SYS_PTRACE.
    public static let eventFork = UserfaultFeatures(rawValue: 1 << 1)
    /// mremap(2) of registered memory sends REMAP (4.11).
    public static let eventRemap = UserfaultFeatures(rawValue: 1 << 2)
    /// madvise(MADV_DONTNEED / MADV_REMOVE) sends REMOVE (4.11).
    public static let eventRemove = UserfaultFeatures(rawValue: 1 << 3)
    /// MISSING mode on hugetlbfs (4.11).
    public static let missingHugetlbfs = UserfaultFeatures(rawValue: 1 << 4)
    /// MISSING mode on shmem (4.11).
    public static let missingShmem = UserfaultFeatures(rawValue: 1 << 5)
    /// munmap(2) and implicit unmaps send UNMAP (4.11).
    public static let eventUnmap = UserfaultFeatures(rawValue: 1 << 6)
    /// No messages: every fault in a registered range raises SIGBUS (4.14).
    public static let sigbus = UserfaultFeatures(rawValue: 1 << 7)
    /// Page faults carry the faulting thread's id (4.14).
    public static let threadID = UserfaultFeatures(rawValue: 1 << 8)
    /// MINOR mode on hugetlbfs (5.13).
    public static let minorHugetlbfs = UserfaultFeatures(rawValue: 1 << 9)
    /// MINOR mode on shmem (5.14).
    public static let minorShmem = UserfaultFeatures(rawValue: 1 << 10)
    /// Fault addresses are exact, not masked to the page (5.18).
    public static let exactAddress = UserfaultFeatures(rawValue: 1 << 11)
    /// Write-protect mode on shmem and hugetlbfs (5.19).
    public static let wpHugetlbfsShmem = UserfaultFeatures(rawValue: 1 << 12)
    /// Write-protect also marks empty anonymous PTEs (6.4).
    public static let wpUnpopulated = UserfaultFeatures(rawValue: 1 << 13)
    /// `UFFDIO_POISON` (6.6).
    public static let poison = UserfaultFeatures(rawValue: 1 << 14)
    /// The kernel resolves write-protect faults itself; read the dirty set with PAGEMAP_SCAN (6.7).
    public static let wpAsync = UserfaultFeatures(rawValue: 1 << 15)
    /// `UFFDIO_MOVE` (6.8).
    public static let move = UserfaultFeatures(rawValue: 1 << 16)

    /// Every feature this library knows, with its kernel name.
    public static let known: [(feature: UserfaultFeatures, name: String)] = [
        (.pagefaultFlagWP, "PAGEFAULT_FLAG_WP"), (.eventFork, "EVENT_FORK"), (.eventRemap, "EVENT_REMAP"),
        (.eventRemove, "EVENT_REMOVE"), (.missingHugetlbfs, "MISSING_HUGETLBFS"), (.missingShmem, "MISSING_SHMEM"),
        (.eventUnmap, "EVENT_UNMAP"), (.sigbus, "SIGBUS"), (.threadID, "THREAD_ID"),
        (.minorHugetlbfs, "MINOR_HUGETLBFS"), (.minorShmem, "MINOR_SHMEM"), (.exactAddress, "EXACT_ADDRESS"),
        (.wpHugetlbfsShmem, "WP_HUGETLBFS_SHMEM"), (.wpUnpopulated, "WP_UNPOPULATED"), (.poison, "POISON"),
        (.wpAsync, "WP_ASYNC"), (.move, "MOVE"),
    ]

    /// The union of every feature in ``known``.
    public static let allKnown: UserfaultFeatures = known.reduce(into: []) { $0.formUnion($1.feature) }

    /// Kernel names of the bits set, unknown bits as `bit N`.
    public var names: [String] {
        var names = Self.known.filter { contains($0.feature) }.map(\.name)
        let unknown = rawValue & ~Self.allKnown.rawValue
        for bit in 0..<64 where unknown & (1 << UInt64(bit)) != 0 { names.append("bit \(bit)") }
        return names
    }

    public var description: String { "[" + names.joined(separator: ", ") + "]" }
}
