import Glibc

/// The error every userfaultfd operation throws: what failed, why, with which errno and on which range.
///
/// Match on ``code`` for the cases a caller handles (``Code/pageExists`` after a racing resolution,
/// ``Code/tryAgain(bytesCompleted:)`` while a non-fault event is unread); ``description`` reads as a sentence for logs.
public struct UserfaultError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The reason, in terms a caller can act on.
    public enum Code: Sendable, Hashable {
        /// No userfaultfd could be created; ``UserfaultError/detail`` says which paths were tried and how to fix it.
        case unavailable
        /// The kernel lacks these required features.
        case unsupportedFeatures(UserfaultFeatures)
        /// A range or argument the kernel would reject (unaligned, empty, or the wrong mode for the memory).
        case invalidArgument
        /// `EEXIST`: a page is already present at the destination (resolved by someone else; wake the waiters).
        case pageExists
        /// `EAGAIN`: the kernel asks to retry, usually because a non-fault event is unread. The first
        /// `bytesCompleted` bytes of the range were resolved (and their waiters woken).
        case tryAgain(bytesCompleted: Int)
        /// `ENOENT`: the range is not registered with this userfaultfd (or crosses the end of a mapping).
        case notRegistered
        /// `EBUSY`: the memory belongs to another userfaultfd, or the page is shared (MOVE).
        case busy
        /// `ESRCH`: the address space that owns the range has exited.
        case processExited
        /// `EFAULT`: the source buffer of a copy, or a page-cache page for continue, is not accessible.
        case badAddress
        /// `EPERM`: the caller lacks the privilege (e.g. EVENT_FORK without CAP_SYS_PTRACE).
        case permissionDenied
        /// The userfaultfd was closed before or during the call.
        case closed
        /// A `struct uffd_msg` or a read that cannot be decoded.
        case malformedMessage
        /// A message with an event code this library does not know.
        case unknownEvent(UInt8)
        /// ``UserfaultFD/events`` is already being iterated by another consumer.
        case concurrentIteration
        /// A descriptor handed in is not a userfaultfd.
        case notUserfaultfd
        /// A file read through ``FileMapping`` ends before the size it had when it was opened (it was truncated).
        case fileTruncated
        /// Any other errno.
        case system
    }

    /// The operation that failed.
    public enum Operation: String, Sendable, Hashable {
        /// `userfaultfd(2)`, or `USERFAULTFD_IOC_NEW` on `/dev/userfaultfd`.
        case create
        /// `UFFDIO_API`: the feature handshake.
        case handshake
        /// Taking over a descriptor received from elsewhere (checking that it is a userfaultfd).
        case adopt
        /// `UFFDIO_REGISTER`.
        case register
        /// `UFFDIO_UNREGISTER`.
        case unregister
        /// `UFFDIO_WAKE`.
        case wake
        /// `UFFDIO_COPY`.
        case copy
        /// `UFFDIO_ZEROPAGE`.
        case zeroPage
        /// `UFFDIO_WRITEPROTECT`.
        case writeProtect
        /// `UFFDIO_CONTINUE`.
        case `continue`
        /// `UFFDIO_POISON`.
        case poison
        /// `UFFDIO_MOVE`.
        case move
        /// `read(2)` of the userfaultfd's messages.
        case readEvents
        /// Iterating ``UserfaultFD/events`` (a second iterator, or one after close).
        case iterate
        /// `PAGEMAP_SCAN` on `/proc/PID/pagemap` (dirty tracking), or opening that file.
        case scanPagemap
        /// Creating, sizing or mapping shared memory (memfd).
        case mapSharedMemory
        /// `open(2)` of a file the library reads (a memory snapshot, ``FileMapping``).
        case open
        /// `fstat(2)` of a file just opened.
        case fstat
        /// `mmap(2)` of the memory a region or ``AnonymousMemory`` is made of.
        case mmap
        /// `pread(2)` of a file (``FileMapping``): it failed, or came up short because the file was truncated.
        case pread

        /// A userfaultfd operation ("userfaultfd register failed"), not a system call on a file or on plain memory
        /// made before any userfaultfd is involved ("open failed").
        var isUserfaultfdOperation: Bool {
            switch self {
            case .open, .fstat, .mmap, .pread: false
            default: true
            }
        }
    }

    /// Why it failed.
    public var code: Code
    /// What was being done.
    public var operation: Operation
    /// The errno the kernel returned, when a system call failed.
    public var errno: Int32?
    /// The range the operation concerned, when it had one.
    public var range: MemoryRange?
    /// More words for the reader: the paths tried, the features missing, the constraint broken.
    public var detail: String

    /// Creates an error. Library code normally uses ``init(operation:errno:range:bytesCompleted:detail:)``, which maps errno to a code.
    public init(_ code: Code, operation: Operation, errno: Int32? = nil, range: MemoryRange? = nil, detail: String = "") {
        self.code = code
        self.operation = operation
        self.errno = errno
        self.range = range
        self.detail = detail
    }

    /// An error for a failed system call, with ``code`` derived from `errno`.
    public init(operation: Operation, errno: Int32, range: MemoryRange? = nil, bytesCompleted: Int = 0, detail: String = "") {
        let code: Code
        switch errno {
        case EEXIST: code = .pageExists
        case EAGAIN: code = .tryAgain(bytesCompleted: bytesCompleted)
        case ENOENT: code = .notRegistered
        case EBUSY: code = .busy
        case ESRCH: code = .processExited
        case EFAULT: code = .badAddress
        case EPERM: code = .permissionDenied
        case EINVAL: code = .invalidArgument
        case EBADF: code = .closed
        default: code = .system
        }
        self.init(code, operation: operation, errno: errno, range: range, detail: detail)
    }

    public var description: String {
        var text = "\(operation.isUserfaultfdOperation ? "userfaultfd " : "")\(operation.rawValue) failed: \(codeDescription)"
        if let range { text += " on \(range)" }
        if let errno { text += " (errno \(errno): \(String(cString: strerror(errno))))" }
        if !detail.isEmpty { text += ". \(detail)" }
        return text
    }

    private var codeDescription: String {
        switch code {
        case .unavailable: "no userfaultfd could be created"
        case .unsupportedFeatures(let missing): "the kernel does not offer the required features \(missing)"
        case .invalidArgument: "invalid argument"
        case .pageExists: "a page is already present"
        case .tryAgain(let done): "the kernel asked to retry after \(done) bytes (a non-fault event is pending)"
        case .notRegistered: "the range is not registered with this userfaultfd"
        case .busy: "the memory is busy (registered elsewhere, or shared)"
        case .processExited: "the address space has exited"
        case .badAddress: "a source or page-cache page is not accessible"
        case .permissionDenied: "permission denied"
        case .closed: "the userfaultfd is closed"
        case .malformedMessage: "malformed message"
        case .unknownEvent(let event): "unknown event code 0x\(String(event, radix: 16))"
        case .concurrentIteration: "the events are already being consumed by another iterator"
        case .notUserfaultfd: "the descriptor is not a userfaultfd"
        case .fileTruncated: "the file was truncated"
        case .system: "system error"
        }
    }
}
