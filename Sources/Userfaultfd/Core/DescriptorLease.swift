import Glibc
import Synchronization

/// Reference-counted ownership of one file descriptor.
///
/// `close()` from one thread must never let an ioctl on another thread land on a *reused* descriptor number, and the
/// Dispatch source reading the descriptor must be cancelled before the descriptor goes away. So every user takes a
/// lease (``acquire()`` / ``release()``), the owner holds one until ``markClosed()``, and the descriptor is closed when the
/// last lease is returned.
final class DescriptorLease: Sendable {
    let descriptor: Int32
    private let state = Mutex(State())

    private struct State {
        var closed = false
        var leases = 1  // the owner's
    }

    init(descriptor: Int32) {
        self.descriptor = descriptor
    }

    /// Takes a lease; returns false once the owner has closed.
    func acquire() -> Bool {
        state.withLock { state in
            guard !state.closed else { return false }
            state.leases += 1
            return true
        }
    }

    /// Returns a lease; closes the descriptor when it was the last.
    func release() {
        let last = state.withLock { state -> Bool in
            state.leases -= 1
            return state.leases == 0
        }
        if last { _ = Glibc.close(descriptor) }
    }

    /// Marks the descriptor closed (no new leases) and returns the owner's lease. Returns false if already closed.
    @discardableResult
    func markClosed() -> Bool {
        let first = state.withLock { state -> Bool in
            guard !state.closed else { return false }
            state.closed = true
            return true
        }
        if first { release() }
        return first
    }

    var isClosed: Bool { state.withLock { $0.closed } }

    /// Runs `body` with the descriptor under a lease, or throws ``UserfaultError/Code/closed``.
    @inline(__always)
    func withDescriptor<Result>(
        _ operation: UserfaultError.Operation,
        range: MemoryRange? = nil,
        _ body: (Int32) throws(UserfaultError) -> Result
    ) throws(UserfaultError) -> Result {
        guard acquire() else { throw UserfaultError(.closed, operation: operation, range: range) }
        defer { release() }
        return try body(descriptor)
    }
}
