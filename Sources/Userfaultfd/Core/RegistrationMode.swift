/// How a registered range reports faults (`UFFDIO_REGISTER_MODE_*`); any combination is allowed where the memory
/// supports it.
public struct RegistrationMode: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// Faults on pages that are not present (resolve with copy, zero page, move or poison).
    public static let missing = RegistrationMode(rawValue: 1 << 0)
    /// Writes to write-protected pages (resolve with ``UserfaultFD/writeProtect(_:enabled:wake:)``).
    public static let writeProtect = RegistrationMode(rawValue: 1 << 1)
    /// Faults on pages present in the page cache but not mapped (shmem, hugetlbfs; resolve with continue).
    public static let minor = RegistrationMode(rawValue: 1 << 2)

    public var description: String {
        var parts: [String] = []
        if contains(.missing) { parts.append("missing") }
        if contains(.writeProtect) { parts.append("writeProtect") }
        if contains(.minor) { parts.append("minor") }
        return "[" + parts.joined(separator: ", ") + "]"
    }
}

/// The set of ioctls the kernel supports for a userfaultfd (after the handshake) or for a registered range.
///
/// Bits the library does not know are kept: newer kernels add ioctls, and rejecting them would break on upgrade.
public struct UserfaultIoctls: OptionSet, Sendable, Hashable, CustomStringConvertible {
    public let rawValue: UInt64
    public init(rawValue: UInt64) { self.rawValue = rawValue }

    /// `UFFDIO_REGISTER`.
    public static let register = UserfaultIoctls(rawValue: 1 << 0x00)
    /// `UFFDIO_UNREGISTER`.
    public static let unregister = UserfaultIoctls(rawValue: 1 << 0x01)
    /// `UFFDIO_WAKE`.
    public static let wake = UserfaultIoctls(rawValue: 1 << 0x02)
    /// `UFFDIO_COPY`.
    public static let copy = UserfaultIoctls(rawValue: 1 << 0x03)
    /// `UFFDIO_ZEROPAGE`.
    public static let zeroPage = UserfaultIoctls(rawValue: 1 << 0x04)
    /// `UFFDIO_MOVE`.
    public static let move = UserfaultIoctls(rawValue: 1 << 0x05)
    /// `UFFDIO_WRITEPROTECT`.
    public static let writeProtect = UserfaultIoctls(rawValue: 1 << 0x06)
    /// `UFFDIO_CONTINUE`.
    public static let `continue` = UserfaultIoctls(rawValue: 1 << 0x07)
    /// `UFFDIO_POISON`.
    public static let poison = UserfaultIoctls(rawValue: 1 << 0x08)
    /// `UFFDIO_API`.
    public static let api = UserfaultIoctls(rawValue: 1 << 0x3F)

    static let known: [(UserfaultIoctls, String)] = [
        (.register, "REGISTER"), (.unregister, "UNREGISTER"), (.wake, "WAKE"), (.copy, "COPY"),
        (.zeroPage, "ZEROPAGE"), (.move, "MOVE"), (.writeProtect, "WRITEPROTECT"), (.continue, "CONTINUE"),
        (.poison, "POISON"), (.api, "API"),
    ]

    public var description: String {
        "[" + Self.known.filter { contains($0.0) }.map(\.1).joined(separator: ", ") + "]"
    }
}
