import CUserfaultfd
import Glibc
import Synchronization

/// One userfaultfd: the handle through which this process takes over page faults on memory it registers.
///
/// Create one, ``register(_:mode:)`` a range of memory, then read ``events`` and resolve each fault with
/// ``copy(from:to:length:mode:)``, ``zeroPage(_:wake:)`` and the other ioctls:
///
/// ```swift
/// let uffd = try UserfaultFD()
/// try uffd.register(MemoryRange(region), mode: .missing)
/// for try await event in uffd.events {
///     guard case .pageFault(let fault) = event else { continue }
///     try uffd.copy(from: page, to: fault.pageAddress, length: systemPageSize)
/// }
/// ```
///
/// `UserfaultFD` is `Sendable`: every method may be called from any thread, concurrently with the event reader.
///
/// ## Closing
/// ``close()`` (or the last reference going away) stops the event reader, ends ``events``, and closes the descriptor
/// once no ioctl is using it. Closing the last descriptor for a userfaultfd unregisters every range and wakes every thread
/// blocked on a fault in it: those threads retry their access as ordinary memory (anonymous memory then reads as zeros).
/// No thread is left blocked, and none gets SIGBUS. A descriptor handed to another process (or inherited) keeps the
/// userfaultfd alive until that copy is closed too.
public final class UserfaultFD: Sendable {
    let lease: DescriptorLease
    let reader: EventReader
    let channelStorage = Mutex<EventChannel?>(nil)

    /// The descriptor number. Valid until ``close()``; use it to pass the userfaultfd to another process.
    public let fileDescriptor: Int32
    /// The features the kernel offers (all it supports, whether requested or not).
    public let availableFeatures: UserfaultFeatures
    /// The features enabled on this userfaultfd by the handshake.
    public let enabledFeatures: UserfaultFeatures
    /// The ioctls the kernel supports on this userfaultfd.
    public let supportedIoctls: UserfaultIoctls
    /// The base page size ranges are checked against.
    public let pageSize: Int
    /// Whether the address space whose faults this userfaultfd carries is this process's own: true for one created
    /// here, false for one adopted (received from another process, inherited) or delivered by a FORK event. Only then
    /// does asking about this process's memory (`mincore`) tell anything about the registered pages.
    let servesOwnAddressSpace: Bool

    /// How to obtain the descriptor.
    public enum CreationPath: Sendable, Hashable {
        /// userfaultfd(2), then /dev/userfaultfd if the system call is refused.
        case automatic
        /// Only the userfaultfd(2) system call.
        case systemCall
        /// Only /dev/userfaultfd and its `USERFAULTFD_IOC_NEW` ioctl (Linux 6.1+; permission is the file's mode).
        case device
    }

    /// Creates a userfaultfd and performs the `UFFDIO_API` handshake.
    ///
    /// - Parameters:
    ///   - requiredFeatures: features the caller needs; if the kernel lacks any, this throws
    ///     ``UserfaultError/Code/unsupportedFeatures(_:)`` naming them.
    ///   - optionalFeatures: features enabled when available and silently left out otherwise. ``UserfaultFeatures/eventFork``
    ///     here is also dropped when the caller lacks CAP_SYS_PTRACE.
    ///   - userModeOnly: handle only faults raised in user mode (`UFFD_USER_MODE_ONLY`), which unprivileged processes need
    ///     when `vm.unprivileged_userfaultfd` is 0. A system call that touches registered memory then fails with EFAULT.
    ///   - path: how to create the descriptor (default: system call, falling back to /dev/userfaultfd).
    /// - Throws: ``UserfaultError`` with code ``UserfaultError/Code/unavailable`` (its detail names every path tried, why
    ///   each failed and how to fix it), ``UserfaultError/Code/unsupportedFeatures(_:)``, or
    ///   ``UserfaultError/Code/permissionDenied`` for a required feature the caller may not use.
    public convenience init(
        requiredFeatures: UserfaultFeatures = [],
        optionalFeatures: UserfaultFeatures = [],
        userModeOnly: Bool = false,
        path: CreationPath = .automatic
    ) throws(UserfaultError) {
        let descriptor = try Self.openDescriptor(userModeOnly: userModeOnly, path: path)
        do {
            let result = try Self.handshake(
                descriptor: descriptor, required: requiredFeatures, optional: optionalFeatures,
                userModeOnly: userModeOnly, path: path)
            self.init(descriptor: descriptor, available: result.available, enabled: result.enabled, ioctls: result.ioctls,
                      servesOwnAddressSpace: true)
        } catch {
            _ = Glibc.close(descriptor)
            throw error
        }
    }

    /// Adopts a userfaultfd descriptor whose handshake was done elsewhere: received from another process, or inherited.
    ///
    /// The descriptor is checked to really be a userfaultfd and made non-blocking. The adopted handle owns it from now on
    /// and closes it in ``close()``.
    ///
    /// - Parameters:
    ///   - descriptor: an open userfaultfd.
    ///   - enabledFeatures: what the other side enabled in its handshake, if known (decides how messages are read,
    ///     e.g. whether thread ids are present).
    ///   - supportedIoctls: what the other side's handshake reported, if known.
    /// - Throws: ``UserfaultError/Code/notUserfaultfd`` when the descriptor is something else or not open.
    public convenience init(
        adopting descriptor: Int32,
        enabledFeatures: UserfaultFeatures = [],
        supportedIoctls: UserfaultIoctls = [.register, .unregister, .api]
    ) throws(UserfaultError) {
        try Self.validateUserfaultfd(descriptor)
        guard cuffd_set_nonblocking(descriptor) == 0 else {
            throw UserfaultError(operation: .adopt, errno: Glibc.errno, detail: "could not set O_NONBLOCK")
        }
        self.init(descriptor: descriptor, available: enabledFeatures, enabled: enabledFeatures, ioctls: supportedIoctls)
    }

    init(descriptor: Int32, available: UserfaultFeatures, enabled: UserfaultFeatures, ioctls: UserfaultIoctls,
         servesOwnAddressSpace: Bool = false) {
        self.fileDescriptor = descriptor
        self.servesOwnAddressSpace = servesOwnAddressSpace
        self.lease = DescriptorLease(descriptor: descriptor)
        self.availableFeatures = available
        self.enabledFeatures = enabled
        self.supportedIoctls = ioctls
        self.pageSize = systemPageSize
        self.reader = EventReader(lease: lease, features: enabled, pageSize: systemPageSize)
    }

    deinit {
        close()
    }

    /// Stops the event reader, ends ``events`` and closes the descriptor as soon as no ioctl is using it.
    ///
    /// Threads blocked on faults in this userfaultfd's ranges are woken by the kernel when the last descriptor for it
    /// closes, and retry as ordinary memory (see the type's documentation). Every later call throws
    /// ``UserfaultError/Code/closed``. Calling `close()` again does nothing.
    public func close() {
        reader.cancel()
        lease.markClosed()
    }

    /// Whether ``close()`` has been called.
    public var isClosed: Bool { lease.isClosed }

    /// The features the kernel offers, read with a throw-away userfaultfd.
    public static func probeFeatures(
        userModeOnly: Bool = false, path: CreationPath = .automatic
    ) throws(UserfaultError) -> (features: UserfaultFeatures, ioctls: UserfaultIoctls) {
        let descriptor = try openDescriptor(userModeOnly: userModeOnly, path: path)
        defer { _ = Glibc.close(descriptor) }
        var api = cuffd_api(api: CUFFD_API, features: 0, ioctls: 0)
        guard retryingInterrupts({ cuffd_ioctl_api(descriptor, &api) }) == 0 else {
            throw UserfaultError(operation: .handshake, errno: Glibc.errno, detail: "probing the offered features")
        }
        return (UserfaultFeatures(rawValue: api.features), UserfaultIoctls(rawValue: api.ioctls))
    }

    // MARK: - Creation

    static func openDescriptor(userModeOnly: Bool, path: CreationPath) throws(UserfaultError) -> Int32 {
        let flags = cuffd_creation_flags(userModeOnly ? 1 : 0)
        var attempts: [String] = []
        var lastErrno: Int32 = 0
        if path != .device {
            let descriptor = cuffd_userfaultfd(flags)
            if descriptor >= 0 { return descriptor }
            lastErrno = Glibc.errno
            attempts.append("userfaultfd(2): \(String(cString: strerror(lastErrno)))")
        }
        if path != .systemCall {
            let device = cuffd_open_rdwr("/dev/userfaultfd")
            if device >= 0 {
                let descriptor = cuffd_dev_new(device, flags)
                lastErrno = Glibc.errno
                _ = Glibc.close(device)
                if descriptor >= 0 { return descriptor }
                attempts.append("/dev/userfaultfd USERFAULTFD_IOC_NEW: \(String(cString: strerror(lastErrno)))")
            } else {
                lastErrno = Glibc.errno
                attempts.append("open /dev/userfaultfd: \(String(cString: strerror(lastErrno)))")
            }
        }
        var fix = "To fix: run as root or with CAP_SYS_PTRACE; or set `sysctl vm.unprivileged_userfaultfd=1`"
        if !userModeOnly { fix += "; or pass userModeOnly: true (handles user-mode faults only)" }
        fix += "; or give this user read/write access to /dev/userfaultfd (Linux 6.1+)."
        throw UserfaultError(.unavailable, operation: .create, errno: lastErrno,
                             detail: "tried " + attempts.joined(separator: "; ") + ". " + fix)
    }

    static func handshake(
        descriptor: Int32, required: UserfaultFeatures, optional: UserfaultFeatures, userModeOnly: Bool, path: CreationPath
    ) throws(UserfaultError) -> (available: UserfaultFeatures, enabled: UserfaultFeatures, ioctls: UserfaultIoctls) {
        // A successful UFFDIO_API uses a descriptor up, so what the kernel offers is read from a throw-away one when the
        // request depends on it (optional features) or when a request failed and the missing bits must be named.
        var request = required
        if !optional.isEmpty {
            let offered = try probeFeatures(userModeOnly: userModeOnly, path: path).features
            let missing = required.subtracting(offered)
            guard missing.isEmpty else { throw unsupported(missing, offered: offered) }
            request.formUnion(optional.intersection(offered))
        }
        while true {
            var api = cuffd_api(api: CUFFD_API, features: request.rawValue, ioctls: 0)
            if retryingInterrupts({ cuffd_ioctl_api(descriptor, &api) }) == 0 {
                return (UserfaultFeatures(rawValue: api.features), request, UserfaultIoctls(rawValue: api.ioctls))
            }
            let error = Glibc.errno
            // A failed handshake does not use the descriptor up, so it can be retried with less.
            if error == EPERM, request.contains(.eventFork), !required.contains(.eventFork) {
                request.remove(.eventFork)
                continue
            }
            if error == EINVAL {
                let offered = try probeFeatures(userModeOnly: userModeOnly, path: path).features
                let missing = request.subtracting(offered)
                if !missing.isEmpty { throw unsupported(missing, offered: offered) }
            }
            throw UserfaultError(operation: .handshake, errno: error,
                                 detail: error == EPERM && request.contains(.eventFork)
                                    ? "EVENT_FORK needs CAP_SYS_PTRACE" : "requested features \(request)")
        }
    }

    private static func unsupported(_ missing: UserfaultFeatures, offered: UserfaultFeatures) -> UserfaultError {
        UserfaultError(.unsupportedFeatures(missing), operation: .handshake,
                       detail: "missing \(missing.names.joined(separator: ", ")); the kernel offers \(offered)")
    }

    /// Checks that `descriptor` is an open userfaultfd: by its `/proc/self/fd` link, or where `/proc` is not mounted
    /// (or not readable: a sandbox, a container without it), by asking the kernel (``probeUserfaultfd(_:)``).
    /// - Parameter fdDirectory: where the process's descriptor links are (a test points it elsewhere).
    package static func validateUserfaultfd(_ descriptor: Int32, fdDirectory: String = "/proc/self/fd") throws(UserfaultError) {
        var buffer = [CChar](repeating: 0, count: 256)
        let count = readlink("\(fdDirectory)/\(descriptor)", &buffer, buffer.count - 1)
        guard count > 0 else {
            let error = Glibc.errno
            // The link is missing because the descriptor is not open (EBADF from fcntl), or because there is no
            // usable /proc: then the kernel is asked directly.
            guard fcntl(descriptor, F_GETFD) >= 0 else {
                throw UserfaultError(.notUserfaultfd, operation: .adopt, errno: EBADF, detail: "descriptor \(descriptor) is not open")
            }
            guard probeUserfaultfd(descriptor) else {
                throw UserfaultError(.notUserfaultfd, operation: .adopt, errno: error,
                                     detail: "descriptor \(descriptor) is not a userfaultfd (\(fdDirectory) unusable: checked with UFFDIO_WAKE)")
            }
            return
        }
        let target = String(decoding: buffer[0..<count].map { UInt8(bitPattern: $0) }, as: UTF8.self)
        guard target == "anon_inode:[userfaultfd]" else {
            throw UserfaultError(.notUserfaultfd, operation: .adopt, detail: "descriptor \(descriptor) is \(target)")
        }
    }

    /// Whether `descriptor` is a userfaultfd, without `/proc`: an anonymous inode on which `UFFDIO_WAKE` of one page
    /// succeeds (it wakes nothing that is not waiting there; every other kind of descriptor refuses the ioctl).
    package static func probeUserfaultfd(_ descriptor: Int32) -> Bool {
        cuffd_probe_userfaultfd(descriptor) == 1
    }
}

/// Runs a system call again while it fails with EINTR.
@inline(__always)
func retryingInterrupts(_ call: () -> Int32) -> Int32 {
    while true {
        let result = call()
        if result == -1 && Glibc.errno == EINTR { continue }
        return result
    }
}
