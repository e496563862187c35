import Dispatch
import Foundation
import Glibc
import Userfaultfd

/// `uffd serve --socket PATH --memory FILE`: a Firecracker-compatible page server until SIGINT or SIGTERM.
public struct ServeCommand: Sendable {
    public var socketPath: String
    public var memoryFilePath: String
    public var readahead: ReadaheadPolicy

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
        let server = try FirecrackerPageServer(.init(
            socketPath: socketPath, memoryFilePath: memoryFilePath,
            resolverOptions: .init(readahead: readahead, afterRemove: .zeroFill), log: log))
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
