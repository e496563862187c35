import Dispatch
import Foundation
import Glibc
import Userfaultfd
import UserfaultfdFirecracker

/// `uffd serve --socket PATH --memory FILE`: a Firecracker-compatible page server until SIGINT or SIGTERM.
///
/// Access: the socket is created 0600 (`--socket-mode`, `--socket-group` for a group), and `--allow-uid` /
/// `--allow-gid` restrict who is served by the peer's credentials. Limits: `--max-sessions` VMs at once (held under
/// what RLIMIT_NOFILE allows; the soft limit is raised to the hard one at start), `--max-handshakes` of them still
/// handshaking, each given `--handshake-timeout` seconds.
public struct ServeCommand: Sendable {
    public var socketPath: String
    public var memoryFilePath: String
    public var readahead: ReadaheadPolicy
    /// The socket file's permissions (default 0600).
    public var socketMode: mode_t = 0o600
    /// The socket file's group, if not the process's.
    public var socketGroup: gid_t?
    /// Peers served, by user id (nil, with `allowedGroupIDs` nil: anyone who can connect).
    public var allowedUserIDs: Set<UInt32>?
    /// Peers served, by group id.
    public var allowedGroupIDs: Set<UInt32>?
    /// VMs at once (nil: as many as RLIMIT_NOFILE allows).
    public var maximumSessions: Int?
    /// Connections still handshaking at once.
    public var maximumPendingHandshakes = 16
    /// How long a VMM has to send its handshake.
    public var handshakeTimeout: Duration = .seconds(5)

    public init(socketPath: String, memoryFilePath: String, readahead: ReadaheadPolicy = .default) {
        self.socketPath = socketPath
        self.memoryFilePath = memoryFilePath
        self.readahead = readahead
    }

    /// Serves until a signal arrives, then prints each VM's statistics.
    public func run() async throws {
        let log: @Sendable (String) -> Void = { line in
            FileHandle.standardError.write(Data("uffd serve: \(line)\n".utf8))
        }
        Self.raiseDescriptorLimit(log: log)
        let server = try FirecrackerPageServer(.init(
            socketPath: socketPath, memoryFilePath: memoryFilePath,
            resolverOptions: .init(readahead: readahead, afterRemove: .zeroFill), handshakeTimeout: handshakeTimeout,
            socketMode: socketMode, socketGroup: socketGroup, allowedUserIDs: allowedUserIDs, allowedGroupIDs: allowedGroupIDs,
            maximumSessions: maximumSessions, maximumPendingHandshakes: maximumPendingHandshakes, log: log))
        let signals = Self.onTermination {
            log("signal received, shutting down")
            server.shutdown()
        }
        await server.run()
        signals.forEach { $0.cancel() }
        for vm in server.vms {
            print("vm \(vm.id) pid \(vm.processID.map(String.init) ?? "?"): \(vm.regions.count) region(s); \(vm.statistics)")
        }
    }

    /// Raises the soft RLIMIT_NOFILE to the hard limit: each VM holds a few descriptors.
    static func raiseDescriptorLimit(log: (String) -> Void) {
        var limit = rlimit()
        let resource = Int32(RLIMIT_NOFILE.rawValue)
        guard getrlimit(resource, &limit) == 0, limit.rlim_cur < limit.rlim_max else { return }
        let soft = limit.rlim_cur
        limit.rlim_cur = limit.rlim_max
        if setrlimit(resource, &limit) == 0 { log("descriptor limit raised from \(soft) to \(limit.rlim_max)") }
    }

    /// Runs `handler` once on SIGINT or SIGTERM (instead of the default, which would kill the process mid-fault).
    /// Built here, in nonisolated code: a Dispatch handler created in a @MainActor context traps on another queue.
    static func onTermination(_ handler: @escaping @Sendable () -> Void) -> [any DispatchSourceSignal] {
        let queue = DispatchQueue(label: "uffd.serve.signals")
        return [SIGINT, SIGTERM].map { number in
            signal(number, SIG_IGN)
            let source = DispatchSource.makeSignalSource(signal: number, queue: queue)
            source.setEventHandler(handler: handler)
            source.resume()
            return source
        }
    }
}
