import Synchronization

/// Hands every element to each of its subscribers: one `AsyncStream` per subscription, so several observers can watch
/// the same source, and one that stops (breaks, or its task is cancelled) ends only its own stream.
///
/// Elements yielded while nobody subscribes are kept (the newest `backlogLimit`) and go to the next subscriber, so a
/// single observer that subscribes late still sees what happened before. After ``finish()`` a new subscription gets
/// that backlog, then ends.
final class ErrorBroadcast<Element: Sendable>: Sendable {
    private struct State {
        var subscribers: [Int: AsyncStream<Element>.Continuation] = [:]
        var nextID = 0
        var backlog: [Element] = []
        var finished = false
    }

    private let state = Mutex(State())
    /// What a subscriber's stream buffers when it lags, and the backlog kept for the next subscriber.
    let backlogLimit: Int

    init(backlogLimit: Int) {
        self.backlogLimit = backlogLimit
    }

    /// A new stream of every element yielded from now on (after the backlog, if nobody was subscribed).
    func subscribe() -> AsyncStream<Element> {
        let (stream, continuation) = AsyncStream<Element>.makeStream(bufferingPolicy: .bufferingNewest(backlogLimit))
        // Under the lock: the backlog and the registration, so no element falls between them. The continuation's
        // calls happen outside it: `finish()` runs `onTermination`, which takes the lock again.
        let (backlog, finished) = state.withLock { state -> ([Element], Bool) in
            let backlog = state.backlog
            state.backlog.removeAll()
            if !state.finished {
                let id = state.nextID
                state.nextID += 1
                state.subscribers[id] = continuation
                continuation.onTermination = { [weak self] _ in self?.unsubscribe(id) }
            }
            return (backlog, state.finished)
        }
        for element in backlog { continuation.yield(element) }
        if finished { continuation.finish() }
        return stream
    }

    /// Gives `element` to every subscriber, or keeps it for the next one when there is none.
    func yield(_ element: Element) {
        let subscribers = state.withLock { state -> [AsyncStream<Element>.Continuation] in
            guard !state.finished else { return [] }
            if state.subscribers.isEmpty {
                state.backlog.append(element)
                if state.backlog.count > backlogLimit { state.backlog.removeFirst(state.backlog.count - backlogLimit) }
            }
            return Array(state.subscribers.values)
        }
        for subscriber in subscribers { subscriber.yield(element) }
    }

    /// Ends every stream, and every later subscription after its backlog.
    func finish() {
        let subscribers = state.withLock { state -> [AsyncStream<Element>.Continuation] in
            state.finished = true
            defer { state.subscribers.removeAll() }
            return Array(state.subscribers.values)
        }
        for subscriber in subscribers { subscriber.finish() }
    }

    private func unsubscribe(_ id: Int) {
        _ = state.withLock { $0.subscribers.removeValue(forKey: id) }
    }
}
