import CUserfaultfd
import Dispatch
import Glibc
import Synchronization

/// An error passing messages and descriptors over a Unix socket.
public struct DescriptorPassingError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What went wrong.
    public enum Code: Sendable, Hashable {
        /// A message that should carry a descriptor carried none.
        case noDescriptor
        /// A message carried more descriptors than expected (all of them were closed).
        case tooManyDescriptors(Int)
        /// The payload did not fit the receive buffer (the rest was discarded by the kernel).
        case payloadTruncated
        /// Some descriptors did not fit and were discarded, or the message carried more than
        /// `ReceivedMessage.maximumDescriptors` (16; all of them were closed).
        case descriptorsTruncated
        /// The control messages that came with the payload cannot be parsed: a header whose length is below its own
        /// size or past the end of the buffer, or `SCM_RIGHTS` data that is not a whole number of descriptors (every
        /// descriptor found was closed).
        case malformedControlMessage
        /// The peer closed the connection.
        case connectionClosed
        /// Nothing arrived in time.
        case timedOut
        /// The socket was closed by this side, or the waiting task was cancelled.
        case cancelled
        /// The process is out of descriptors (`EMFILE`, `ENFILE`).
        case descriptorsExhausted
        /// A socket path that does not fit a Unix socket address.
        case pathTooLong
        /// Any other errno.
        case system
    }

    /// What went wrong.
    public var code: Code
    /// The call that failed (`connect`, `sendmsg`, `recvmsg`, ...).
    public var operation: String
    /// The errno, when a system call failed.
    public var errno: Int32?
    /// More words for the reader.
    public var detail: String

    /// An error with its code, the call that failed, the errno and a detail.
    public init(_ code: Code, operation: String, errno: Int32? = nil, detail: String = "") {
        self.code = code
        self.operation = operation
        self.errno = errno
        self.detail = detail
    }

    public var description: String {
        var text = "\(operation): \(code)"
        if let errno { text += " (errno \(errno): \(String(cString: strerror(errno))))" }
        if !detail.isEmpty { text += ": \(detail)" }
        return text
    }

    static func system(_ operation: String, path: String? = nil) -> DescriptorPassingError {
        let error = Glibc.errno
        return DescriptorPassingError(error == ENAMETOOLONG ? .pathTooLong : .system, operation: operation, errno: error,
                                      detail: path ?? "")
    }
}

/// A connected Unix stream socket that can pass descriptors. Non-blocking; waits are asynchronous (Dispatch sources),
/// so they never hold a thread.
public final class UnixSocketConnection: Sendable {
    let lease: DescriptorLease
    private let waiter: ReadinessWaiter
    /// The socket's descriptor.
    public let fileDescriptor: Int32

    /// Connects to the socket at `path`.
    public static func connect(path: String) throws(DescriptorPassingError) -> UnixSocketConnection {
        let descriptor = cuffd_unix_connect(path)
        guard descriptor >= 0 else { throw .system("connect", path: path) }
        return UnixSocketConnection(descriptor: descriptor)
    }

    /// Takes ownership of a connected, non-blocking socket.
    public init(descriptor: Int32) {
        fileDescriptor = descriptor
        lease = DescriptorLease(descriptor: descriptor)
        waiter = ReadinessWaiter(lease: lease, label: "userfaultfd.socket.\(descriptor)")
    }

    deinit { close() }

    /// Closes the socket; a pending receive (``UserfaultFD/receive(from:enabledFeatures:maximumPayload:timeout:)``)
    /// throws ``DescriptorPassingError/Code/cancelled``.
    public func close() {
        waiter.cancel()
        lease.markClosed()
    }

    /// The peer's process id (SO_PEERCRED), if the kernel reports it.
    public var peerProcessID: Int32? {
        let pid = (try? lease.withDescriptor(.adopt) { cuffd_peer_pid($0) }) ?? -1
        return pid > 0 ? pid : nil
    }

    /// The peer's credentials as of `connect` (SO_PEERCRED), if the kernel reports them.
    public var peerCredentials: PeerCredentials? {
        var pid: Int32 = 0, uid: UInt32 = 0, gid: UInt32 = 0
        let result = (try? lease.withDescriptor(.adopt) { cuffd_peer_credentials($0, &pid, &uid, &gid) }) ?? -1
        guard result == 0 else { return nil }
        return PeerCredentials(processID: pid > 0 ? pid : nil, userID: uid, groupID: gid)
    }

    /// A watch on the peer's process: its exit, whatever happens to this socket (`SO_PEERPIDFD`, or `pidfd_open(2)`
    /// on the peer's pid). `nil` when the kernel offers neither (before Linux 5.3) or the socket is closed.
    package func watchPeerProcess() -> ProcessExitWatch? {
        let pidfd = (try? lease.withDescriptor(.adopt) { cuffd_peer_pidfd($0) }) ?? -1
        guard pidfd >= 0 else { return nil }
        return ProcessExitWatch(pidfd: pidfd, processID: peerProcessID)
    }

    /// Sends `payload` and `descriptors` (at most 16) in one `sendmsg` (more calls for the rest of a payload the
    /// socket took only part of).
    ///
    /// A stream message of zero bytes carries no descriptors on Linux (the kernel drops them), so descriptors with an
    /// empty payload go with one zero byte: the peer receives a one-byte payload `[0]`.
    /// ``UserfaultFD/receive(from:enabledFeatures:maximumPayload:timeout:)`` reads that as the empty payload.
    ///
    /// The socket is non-blocking: while the peer's buffer is full, the call waits (`poll(2)`, blocking the calling
    /// thread) up to `timeout` for room, then throws ``DescriptorPassingError/Code/timedOut`` (part of the payload may
    /// have been sent by then).
    package func send(_ payload: [UInt8], descriptors: [Int32] = [], timeout: Duration = .seconds(5)) throws(DescriptorPassingError) {
        guard descriptors.count <= Int(CUFFD_MAX_PASSED_FDS) else {
            throw DescriptorPassingError(.tooManyDescriptors(descriptors.count), operation: "sendmsg",
                                         detail: "at most \(CUFFD_MAX_PASSED_FDS) descriptors per message")
        }
        guard lease.acquire() else { throw DescriptorPassingError(.cancelled, operation: "sendmsg", detail: "the socket is closed") }
        defer { lease.release() }
        let payload = payload.isEmpty && !descriptors.isEmpty ? [0] : payload
        let deadline = monotonicNanoseconds() &+ timeout.saturatingNanoseconds
        var sentTotal = 0
        var first = true
        while sentTotal < payload.count || first {
            let sent = payload.withUnsafeBytes { bytes in
                descriptors.withUnsafeBufferPointer { fds in
                    cuffd_send_with_fds(lease.descriptor, bytes.baseAddress.map { $0 + sentTotal }, bytes.count - sentTotal,
                                        first ? fds.baseAddress : nil, first ? Int32(fds.count) : 0)
                }
            }
            if sent < 0 {
                let error = Glibc.errno
                if error == EINTR { continue }
                guard error == EAGAIN else { throw .system("sendmsg") }
                // The peer's buffer is full: wait for room, not longer than the deadline.
                try waitWritable(until: deadline, timeout: timeout)
                continue
            }
            sentTotal += sent
            first = false
        }
    }

    /// Waits until the socket is writable or `deadline` (monotonic nanoseconds) passes (``DescriptorPassingError/Code/timedOut``).
    private func waitWritable(until deadline: UInt64, timeout: Duration) throws(DescriptorPassingError) {
        var descriptor = pollfd(fd: lease.descriptor, events: Int16(POLLOUT), revents: 0)
        while true {
            let now = monotonicNanoseconds()
            guard now < deadline else {
                throw DescriptorPassingError(.timedOut, operation: "sendmsg",
                                             detail: "the peer's receive buffer stayed full for \(timeout)")
            }
            let milliseconds = Int32(clamping: (deadline - now + 999_999) / 1_000_000)
            let ready = poll(&descriptor, 1, milliseconds)
            if ready > 0 { return }
            if ready < 0 && Glibc.errno != EINTR { throw .system("poll") }
        }
    }

    /// Room for one SCM_RIGHTS message of `ReceivedMessage.maximumDescriptors` (16): a peer that sends more gets
    /// `MSG_CTRUNC` from the kernel (and ``DescriptorPassingError/Code/descriptorsTruncated`` from ``receive(maximumPayload:timeout:)``).
    static let controlCapacity = cuffd_cmsg_space(MemoryLayout<Int32>.size * ReceivedMessage.maximumDescriptors)

    /// Receives one message: waits until the socket is readable (up to `timeout`), then one `recvmsg`.
    ///
    /// - Returns: the message; at end of stream, an empty one (``ReceivedMessage/isEndOfStream``).
    /// - Throws: ``DescriptorPassingError/Code/payloadTruncated``, ``DescriptorPassingError/Code/descriptorsTruncated``
    ///   or ``DescriptorPassingError/Code/malformedControlMessage`` (the descriptors that did arrive are closed; see
    ///   ``ReceivedMessage/decode(payload:control:messageFlags:closing:)``), ``DescriptorPassingError/Code/timedOut``,
    ///   ``DescriptorPassingError/Code/cancelled``.
    package func receive(maximumPayload: Int = 64 * 1024, timeout: Duration? = nil) async throws(DescriptorPassingError) -> ReceivedMessage {
        while true {
            try await waiter.waitUntilReadable(timeout: timeout)
            guard lease.acquire() else { throw DescriptorPassingError(.cancelled, operation: "recvmsg", detail: "the socket is closed") }
            defer { lease.release() }
            var payload = [UInt8](repeating: 0, count: maximumPayload)
            var control = [UInt8](repeating: 0, count: Self.controlCapacity)
            var controlLength = 0
            var messageFlags: Int32 = 0
            let received = payload.withUnsafeMutableBytes { bytes in
                control.withUnsafeMutableBytes {
                    cuffd_recv_raw(lease.descriptor, bytes.baseAddress, bytes.count, $0.baseAddress, $0.count, &controlLength,
                                   &messageFlags)
                }
            }
            if received < 0 {
                if Glibc.errno == EAGAIN { continue }
                throw .system("recvmsg")
            }
            payload.removeSubrange(received...)
            // (Array.withUnsafeBytes only rethrows untyped errors: carry the typed one out in a Result.)
            let decoded = control.withUnsafeBytes { bytes in
                Result { () throws(DescriptorPassingError) in
                    try ReceivedMessage.decode(payload: payload, control: UnsafeRawBufferPointer(rebasing: bytes.prefix(controlLength)),
                                               messageFlags: messageFlags)
                }
            }
            return try decoded.get()
        }
    }

    /// Waits until the peer closes the connection, discarding (and closing) whatever else it sends; each unexpected
    /// message is passed to `unexpected`.
    package func waitForHangUp(unexpected: @Sendable (ReceivedMessage) -> Void = { _ in }) async {
        while true {
            do {
                let message = try await receive()
                if message.isEndOfStream { return }
                message.closeDescriptors()
                unexpected(message)
            } catch {
                if error.code == .cancelled { return }
                if case .system = error.code { return }
            }
        }
    }
}

/// Who is at the other end of a Unix socket, as of its `connect` (SO_PEERCRED).
public struct PeerCredentials: Sendable, Hashable {
    /// Its process id, if the kernel reports one.
    public var processID: Int32?
    /// Its effective user id.
    public var userID: UInt32
    /// Its effective group id.
    public var groupID: UInt32

    /// Credentials.
    public init(processID: Int32?, userID: UInt32, groupID: UInt32) {
        self.processID = processID
        self.userID = userID
        self.groupID = groupID
    }
}

/// A process's exit, awaited without a thread: a pidfd, which becomes readable when the process has exited.
package final class ProcessExitWatch: Sendable {
    private let lease: DescriptorLease
    private let waiter: ReadinessWaiter
    /// The process watched, if known.
    package let processID: Int32?

    /// Takes ownership of `pidfd`.
    package init(pidfd: Int32, processID: Int32?) {
        self.processID = processID
        lease = DescriptorLease(descriptor: pidfd)
        waiter = ReadinessWaiter(lease: lease, label: "userfaultfd.pidfd.\(pidfd)")
    }

    deinit { cancel() }

    /// Returns true once the process has exited; false when ``cancel()`` ended the wait first.
    package func waitForExit() async -> Bool {
        do {
            try await waiter.waitUntilReadable(timeout: nil)
            return true
        } catch {
            return false
        }
    }

    /// Ends a pending ``waitForExit()`` (it returns false) and closes the pidfd.
    package func cancel() {
        waiter.cancel()
        lease.markClosed()
    }
}

/// A listening Unix stream socket.
///
/// The socket file gets mode 0600 unless told otherwise: whoever can connect is given whatever the server serves.
/// One descriptor is held in reserve: when `accept` fails because the descriptor table is full (`EMFILE`, `ENFILE`),
/// the reserve is closed, the waiting connection accepted and closed at once (its peer sees the connection closed
/// instead of waiting in the backlog forever), and the reserve reopened; ``accept()`` then throws
/// ``DescriptorPassingError/Code/descriptorsExhausted`` so that the caller backs off.
public final class UnixSocketListener: Sendable {
    let lease: DescriptorLease
    private let waiter: ReadinessWaiter
    private let reserve = Mutex<Int32>(-1)
    /// The path it listens on.
    public let path: String

    /// Binds and listens on `path`, replacing a stale socket file there.
    /// - Parameters:
    ///   - path: the socket file's path.
    ///   - backlog: the `listen(2)` backlog: connections the kernel queues before they are accepted.
    ///   - mode: the socket file's permissions (connecting needs write permission on it).
    ///   - group: the socket file's group, if not the process's (e.g. with mode 0660, the group allowed to connect).
    public init(path: String, backlog: Int32 = 64, mode: mode_t = 0o600, group: gid_t? = nil) throws(DescriptorPassingError) {
        let descriptor = cuffd_unix_listen_mode(path, backlog, UInt32(mode), group.map { Int64($0) } ?? -1)
        guard descriptor >= 0 else { throw .system("listen", path: path) }
        self.path = path
        lease = DescriptorLease(descriptor: descriptor)
        waiter = ReadinessWaiter(lease: lease, label: "userfaultfd.listener.\(descriptor)")
        reserve.withLock { $0 = Self.openReserve() }
    }

    deinit { close() }

    private static func openReserve() -> Int32 { open("/dev/null", O_RDONLY | O_CLOEXEC) }

    /// Stops listening and removes the socket file; a pending ``accept()`` throws ``DescriptorPassingError/Code/cancelled``.
    public func close() {
        waiter.cancel()
        if lease.markClosed() { unlink(path) }
        reserve.withLock { descriptor in
            if descriptor >= 0 { _ = Glibc.close(descriptor) }
            descriptor = -1
        }
    }

    /// The next connection.
    /// - Throws: ``DescriptorPassingError/Code/cancelled`` once closed; ``DescriptorPassingError/Code/descriptorsExhausted``
    ///   when the descriptor table is full (one waiting connection was closed; back off before the next call);
    ///   ``DescriptorPassingError/Code/system`` for other errors.
    public func accept() async throws(DescriptorPassingError) -> UnixSocketConnection {
        while true {
            try await waiter.waitUntilReadable(timeout: nil)
            guard lease.acquire() else { throw DescriptorPassingError(.cancelled, operation: "accept", detail: "the listener is closed") }
            defer { lease.release() }
            let descriptor = cuffd_unix_accept(lease.descriptor)
            let error = Glibc.errno
            if descriptor >= 0 {
                // A reserve lost to a race (another thread took the freed slot) is taken back when there is room.
                reserve.withLock { if $0 < 0 { $0 = Self.openReserve() } }
                return UnixSocketConnection(descriptor: descriptor)
            }
            if error == EAGAIN || error == ECONNABORTED || error == EINTR { continue }
            guard error == EMFILE || error == ENFILE else { throw DescriptorPassingError(.system, operation: "accept", errno: error) }
            let dropped = reserve.withLock { reserve -> Bool in
                if reserve >= 0 { _ = Glibc.close(reserve) }
                let victim = cuffd_unix_accept(lease.descriptor)
                if victim >= 0 { _ = Glibc.close(victim) }
                reserve = Self.openReserve()
                return victim >= 0
            }
            throw DescriptorPassingError(.descriptorsExhausted, operation: "accept", errno: error,
                                         detail: dropped ? "one waiting connection was closed" : "no descriptor to spare")
        }
    }
}

/// Waits, asynchronously, until a descriptor is readable: a one-shot Dispatch source per wait, one wait at a time.
final class ReadinessWaiter: Sendable {
    private let lease: DescriptorLease
    private let queue: DispatchQueue
    private let state = Mutex(State())

    private struct State {
        var cancelled = false
        var nextID = 0
        var pending: Pending?
    }

    private struct Pending {
        let id: Int
        let source: any DispatchSourceRead
        let done: @Sendable (Result<Void, DescriptorPassingError>) -> Void
    }

    init(lease: DescriptorLease, label: String) {
        self.lease = lease
        self.queue = DispatchQueue(label: label)
    }

    /// Ends the pending wait with ``DescriptorPassingError/Code/cancelled`` and refuses later ones.
    func cancel() {
        state.withLock { $0.cancelled = true }
        resumePending(id: nil, with: DescriptorPassingError(.cancelled, operation: "wait", detail: "closed"))
    }

    func waitUntilReadable(timeout: Duration?) async throws(DescriptorPassingError) {
        let result: Result<Void, DescriptorPassingError> = await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<Void, DescriptorPassingError>, Never>) in
                start(timeout: timeout) { continuation.resume(returning: $0) }
            }
        } onCancel: {
            self.resumePending(id: nil, with: DescriptorPassingError(.cancelled, operation: "wait", detail: "task cancelled"))
        }
        try result.get()
    }

    private func start(timeout: Duration?, _ done: @escaping @Sendable (Result<Void, DescriptorPassingError>) -> Void) {
        guard lease.acquire() else {
            done(.failure(DescriptorPassingError(.cancelled, operation: "wait", detail: "closed")))
            return
        }
        let id = state.withLock { state -> Int? in
            guard !state.cancelled, state.pending == nil else { return nil }
            state.nextID += 1
            let id = state.nextID
            let source = DispatchSource.makeReadSource(fileDescriptor: lease.descriptor, queue: queue)
            source.setEventHandler { [weak self] in self?.resumePending(id: id, with: nil) }
            source.setCancelHandler { [lease] in lease.release() }
            state.pending = Pending(id: id, source: source, done: done)
            source.resume()
            return id
        }
        guard let id else {
            lease.release()
            done(.failure(DescriptorPassingError(.cancelled, operation: "wait", detail: "closed, or another wait is pending")))
            return
        }
        if Task.isCancelled {
            resumePending(id: id, with: DescriptorPassingError(.cancelled, operation: "wait", detail: "task cancelled"))
        }
        if let timeout {
            queue.asyncAfter(deadline: .now() + timeout.timeInterval) { [weak self] in
                self?.resumePending(id: id, with: DescriptorPassingError(.timedOut, operation: "wait", detail: "nothing within \(timeout)"))
            }
        }
    }

    /// Ends the pending wait `id` (or whichever is pending, for nil) with success (`nil`) or an error.
    private func resumePending(id: Int?, with error: DescriptorPassingError?) {
        let pending = state.withLock { state -> Pending? in
            guard let pending = state.pending, id == nil || pending.id == id else { return nil }
            state.pending = nil
            return pending
        }
        guard let pending else { return }
        pending.source.cancel()
        pending.done(error.map { .failure($0) } ?? .success(()))
    }
}
