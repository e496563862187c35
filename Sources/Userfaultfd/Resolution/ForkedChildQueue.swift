import Synchronization

/// The userfaultfds of forked children waiting for a consumer of ``FaultResolver/forkedChildren``.
///
/// Each FORK event installs a descriptor in this process, so an unbounded buffer nobody reads would leak one per fork.
/// At most ``limit`` wait here: when another arrives, the oldest is closed (its child's faults then fall back to
/// ordinary memory, as for any closed userfaultfd). Once the resolver's reader has stopped, those still waiting are
/// closed and consumers see the end.
package final class ForkedChildQueue: Sendable {
    /// Children kept at most for a consumer that has not come yet.
    let limit: Int

    private struct State {
        var buffer: [UserfaultFD] = []
        var waiters: [(id: Int, continuation: UnsafeContinuation<UserfaultFD?, Never>)] = []
        var nextWaiterID = 0
        var finished = false
    }

    private let state = Mutex(State())

    package init(limit: Int) {
        precondition(limit > 0, "the limit must be positive")
        self.limit = limit
    }

    /// Hands `child` to a waiting consumer, or keeps it. Returns the number of children closed to make room (or because
    /// the queue is finished): 0 or 1.
    @discardableResult
    package func offer(_ child: UserfaultFD) -> Int {
        enum Outcome { case handed(UnsafeContinuation<UserfaultFD?, Never>), kept, dropped(UserfaultFD) }
        let outcome = state.withLock { state -> Outcome in
            if state.finished { return .dropped(child) }
            if !state.waiters.isEmpty { return .handed(state.waiters.removeFirst().continuation) }
            state.buffer.append(child)
            return state.buffer.count > limit ? .dropped(state.buffer.removeFirst()) : .kept
        }
        switch outcome {
        case .handed(let continuation):
            continuation.resume(returning: child)
            return 0
        case .kept:
            return 0
        case .dropped(let dropped):
            dropped.close()
            return 1
        }
    }

    /// Closes every child still waiting, ends every consumer's stream; later children are closed as they come.
    package func finish() {
        let (buffered, waiters) = state.withLock { state in
            state.finished = true
            defer {
                state.buffer = []
                state.waiters = []
            }
            return (state.buffer, state.waiters)
        }
        for child in buffered { child.close() }
        for waiter in waiters { waiter.continuation.resume(returning: nil) }
    }

    /// Children waiting now.
    package var count: Int { state.withLock { $0.buffer.count } }

    /// The next child, waiting for one; nil once finished or when the calling task is cancelled.
    package func next() async -> UserfaultFD? {
        let id = state.withLock { state in
            defer { state.nextWaiterID += 1 }
            return state.nextWaiterID
        }
        return await withTaskCancellationHandler {
            await withUnsafeContinuation { (continuation: UnsafeContinuation<UserfaultFD?, Never>) in
                enum Ready { case child(UserfaultFD), end, wait }
                let ready = state.withLock { state -> Ready in
                    if !state.buffer.isEmpty { return .child(state.buffer.removeFirst()) }
                    if state.finished || Task.isCancelled { return .end }
                    state.waiters.append((id, continuation))
                    return .wait
                }
                switch ready {
                case .child(let child): continuation.resume(returning: child)
                case .end: continuation.resume(returning: nil)
                case .wait: break
                }
            }
        } onCancel: {
            let waiter = state.withLock { state -> UnsafeContinuation<UserfaultFD?, Never>? in
                guard let index = state.waiters.firstIndex(where: { $0.id == id }) else { return nil }
                return state.waiters.remove(at: index).continuation
            }
            waiter?.resume(returning: nil)
        }
    }

    /// A stream of the children, for one consumer (each child goes to one of the streams iterated at the time).
    package var stream: AsyncStream<UserfaultFD> {
        AsyncStream(unfolding: { [self] in await next() })
    }
}
