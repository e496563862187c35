import Glibc
import Synchronization
@_spi(Decoding) import Userfaultfd

/// A page-fault handler for Firecracker-compatible VMMs restoring snapshots lazily (the "Uffd" memory backend).
///
/// It listens on a Unix stream socket. Each VMM connects, sends one message — a JSON list of its guest memory regions
/// (``GuestMemoryRegion``) and its userfaultfd — and from then on every page fault of that VM is served from the snapshot
/// memory file: the region's page (4 KiB, or 2 MiB for huge pages) at `offset + (address - base)`. Pages removed by the
/// balloon (REMOVE events) fault back in as zeros. Several VMs are served at once, each with its own resolver and
/// statistics, isolated from the others: a broken or malicious peer gets a typed error in the log and its connection
/// closed, and the other VMs never notice.
///
/// ```swift
/// let server = try FirecrackerPageServer(.init(socketPath: "/tmp/uffd.sock", memoryFilePath: "snapshot.mem"))
/// await server.run()          // until server.shutdown()
/// ```
///
/// ## A session lasts as long as the VMM's process
/// Firecracker 1.12 and later keep the socket open; earlier versions close it right after the handshake (they keep
/// their own copy of the userfaultfd). So the end of the socket does not end a session: the server holds a pidfd for
/// the peer (`SO_PEERPIDFD`, or `pidfd_open(2)` on its `SO_PEERCRED` pid) taken when it connects, and lets the VM go
/// — closing its userfaultfd and dropping its resolver — when that process has exited and the userfaultfd's address
/// space is gone too (`UserfaultFD.addressSpaceHasExited(probing:)`; a peer that passed on another process's
/// userfaultfd does not take that VM with it). Without pidfds (Linux before 5.3) it probes the userfaultfd about
/// once a second instead.
///
/// ## Who may connect
/// Whoever can connect gets the whole snapshot. The socket file is created with mode 0600 (``Configuration/socketMode``;
/// e.g. 0660 with ``Configuration/socketGroup`` for a group), and ``Configuration/allowedUserIDs`` /
/// ``Configuration/allowedGroupIDs`` check the peer's `SO_PEERCRED` credentials: a refused peer gets a log line and
/// its connection closed, and is served nothing.
///
/// ## Limits
/// At most ``Configuration/maximumSessions`` VMs are connected at once, of which at most
/// ``Configuration/maximumPendingHandshakes`` have not sent their handshake yet; a peer beyond either limit is refused
/// (a log line, the connection closed). The limit is also held under what `RLIMIT_NOFILE` allows, with descriptors
/// kept in reserve: a full descriptor table does not end the accept loop (the server backs off and keeps accepting),
/// and libdispatch, which needs a descriptor to manage its threads, is never starved of one.
///
/// ## A memory file that changes under the server
/// Pages are read with `pread(2)`, never from a mapping: a file truncated while it is served costs the reads past
/// its new end — the VM gets the resolver's `FailurePolicy` (SIGBUS by default), and a log line — never the server.
public final class FirecrackerPageServer: Sendable {
    /// How a server runs.
    public struct Configuration: Sendable {
        /// The Unix socket to listen on (a stale socket file there is replaced).
        public var socketPath: String
        /// The snapshot memory file.
        public var memoryFilePath: String
        /// How each VM's faults are resolved. Defaults: removed pages fault in as zeros, adaptive readahead.
        public var resolverOptions: FaultResolver.Options
        /// How long a VMM has to send its handshake after connecting.
        public var handshakeTimeout: Duration
        /// The socket file's permissions. Default 0600: only this user (and root) can connect.
        public var socketMode: mode_t
        /// The socket file's group, e.g. with ``socketMode`` 0660 the group whose members may connect; `nil` keeps
        /// the process's group.
        public var socketGroup: gid_t?
        /// Peers (by `SO_PEERCRED` user id) that are served; `nil` with ``allowedGroupIDs`` `nil`: any peer that can
        /// connect. A peer is served when its user id or its group id is allowed.
        public var allowedUserIDs: Set<UInt32>?
        /// Peers (by `SO_PEERCRED` group id) that are served; see ``allowedUserIDs``.
        public var allowedGroupIDs: Set<UInt32>?
        /// VMs connected at once (handshaking or served); `nil`: as many as `RLIMIT_NOFILE` allows. A larger number
        /// is lowered to what `RLIMIT_NOFILE` allows (with a log line).
        public var maximumSessions: Int?
        /// Connections that have not sent their handshake yet, at once.
        public var maximumPendingHandshakes: Int
        /// How many disconnected VMs ``FirecrackerPageServer/vms`` remembers (the newest).
        public var finishedHistory: Int
        /// Where log lines go.
        public var log: @Sendable (String) -> Void
        /// Whether to watch the peer's process with a pidfd (false: only probe its address space, as on kernels
        /// without pidfds; for tests).
        package var watchesPeerProcess = true

        /// A configuration; only the socket and the memory file are required.
        public init(
            socketPath: String,
            memoryFilePath: String,
            resolverOptions: FaultResolver.Options = FaultResolver.Options(afterRemove: .zeroFill),
            handshakeTimeout: Duration = .seconds(5),
            socketMode: mode_t = 0o600,
            socketGroup: gid_t? = nil,
            allowedUserIDs: Set<UInt32>? = nil,
            allowedGroupIDs: Set<UInt32>? = nil,
            maximumSessions: Int? = nil,
            maximumPendingHandshakes: Int = 16,
            finishedHistory: Int = 1024,
            log: @escaping @Sendable (String) -> Void = { print($0) }
        ) {
            self.socketPath = socketPath
            self.memoryFilePath = memoryFilePath
            self.resolverOptions = resolverOptions
            self.handshakeTimeout = handshakeTimeout
            self.socketMode = socketMode
            self.socketGroup = socketGroup
            self.allowedUserIDs = allowedUserIDs
            self.allowedGroupIDs = allowedGroupIDs
            self.maximumSessions = maximumSessions
            self.maximumPendingHandshakes = maximumPendingHandshakes
            self.finishedHistory = finishedHistory
            self.log = log
        }

        /// Whether a peer with these credentials may be served.
        public func allows(_ peer: PeerCredentials) -> Bool {
            if allowedUserIDs == nil && allowedGroupIDs == nil { return true }
            return allowedUserIDs?.contains(peer.userID) == true || allowedGroupIDs?.contains(peer.groupID) == true
        }
    }

    /// What the server knows of one VM.
    public struct VMStatus: Sendable {
        /// The server's number for the connection (1, 2, ...).
        public var id: Int
        /// The VMM's process id, from the socket's credentials.
        public var processID: Int32?
        /// Its guest memory regions (empty until the handshake is accepted).
        public var regions: [GuestMemoryRegion]
        /// Its resolver's counters.
        public var statistics: FaultResolver.Statistics
        /// Whether it is still served: its VMM has not exited (its socket may be closed: see the type's notes).
        public var isConnected: Bool
    }

    /// How this server runs.
    public let configuration: Configuration
    private let listener: UnixSocketListener
    private let provider: MappedFileProvider
    private let memorySize: Int
    /// ``Configuration/maximumSessions``, held under what `RLIMIT_NOFILE` allows.
    private let sessionLimit: Int
    private let state = Mutex(State())

    private struct State {
        var nextID = 0
        var sessions: [Int: Session] = [:]
        var finished: [VMStatus] = []
        var shutDown = false
    }

    /// One connected VM.
    private struct Session: Sendable {
        let id: Int
        let connection: UnixSocketConnection
        var processID: Int32?
        var exitWatch: ProcessExitWatch?
        var regions: [GuestMemoryRegion] = []
        var resolver: FaultResolver?
    }

    /// Descriptors a VM holds: its socket, its userfaultfd, the pidfd of its VMM, and one to spare.
    static let descriptorsPerSession = 4
    /// Descriptors never handed to VMs: for the runtime, libdispatch's thread management, the memory file, logs.
    static let reservedDescriptors = 32

    /// The most sessions the soft `RLIMIT_NOFILE` leaves room for.
    static func sessionsAllowedByDescriptorLimit() -> Int {
        var limit = rlimit()
        // (RLIM_INFINITY is all ones: above Int.max too.)
        guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &limit) == 0, limit.rlim_cur < UInt(Int.max) else { return Int.max }
        return max(1, (Int(limit.rlim_cur) - reservedDescriptors) / descriptorsPerSession)
    }

    /// Opens the memory file and starts listening.
    /// - Throws: `UserfaultError` if the memory file cannot be opened, `DescriptorPassingError` if the socket cannot
    ///   be bound.
    public init(_ configuration: Configuration) throws {
        self.configuration = configuration
        let mapping = try FileMapping(path: configuration.memoryFilePath)
        provider = MappedFileProvider(mapping: mapping)
        memorySize = mapping.size
        let allowed = Self.sessionsAllowedByDescriptorLimit()
        sessionLimit = min(configuration.maximumSessions ?? allowed, allowed)
        if let wanted = configuration.maximumSessions, wanted > allowed {
            configuration.log("maximum sessions lowered from \(wanted) to \(allowed): RLIMIT_NOFILE leaves room for no more")
        }
        listener = try UnixSocketListener(path: configuration.socketPath, mode: configuration.socketMode,
                                          group: configuration.socketGroup)
    }

    /// Accepts and serves VMs until ``shutdown()``.
    public func run() async {
        configuration.log("serving \(configuration.memoryFilePath) (\(memorySize) bytes) on \(configuration.socketPath)"
                          + " (at most \(sessionLimit) VMs)")
        await withDiscardingTaskGroup { group in
            while true {
                let connection: UnixSocketConnection
                do throws(DescriptorPassingError) {
                    connection = try await listener.accept()
                } catch {
                    guard await backOff(after: error) else { break }
                    continue
                }
                guard let session = admit(connection) else {
                    connection.close()
                    continue
                }
                group.addTask { await self.serve(session) }
            }
        }
        configuration.log("server stopped")
    }

    /// After a failed accept: logs, waits a little and returns true to keep accepting, or false to stop.
    private func backOff(after error: DescriptorPassingError) async -> Bool {
        switch error.code {
        case .cancelled:
            return false
        case .system where [EBADF, EINVAL, ENOTSOCK, EOPNOTSUPP].contains(error.errno ?? 0):
            configuration.log("accept failed: \(error); not listening any more")
            return false
        default:
            configuration.log("accept failed: \(error); retrying in 100 ms")
            try? await Task.sleep(for: .milliseconds(100))
            return !state.withLock { $0.shutDown }
        }
    }

    /// Registers a new connection as a session if it may be served: its peer allowed, and under the limits. Logs a
    /// refusal and returns nil. (Registered here, in the accept loop, so that a burst of connections is counted.)
    private func admit(_ connection: UnixSocketConnection) -> Session? {
        let peer = connection.peerCredentials
        let who = peer.map { "pid \($0.processID.map(String.init) ?? "?") uid \($0.userID) gid \($0.groupID)" } ?? "unknown peer"
        let restricted = configuration.allowedUserIDs != nil || configuration.allowedGroupIDs != nil
        guard peer.map(configuration.allows) ?? !restricted else {
            configuration.log("refused connection from \(who): not an allowed user or group")
            return nil
        }
        // Taken now, while the peer is certainly the process that connected (a pid alone could be reused).
        let exitWatch = configuration.watchesPeerProcess ? connection.watchPeerProcess() : nil
        let admitted = state.withLock { state -> Result<Session, Refusal> in
            if state.shutDown { return .failure(Refusal(reason: nil)) }
            if state.sessions.count >= sessionLimit {
                return .failure(Refusal(reason: "\(state.sessions.count) VMs connected (limit \(sessionLimit))"))
            }
            let pending = state.sessions.values.count { $0.resolver == nil }
            let pendingLimit = min(configuration.maximumPendingHandshakes, sessionLimit)
            if pending >= pendingLimit { return .failure(Refusal(reason: "\(pending) handshakes pending (limit \(pendingLimit))")) }
            state.nextID += 1
            let session = Session(id: state.nextID, connection: connection, processID: peer?.processID, exitWatch: exitWatch)
            state.sessions[session.id] = session
            return .success(session)
        }
        switch admitted {
        case .success(let session):
            return session
        case .failure(let refusal):
            exitWatch?.cancel()
            if let reason = refusal.reason { configuration.log("refused connection from \(who): \(reason)") }
            return nil
        }
    }

    private struct Refusal: Error {
        /// nil: the server is shutting down.
        let reason: String?
    }

    /// Stops accepting, disconnects every VM (their userfaultfds are closed on this side) and ends ``run()``.
    public func shutdown() {
        let sessions = state.withLock { state -> [Session] in
            state.shutDown = true
            return Array(state.sessions.values)
        }
        listener.close()
        for session in sessions { Self.release(session) }
    }

    /// Every VM served so far, connected or not (the newest ``Configuration/finishedHistory`` disconnected ones), by id.
    public var vms: [VMStatus] {
        state.withLock { state in
            let live = state.sessions.values.map { session in
                VMStatus(id: session.id, processID: session.processID, regions: session.regions,
                         statistics: session.resolver?.statistics ?? FaultResolver.Statistics(), isConnected: true)
            }
            return (state.finished + live).sorted { $0.id < $1.id }
        }
    }

    private func serve(_ session: Session) async {
        let (id, connection, exitWatch) = (session.id, session.connection, session.exitWatch)
        let log = configuration.log
        let name = "vm \(id)" + (session.processID.map { " (pid \($0))" } ?? "")
        log("\(name): connected")
        defer { end(id, name: name) }
        let resolver: FaultResolver
        let regions: [GuestMemoryRegion]
        do {
            let (uffd, body) = try await UserfaultFD.receive(
                from: connection, enabledFeatures: [.eventRemove], timeout: configuration.handshakeTimeout)
            do {
                regions = try GuestMemoryRegion.parse(body, memoryFileSize: memorySize)
            } catch {
                uffd.close()
                throw error
            }
            resolver = FaultResolver(uffd: uffd, options: configuration.resolverOptions)
            for region in regions {
                try await resolver.serve(region.range, provider: provider, providerOffset: region.offset, pageSize: region.pageSize)
            }
            let accepted = state.withLock { state -> Bool in
                guard !state.shutDown, state.sessions[id] != nil else { return false }
                state.sessions[id]?.regions = regions
                state.sessions[id]?.resolver = resolver
                return true
            }
            guard accepted else {
                uffd.close()
                return
            }
            try resolver.start()
            log("\(name): serving \(regions.count) region(s): " + regions.map(\.description).joined(separator: "; "))
        } catch {
            log("\(name): handshake rejected: \(error)")
            return
        }
        // Provider failures (a memory file truncated under the server) cost the VM its failure policy: say so.
        let failures = Task { [errors = resolver.errors] in
            for await failure in errors { log("\(name): \(failure)") }
        }
        defer { failures.cancel() }
        // Firecracker sends nothing after the handshake. 1.12+ keeps the socket open until it exits; earlier versions
        // close it at once. Either way the VM lives until its process exits.
        await connection.waitForHangUp { message in
            log("\(name): ignored \(message.payload.count) unexpected byte(s) and \(message.descriptors.count) descriptor(s) after the handshake")
        }
        connection.close()
        // The pidfd says when the process that connected exits. Its address space is then checked too (at once, and
        // about once a second if it lives on): a peer that handed over another process's userfaultfd must not take
        // that VM down with it. Without a pidfd, only the address space is watched.
        var exited = await exitWatch?.waitForExit() ?? true
        if exited {
            exited = await waitUntilAddressSpaceExits(resolver.uffd, probing: regions.first?.range.start, session: id)
        }
        log("\(name): disconnected" + (exited ? " (the VMM exited)" : "") + "; \(resolver.statistics)")
    }

    /// Probes the userfaultfd (at once, then about once a second) until its address space is gone (true), or the
    /// session is ended by ``shutdown()`` (false).
    private func waitUntilAddressSpaceExits(_ uffd: UserfaultFD, probing page: UInt?, session id: Int) async -> Bool {
        guard let page else { return true }
        while state.withLock({ !$0.shutDown && $0.sessions[id] != nil }) {
            if uffd.addressSpaceHasExited(probing: page) { return true }
            try? await Task.sleep(for: .seconds(1))
        }
        return false
    }

    private func end(_ id: Int, name: String) {
        let session = state.withLock { state -> Session? in
            guard let session = state.sessions.removeValue(forKey: id) else { return nil }
            state.finished.append(VMStatus(id: id, processID: session.processID, regions: session.regions,
                                           statistics: session.resolver?.statistics ?? FaultResolver.Statistics(), isConnected: false))
            let excess = state.finished.count - max(0, configuration.finishedHistory)
            if excess > 0 { state.finished.removeFirst(excess) }
            return session
        }
        if let session { Self.release(session) }
    }

    /// Closes what a session holds: the userfaultfd (on this side), the socket, the pidfd.
    private static func release(_ session: Session) {
        session.resolver?.uffd.close()
        session.connection.close()
        session.exitWatch?.cancel()
    }
}
