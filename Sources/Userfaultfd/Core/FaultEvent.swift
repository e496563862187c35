/// One message read from a userfaultfd.
///
/// Page faults are the common case; the other events (enabled by the matching ``UserfaultFeatures``) tell a handler that
/// the memory it serves changed shape. A thread that caused a non-fault event sleeps until the event is read, and while
/// it is unread every resolving ioctl returns ``UserfaultError/Code/tryAgain(bytesCompleted:)``.
public enum FaultEvent: Sendable, CustomStringConvertible {
    /// A thread touched a registered page and waits for it to be resolved.
    case pageFault(PageFault)
    /// The process forked; the child's memory is served through this new userfaultfd (needs ``UserfaultFeatures/eventFork``).
    case fork(UserfaultFD)
    /// mremap(2) moved `length` bytes of registered memory from `from` to `to` (``UserfaultFeatures/eventRemap``).
    case remap(from: UInt, to: UInt, length: Int)
    /// madvise(MADV_DONTNEED/MADV_REMOVE) dropped these pages; the range stays registered (``UserfaultFeatures/eventRemove``).
    case remove(MemoryRange)
    /// munmap(2) removed this range; ioctls on it now fail (``UserfaultFeatures/eventUnmap``).
    case unmap(MemoryRange)

    public var description: String {
        switch self {
        case .pageFault(let fault): "pageFault(\(fault))"
        case .fork(let child): "fork(child uffd \(child.fileDescriptor))"
        case .remap(let from, let to, let length):
            "remap(from: 0x\(String(from, radix: 16)), to: 0x\(String(to, radix: 16)), length: \(length))"
        case .remove(let range): "remove(\(range))"
        case .unmap(let range): "unmap(\(range))"
        }
    }
}

/// A page fault reported by the kernel.
public struct PageFault: Sendable, Hashable, CustomStringConvertible {
    /// Which registration mode raised the fault.
    public enum Kind: Sendable, Hashable {
        /// The page is not present (``RegistrationMode/missing``).
        case missing
        /// A write hit a write-protected page (``RegistrationMode/writeProtect``).
        case writeProtect
        /// The page is in the page cache but not mapped (``RegistrationMode/minor``).
        case minor
    }

    /// The faulting address: exact with ``UserfaultFeatures/exactAddress``, otherwise as the kernel reports it (page-aligned).
    public var address: UInt
    /// `address` rounded down to the base page.
    public var pageAddress: UInt
    /// What raised the fault.
    public var kind: Kind
    /// Whether the access was a write.
    public var isWrite: Bool
    /// The faulting thread's id, with ``UserfaultFeatures/threadID``.
    public var threadID: Int32?
    /// The raw `pagefault.flags` word.
    public var flags: UInt64

    /// Creates a fault; `pageAddress` is `address` rounded down to `pageSize`.
    public init(address: UInt, kind: Kind, isWrite: Bool, threadID: Int32? = nil, flags: UInt64 = 0, pageSize: Int = systemPageSize) {
        self.address = address
        self.pageAddress = address & ~UInt(pageSize - 1)
        self.kind = kind
        self.isWrite = isWrite
        self.threadID = threadID
        self.flags = flags
    }

    public var description: String {
        var text = "\(kind) \(isWrite ? "write" : "read") at 0x\(String(address, radix: 16))"
        if let threadID { text += " by thread \(threadID)" }
        return text
    }
}
