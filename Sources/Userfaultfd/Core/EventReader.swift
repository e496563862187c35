import CUserfaultfd
import Dispatch
import Glibc
import Synchronization

/// Receives what the event reader reads, on the reader's queue.
///
/// The reader calls ``receive(_:)`` synchronously from its Dispatch source handler, so a sink that can resolve a fault at
/// once (a copy from memory) does so with no thread hop at all. A sink must never block waiting for work that needs a
/// thread which may be faulting: a thread that caused a non-fault event sleeps until the event is read.
protocol FaultEventSink: AnyObject, Sendable {
    /// A batch of decoded messages, in the order the kernel returned them. The array is reused; don't keep it.
    ///
    /// A failed `read(2)` arrives here too, as a batch of one failure (``UserfaultError/Operation/readEvents``): the
    /// reader keeps the userfaultfd and tries again after a backoff (see ``EventReader``).
    func receive(_ batch: inout [Result<FaultEvent, UserfaultError>])
    /// The reader stopped: the userfaultfd was closed. (`error` is `nil` from the reader, whose read errors are never
    /// fatal; sinks also accept one, which they report before ending.)
    func finish(_ error: UserfaultError?)
}

/// Reads a userfaultfd with a dedicated `DispatchSourceRead` on its own serial queue, a batch of messages per `read(2)`.
///
/// Started by the first sink that attaches; one sink for the reader's life (the events channel or a resolver).
///
/// A `read(2)` that fails (other than `EAGAIN`/`EINTR`) never stops the reader while the userfaultfd is open: the
/// kernel keeps the message queued — `EMFILE` or `ENFILE` when it cannot install a forked child's userfaultfd,
/// `ENOMEM` — and the thread that caused it asleep, so giving up would hang that thread for good. The reader hands the
/// error to the sink (the first of a run of failures, and whenever the errno changes), suspends its Dispatch source,
/// and reads again from a timer on its own queue after a backoff that doubles from 1 ms up to 1 s; the first
/// successful read ends the run.
final class EventReader: Sendable {
    /// Messages read per `read(2)` at most.
    static let batchCapacity = 64
    /// The longest one handler invocation keeps polling (see `attach(_:pollingWindow:)`).
    static let pollingBudgetNanoseconds: UInt64 = 1_000_000
    /// The first wait before reading again after a failed read; it doubles with each failure in a row.
    static let firstRetryDelay: Duration = .milliseconds(1)
    /// The longest wait between two attempts.
    static let longestRetryDelay: Duration = .seconds(1)

    let executor: QueueExecutor
    private let lease: DescriptorLease
    private let features: UserfaultFeatures
    private let pageSize: Int
    private let state = Mutex(State())

    private struct State {
        var source: (any DispatchSourceRead)?
        var sink: (any FaultEventSink)?
        var cancelled = false
        var pollingWindowNanoseconds: UInt64 = 0
        /// The source is suspended while a failed read waits for its retry.
        var sourceSuspended = false
        /// A retry is armed on `retryTimer` and has not run yet.
        var retryScheduled = false
        /// The one-shot timer of retries (made on the first failure), on the reader's queue.
        var retryTimer: (any DispatchSourceTimer)?
    }

    /// Reusable buffers, touched only on the reader's queue.
    private let buffers: QueueConfined<Buffers>

    struct Buffers {
        var bytes: UnsafeMutableRawBufferPointer
        var batch: [Result<FaultEvent, UserfaultError>]
        /// Failed reads in a row (0 after a successful one), and the errno of the last one reported.
        var failures = 0
        var reportedErrno: Int32 = 0
    }

    init(lease: DescriptorLease, features: UserfaultFeatures, pageSize: Int) {
        self.lease = lease
        self.features = features
        self.pageSize = pageSize
        self.executor = QueueExecutor(label: "userfaultfd.events.\(lease.descriptor)")
        let bytes = UnsafeMutableRawBufferPointer.allocate(
            byteCount: Self.batchCapacity * FaultMessage.size, alignment: 16)
        var batch: [Result<FaultEvent, UserfaultError>] = []
        batch.reserveCapacity(Self.batchCapacity)
        self.buffers = QueueConfined(Buffers(bytes: bytes, batch: batch))
    }

    deinit {
        buffers.value.bytes.deallocate()
    }

    var queue: DispatchQueue { executor.queue }

    /// Attaches the sink and starts reading. Throws ``UserfaultError/Code/concurrentIteration`` if another sink is
    /// attached, ``UserfaultError/Code/closed`` after ``cancel()``.
    ///
    /// - Parameter pollingWindow: after handing over a batch, keep reading the (non-blocking) descriptor for this long
    ///   before going back to the Dispatch source. A fault that arrives meanwhile is read at once, without the wake-ups
    ///   of the source's path (on Linux: epoll in libdispatch's manager thread, then a hand-off to a worker), which are
    ///   most of a one-page round trip. Polling stops as soon as any work is queued on the reader's executor, so it
    ///   never delays provider completions. Costs up to this much CPU after each batch; zero turns it off.
    func attach(_ sink: any FaultEventSink, pollingWindow: Duration = .zero) throws(UserfaultError) {
        let result: UserfaultError? = state.withLock { state in
            if state.cancelled { return UserfaultError(.closed, operation: .readEvents) }
            if let existing = state.sink {
                return existing === sink ? nil : UserfaultError(
                    .concurrentIteration, operation: .iterate,
                    detail: "this userfaultfd's events are already consumed by another reader (\(type(of: existing)))")
            }
            guard lease.acquire() else { return UserfaultError(.closed, operation: .readEvents) }
            state.sink = sink
            state.pollingWindowNanoseconds = pollingWindow.saturatingNanoseconds
            let source = DispatchSource.makeReadSource(fileDescriptor: lease.descriptor, queue: executor.queue)
            source.setEventHandler { [weak self] in self?.drain() }
            source.setCancelHandler { [weak self, lease] in
                sink.finish(nil)
                lease.release()
                // Drop the sink: a resolver holds its userfaultfd, which holds this reader.
                let timer = self?.state.withLock { state -> (any DispatchSourceTimer)? in
                    state.sink = nil
                    state.source = nil
                    defer { state.retryTimer = nil }
                    return state.retryTimer
                }
                timer?.cancel()
            }
            state.source = source
            source.resume()
            return nil
        }
        if let result { throw result }
    }

    /// Stops reading; the sink's ``FaultEventSink/finish(_:)`` runs on the queue once the source is cancelled.
    func cancel() {
        let (source, suspended, timer) = state.withLock { state in
            state.cancelled = true
            defer { state.sourceSuspended = false }
            return (state.source, state.sourceSuspended, state.retryTimer)
        }
        timer?.cancel()
        source?.cancel()
        // A suspended source runs its cancel handler (which ends the sink) only once resumed.
        if suspended { source?.resume() }
    }

    /// Reads every message queued right now and hands it to the sink, synchronously. Must run on the reader's queue
    /// (e.g. inside an actor whose executor is ``UserfaultFD/eventExecutor``): a dirty tracker uses it so that every
    /// fault raised before a collection is handled before it.
    func drainPending() {
        dispatchPrecondition(condition: .onQueue(queue))
        drain()
    }

    /// Reads until the descriptor is empty, handing each batch to the sink. Runs on the queue.
    private func drain() {
        guard let (sink, window) = state.withLock({ state in state.sink.map { ($0, state.pollingWindowNanoseconds) } }) else { return }
        buffers.withValue { buffers in
            var pollUntil: UInt64 = 0
            // Polling yields at once to work queued behind the reader (provider completions, retries, timers share
            // this serial queue), and never holds the queue longer than this budget even while faults keep coming.
            let pollBudgetEnd = window > 0 ? monotonicNanoseconds() &+ Self.pollingBudgetNanoseconds : 0
            while true {
                let count = Glibc.read(lease.descriptor, buffers.bytes.baseAddress, buffers.bytes.count)
                if count < 0 {
                    let error = Glibc.errno
                    if error == EINTR { continue }
                    if error == EAGAIN {
                        // Nothing queued: poll a little longer (see `attach`), then leave it to the Dispatch source.
                        if window > 0, pollUntil > 0, waitReadable(until: pollUntil) { continue }
                        return
                    }
                    // Closing: the source's cancel handler ends the sink. Otherwise the message is still queued.
                    if lease.isClosed { return }
                    retryLater(after: error, sink: sink, buffers: &buffers)
                    return
                }
                if count == 0 { return }
                buffers.failures = 0
                let messages = count / FaultMessage.size
                buffers.batch.removeAll(keepingCapacity: true)
                for index in 0..<messages {
                    let message = UnsafeRawBufferPointer(rebasing: buffers.bytes[(index * FaultMessage.size)...].prefix(FaultMessage.size))
                    buffers.batch.append(decode(message))
                }
                if count % FaultMessage.size != 0 {
                    buffers.batch.append(.failure(UserfaultError(
                        .malformedMessage, operation: .readEvents, detail: "read returned \(count) bytes, not a multiple of \(FaultMessage.size)")))
                }
                sink.receive(&buffers.batch)
                // A short read means the queue is empty; the source fires again when more arrive, unless polling.
                if messages < Self.batchCapacity {
                    guard window > 0, !executor.hasQueuedWork else { return }
                    let now = monotonicNanoseconds()
                    guard now < pollBudgetEnd else { return }
                    pollUntil = window > pollBudgetEnd - now ? pollBudgetEnd : now + window
                }
            }
        }
    }

    /// Polls the descriptor until a message is pending (true) or `deadline` passes, work is queued behind the reader
    /// (provider completions, retries and timers run on this queue, and polling must never delay them) or the
    /// descriptor is closed (false).
    ///
    /// `poll(2)` with a zero timeout only looks whether a fault is pending, without taking the locks of the fault queue
    /// that a `read(2)` returning `EAGAIN` takes — locks the faulting threads need to queue their faults.
    private func waitReadable(until deadline: UInt64) -> Bool {
        var descriptor = pollfd(fd: lease.descriptor, events: Int16(POLLIN), revents: 0)
        while monotonicNanoseconds() < deadline, !executor.hasQueuedWork, !lease.isClosed {
            if poll(&descriptor, 1, 0) > 0 { return true }
        }
        return false
    }

    private func decode(_ message: UnsafeRawBufferPointer) -> Result<FaultEvent, UserfaultError> {
        do throws(UserfaultError) {
            switch try FaultMessage.decode(message, features: features, pageSize: pageSize) {
            case .pageFault(let fault): return .success(.pageFault(fault))
            case .fork(let descriptor):
                // The kernel installed the child's userfaultfd in this process; it shares the parent's features.
                return .success(.fork(UserfaultFD(
                    descriptor: descriptor, available: features, enabled: features,
                    ioctls: [.register, .unregister, .api])))
            case .remap(let from, let to, let length): return .success(.remap(from: from, to: to, length: length))
            case .remove(let range): return .success(.remove(range))
            case .unmap(let range): return .success(.unmap(range))
            }
        } catch {
            return .failure(error)
        }
    }

    /// A read failed with `error` (see the type's documentation): reports it when it starts a run of failures or
    /// changes, suspends the source, and arms the retry timer. On the queue.
    private func retryLater(after error: Int32, sink: any FaultEventSink, buffers: inout Buffers) {
        let delay = Self.retryDelay(afterFailures: buffers.failures)
        if buffers.failures == 0 || error != buffers.reportedErrno {
            buffers.reportedErrno = error
            buffers.batch.removeAll(keepingCapacity: true)
            buffers.batch.append(.failure(UserfaultError(
                operation: .readEvents, errno: error,
                detail: "reading the userfaultfd failed; the message stays queued, reading again in \(delay) (and backing off)")))
            sink.receive(&buffers.batch)
        }
        buffers.failures += 1
        state.withLock { state in
            guard !state.cancelled, let source = state.source else { return }
            if !state.sourceSuspended {
                source.suspend()
                state.sourceSuspended = true
            }
            let timer: any DispatchSourceTimer
            if let existing = state.retryTimer {
                timer = existing
            } else {
                timer = DispatchSource.makeTimerSource(queue: executor.queue)
                timer.setEventHandler { [weak self] in self?.retryRead() }
                state.retryTimer = timer
                timer.schedule(deadline: .now() + delay.timeInterval)
                timer.resume()
                state.retryScheduled = true
                return
            }
            timer.schedule(deadline: .now() + delay.timeInterval)
            state.retryScheduled = true
        }
    }

    /// The retry timer fired: read again; unless that failed too (and armed the timer again), resume the source.
    private func retryRead() {
        state.withLock { $0.retryScheduled = false }
        drain()
        let source = state.withLock { state -> (any DispatchSourceRead)? in
            guard !state.retryScheduled, state.sourceSuspended, !state.cancelled, let source = state.source else { return nil }
            state.sourceSuspended = false
            return source
        }
        source?.resume()
    }

    /// The wait after `failures` failed reads in a row: 1 ms, doubling, at most ``longestRetryDelay``.
    static func retryDelay(afterFailures failures: Int) -> Duration {
        let doublings = min(failures, 10)
        return min(firstRetryDelay * (1 << doublings), longestRetryDelay)
    }
}

/// A value only ever touched on one serial queue; the type system can't see that, so it is asserted in debug builds.
final class QueueConfined<Value>: @unchecked Sendable {
    // @unchecked: accessed only from the owning EventReader's serial queue (the Dispatch source handler).
    private(set) var value: Value

    init(_ value: Value) { self.value = value }

    @inline(__always)
    func withValue<R>(_ body: (inout Value) throws -> R) rethrows -> R {
        try body(&value)
    }
}
