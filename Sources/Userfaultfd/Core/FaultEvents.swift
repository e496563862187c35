import Synchronization

extension UserfaultFD {
    /// The events of this userfaultfd, as they are read: page faults and, when enabled, fork, remap, remove and unmap.
    ///
    /// ```swift
    /// for try await event in uffd.events {
    ///     try await resolver.handle(event)
    /// }
    /// ```
    ///
    /// - A dedicated Dispatch source reads the descriptor on its own serial queue, up to 64 messages per `read(2)`, and
    ///   resumes the waiting consumer directly from there: one thread hop from the kernel to your loop.
    /// - No event is dropped. Events read while nobody iterates are kept for the next iteration.
    /// - One consumer at a time: a second iterator that calls `next()` while the first is active throws
    ///   ``UserfaultError/Code/concurrentIteration``.
    /// - Iteration ends (returns `nil`) when the userfaultfd is closed, and when the consuming task is cancelled; a later
    ///   iteration picks up where it stopped. That holds for an iteration started after ``UserfaultFD/close()`` too:
    ///   it gets the events read before the close that nobody consumed, then ends — it does not throw
    ///   ``UserfaultError/Code/closed``.
    /// - A message that cannot be decoded is thrown as a ``UserfaultError`` (``UserfaultError/Code/unknownEvent(_:)``,
    ///   ``UserfaultError/Code/malformedMessage``); iterating again continues with the next message.
    /// - A `read(2)` that fails (`EMFILE`/`ENFILE` while the kernel installs a forked child's userfaultfd, `ENOMEM`) is
    ///   thrown as a ``UserfaultError`` of operation ``UserfaultError/Operation/readEvents`` with its errno, once per run
    ///   of failures; the message stays queued and the reader tries again, backing off from 1 ms to 1 s, so iterating
    ///   again gets it once the read succeeds.
    ///
    /// The loop's task must be able to run while faulting threads are blocked: on a machine with few cores, run it with a
    /// task executor preference for ``eventExecutor`` (or on a thread that never touches registered memory).
    public var events: FaultEvents { FaultEvents(uffd: self) }

    /// The executor of the event reader's serial queue. Actors that resolve this userfaultfd's faults can use it as their
    /// serial executor, and tasks can prefer it, so that resolution never waits for a cooperative-pool thread.
    public var eventExecutor: QueueExecutor { reader.executor }

    /// The channel behind ``events``, created on first use and attached to the reader for the userfaultfd's life.
    /// Once the userfaultfd is closed the channel is finished: it still hands out what was read before, then ends.
    func eventChannel() throws(UserfaultError) -> EventChannel {
        let channel = channelStorage.withLock { storage -> EventChannel in
            if let channel = storage { return channel }
            let channel = EventChannel()
            storage = channel
            return channel
        }
        do {
            try reader.attach(channel)
        } catch where error.code == .closed {
            // The reader's cancel handler finishes an attached channel; one never attached is finished here. (Finishing
            // twice does nothing.)
            channel.finish(nil)
        }
        return channel
    }
}

/// The asynchronous sequence of a userfaultfd's events. See ``UserfaultFD/events``.
public struct FaultEvents: AsyncSequence, Sendable {
    public typealias Element = FaultEvent
    public typealias Failure = UserfaultError

    let uffd: UserfaultFD

    public func makeAsyncIterator() -> Iterator {
        Iterator(uffd: uffd)
    }

    /// Iterates ``UserfaultFD/events``. Only one iterator at a time may consume them.
    public struct Iterator: AsyncIteratorProtocol {
        public typealias Element = FaultEvent
        public typealias Failure = UserfaultError

        let uffd: UserfaultFD
        private var claim: ConsumerClaim?
        private var ended = false

        init(uffd: UserfaultFD) {
            self.uffd = uffd
        }

        public mutating func next() async throws(UserfaultError) -> FaultEvent? {
            try await next(isolation: nil)
        }

        public mutating func next(isolation actor: isolated (any Actor)?) async throws(UserfaultError) -> FaultEvent? {
            if ended { return nil }
            if claim == nil {
                let channel = try uffd.eventChannel()
                claim = try channel.claim()
            }
            guard let claim else { return nil }
            switch await claim.channel.next(isolation: actor) {
            case .success(let event)?:
                return event
            case .failure(let error)?:
                throw error
            case nil:
                ended = true
                self.claim = nil  // lets a later iteration consume what is left
                return nil
            }
        }
    }
}

/// The right to consume an ``EventChannel``; given back when the iterator that holds it goes away.
final class ConsumerClaim: Sendable {
    let channel: EventChannel
    init(channel: EventChannel) { self.channel = channel }
    deinit { channel.releaseClaim() }
}

/// Buffers events between the reader's queue and one consuming task.
final class EventChannel: FaultEventSink {
    private struct State {
        var buffer: [Result<FaultEvent, UserfaultError>] = []
        var head = 0
        var waiter: Continuation?
        var claimed = false
        var finished = false
        var finishError: UserfaultError?
    }

    private let state = Mutex(State())

    func claim() throws(UserfaultError) -> ConsumerClaim {
        let granted = state.withLock { state -> Bool in
            guard !state.claimed else { return false }
            state.claimed = true
            return true
        }
        guard granted else {
            throw UserfaultError(.concurrentIteration, operation: .iterate,
                                 detail: "another iterator is consuming this userfaultfd's events; only one may at a time")
        }
        return ConsumerClaim(channel: self)
    }

    func releaseClaim() {
        state.withLock { $0.claimed = false }
    }

    func receive(_ batch: inout [Result<FaultEvent, UserfaultError>]) {
        guard !batch.isEmpty else { return }
        let waiter = state.withLock { state -> Waiter? in
            var index = 0
            var handed: Waiter?
            if let waiter = state.waiter, state.head == state.buffer.count {
                state.waiter = nil
                handed = Waiter(continuation: waiter, value: batch[0])
                index = 1
            }
            if index < batch.count {
                if state.head == state.buffer.count {
                    state.buffer.removeAll(keepingCapacity: true)
                    state.head = 0
                }
                state.buffer.append(contentsOf: batch[index...])
            }
            return handed
        }
        waiter?.resume()
    }

    func finish(_ error: UserfaultError?) {
        let waiter = state.withLock { state -> Waiter? in
            guard !state.finished else { return nil }
            state.finished = true
            state.finishError = error
            // A waiter exists only while the buffer is empty, so what it gets is the error or the end.
            guard let waiter = state.waiter else { return nil }
            state.waiter = nil
            return Waiter(continuation: waiter, value: Self.takeReady(&state) ?? nil)
        }
        waiter?.resume()
    }

    /// The next buffered event, waiting for one if needed; `nil` at the end or when the calling task is cancelled.
    func next(isolation actor: isolated (any Actor)?) async -> Result<FaultEvent, UserfaultError>? {
        if let ready = state.withLock({ Self.takeReady(&$0) }) { return ready }
        return await withTaskCancellationHandler {
            await withUnsafeContinuation(isolation: actor) { (continuation: Continuation) in
                let ready = state.withLock { state -> Result<FaultEvent, UserfaultError>?? in
                    if let ready = Self.takeReady(&state) { return ready }
                    if Task.isCancelled { return .some(nil) }
                    state.waiter = continuation
                    return .none
                }
                if let ready { continuation.resume(returning: ready) }
            }
        } onCancel: {
            let waiter = state.withLock { state -> Continuation? in
                defer { state.waiter = nil }
                return state.waiter
            }
            waiter?.resume(returning: nil)
        }
    }

    /// What a consumer gets without waiting: `.some(event or error)`, `.some(nil)` at the end, `.none` if it must wait.
    private static func takeReady(_ state: inout State) -> Result<FaultEvent, UserfaultError>?? {
        if state.head < state.buffer.count {
            defer { state.head += 1 }
            return .some(state.buffer[state.head])
        }
        if state.finished {
            if let error = state.finishError {
                state.finishError = nil
                return .some(.failure(error))
            }
            return .some(nil)
        }
        return .none
    }
}

private typealias Continuation = UnsafeContinuation<Result<FaultEvent, UserfaultError>?, Never>

/// A continuation and the value to resume it with, taken out of the lock before resuming.
private struct Waiter {
    let continuation: Continuation
    let value: Result<FaultEvent, UserfaultError>?
    func resume() { continuation.resume(returning: value) }
}
