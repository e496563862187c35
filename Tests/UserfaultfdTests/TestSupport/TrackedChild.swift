import CUserfaultfdTestSupport
import Glibc
import Testing
import Userfaultfd

/// A child process (a raw clone running only system calls) that maps `pageCount` pages, registers them write-protect
/// on a userfaultfd of its own, and then writes the pages it is told to over `commandFD` (a `UInt32` page index each,
/// `UInt32.max` to exit), acknowledging each with a byte on `replyFD`. Its userfaultfd reaches this process either
/// copied in with pidfd_getfd, or handed over by the child itself over the reply socket (SCM_RIGHTS, received with
/// ``UserfaultFD/receive(from:enabledFeatures:maximumPayload:timeout:)``).
struct TrackedChild {
    let pid: pid_t
    let commandFD: Int32
    let replyFD: Int32
    /// This process's descriptor for the child's userfaultfd (tracked by the scope).
    let uffd: UserfaultFD
    /// The child's registered pages.
    let range: MemoryRange

    static func spawn(
        _ scope: FaultScope, pageCount: Int, features: UserfaultFeatures, handOver: Bool = false
    ) async throws -> TrackedChild {
        // The clone sleeps in the kernel while another test's EVENT_FORK userfaultfd has not read its FORK event:
        // never on a pool thread.
        let spawner = OffPoolThread(name: "uffd-track-spawn") { () -> (pid: pid_t, command: Int32, reply: Int32, errno: Int32) in
            var commandFD: Int32 = -1, replyFD: Int32 = -1
            let pid = cuffd_test_spawn_tracked_child(pageCount, features.rawValue, handOver ? 1 : 0, &commandFD, &replyFD)
            return (pid, commandFD, replyFD, errno)
        }
        let (pid, commandFD, replyFD, spawnErrno) = await spawner.value
        guard pid > 0 else { throw TestFailure("clone failed: \(spawnErrno)") }
        scope.track(child: pid)
        do {
            if handOver {
                // The connection gets a descriptor of its own (it closes it); the child keeps using replyFD for acks.
                let connection = UnixSocketConnection(descriptor: dup(replyFD))
                defer { connection.close() }
                let (uffd, payload) = try await UserfaultFD.receive(from: connection, enabledFeatures: features,
                                                                    maximumPayload: 16, timeout: .seconds(10))
                scope.track(uffd)
                try #require(payload.count == 16, "hello of \(payload.count) bytes")
                let address = payload[0..<8].enumerated().reduce(UInt(0)) { $0 | UInt($1.element) << (8 * $1.offset) }
                return TrackedChild(pid: pid, commandFD: commandFD, replyFD: replyFD, uffd: uffd,
                                    range: MemoryRange(start: address, length: pageCount * systemPageSize))
            }
            #expect(await waitReadable(replyFD, seconds: 10))
            var address: UInt64 = 0, childUFFD: Int32 = -1
            let status = cuffd_test_read_child_hello(replyFD, &address, &childUFFD)
            try #require(status == 0, "the child failed to set up (\(status))")
            let descriptor = cuffd_test_pidfd_getfd(pid, childUFFD)
            try #require(descriptor >= 0, "pidfd_getfd: \(errno)")
            let uffd = scope.track(try UserfaultFD(adopting: descriptor, enabledFeatures: features))
            return TrackedChild(pid: pid, commandFD: commandFD, replyFD: replyFD, uffd: uffd,
                                range: MemoryRange(start: UInt(address), length: pageCount * systemPageSize))
        } catch {
            close(commandFD)
            close(replyFD)
            throw error
        }
    }

    /// Tells the child to exit.
    func quit() {
        var quit = UInt32.max
        _ = Glibc.write(commandFD, &quit, 4)
    }

    func closePipes() {
        close(commandFD)
        close(replyFD)
    }
}
