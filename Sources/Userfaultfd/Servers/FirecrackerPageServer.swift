import Synchronization

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
        /// Where log lines go.
        public var log: @Sendable (String) -> Void

        /// A configuration; only the socket and the memory file are required.
        public init(
            socketPath: String,
            memoryFilePath: String,
            resolverOptions: FaultResolver.Options = FaultResolver.Options(afterRemove: .zeroFill),
            handshakeTimeout: Duration = .seconds(5),
            log: @escaping @Sendable (String) -> Void = { print($0) }
        ) {
            self.socketPath = socketPath
            self.memoryFilePath = memoryFilePath
            self.resolverOptions = resolverOptions
            self.handshakeTimeout = handshakeTimeout
            self.log = log
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
        public var statistics: ResolverStatistics
        /// Whether it is still connected.
        public var isConnected: Bool
    }

    /// How this server runs.
    public let configuration: Configuration
    private let listener: UnixSocketListener
    private let provider: MappedFileProvider
    private let memorySize: Int
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
        var regions: [GuestMemoryRegion] = []
        var resolver: FaultResolver?
    }

    /// Maps the memory file and starts listening.
    /// - Throws: ``UserfaultError`` if the memory file cannot be mapped, ``DescriptorPassingError`` if the socket cannot
    ///   be bound.
    public init(_ configuration: Configuration) throws {
        self.configuration = configuration
        let mapping = try FileMapping(path: configuration.memoryFilePath)
        provider = MappedFileProvider(mapping: mapping)
        memorySize = mapping.size
        listener = try UnixSocketListener(path: configuration.socketPath)
    }

    /// Accepts and serves VMs until ``shutdown()``.
    public func run() async {
        configuration.log("serving \(configuration.memoryFilePath) (\(memorySize) bytes) on \(configuration.socketPath)")
        await withDiscardingTaskGroup { group in
            while true {
                let connection: UnixSocketConnection
                do {
                    connection = try await listener.accept()
                } catch let error as DescriptorPassingError {
                    if error.code != .cancelled { configuration.log("accept failed: \(error)") }
                    break
                } catch {
                    configuration.log("accept failed: \(error)")
                    break
                }
                group.addTask { await self.serve(connection) }
            }
        }
        configuration.log("server stopped")
    }

    /// Stops accepting, disconnects every VM (their userfaultfds are closed on this side) and ends ``run()``.
    public func shutdown() {
        let sessions = state.withLock { state -> [Session] in
            state.shutDown = true
            return Array(state.sessions.values)
        }
        listener.close()
        for session in sessions {
            session.resolver?.uffd.close()
            session.connection.close()
        }
    }

    /// Every VM served so far, connected or not, by id.
    public var vms: [VMStatus] {
        state.withLock { state in
            let live = state.sessions.values.map { session in
                VMStatus(id: session.id, processID: session.processID, regions: session.regions,
                         statistics: session.resolver?.statistics ?? ResolverStatistics(), isConnected: true)
            }
            return (state.finished + live).sorted { $0.id < $1.id }
        }
    }

    private func serve(_ connection: UnixSocketConnection) async {
        let processID = connection.peerProcessID
        let id = state.withLock { state -> Int? in
            guard !state.shutDown else { return nil }
            state.nextID += 1
            state.sessions[state.nextID] = Session(id: state.nextID, connection: connection, processID: processID)
            return state.nextID
        }
        guard let id else {
            connection.close()
            return
        }
        let log = configuration.log
        let name = "vm \(id)" + (processID.map { " (pid \($0))" } ?? "")
        log("\(name): connected")
        defer { end(id, name: name) }
        let resolver: FaultResolver
        do {
            let (uffd, body) = try await UserfaultFD.receive(
                from: connection, enabledFeatures: [.eventRemove], timeout: configuration.handshakeTimeout)
            let regions: [GuestMemoryRegion]
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
        // Firecracker sends nothing after the handshake; the VMM closing its end means it exited.
        await connection.waitForHangUp { message in
            log("\(name): ignored \(message.payload.count) unexpected byte(s) and \(message.descriptors.count) descriptor(s) after the handshake")
        }
        log("\(name): disconnected; \(resolver.statistics)")
    }

    private func end(_ id: Int, name: String) {
        let session = state.withLock { state -> Session? in
            guard let session = state.sessions.removeValue(forKey: id) else { return nil }
            state.finished.append(VMStatus(id: id, processID: session.processID, regions: session.regions,
                                           statistics: session.resolver?.statistics ?? ResolverStatistics(), isConnected: false))
            return session
        }
        session?.resolver?.uffd.close()
        session?.connection.close()
    }
}
