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
    func receive(_ batch: inout [Result<FaultEvent, UserfaultError>])
    /// The reader stopped: `nil` when the userfaultfd was closed, otherwise the read error.
    func finish(_ error: UserfaultError?)
}

/// Reads a userfaultfd with a dedicated `DispatchSourceRead` on its own serial queue, a batch of messages per `read(2)`.
///
/// Started by the first sink that attaches; one sink for the reader's life (the events channel or a resolver).
final class EventReader: Sendable {
    /// Messages read per `read(2)` at most.
    static let batchCapacity = 64
    /// The longest one handler invocation keeps polling (see `attach(_:pollingWindow:)`).
    static let pollingBudgetNanoseconds: UInt64 = 1_000_000

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
    }

    /// Reusable buffers, touched only on the reader's queue.
    private let buffers: QueueConfined<Buffers>

    struct Buffers {
        var bytes: UnsafeMutableRawBufferPointer
        var batch: [Result<FaultEvent, UserfaultError>]
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
            let (seconds, attoseconds) = pollingWindow.components
            state.pollingWindowNanoseconds = UInt64(max(0, seconds)) * 1_000_000_000 + UInt64(max(0, attoseconds) / 1_000_000_000)
            let source = DispatchSource.makeReadSource(fileDescriptor: lease.descriptor, queue: executor.queue)
            source.setEventHandler { [weak self] in self?.drain() }
            source.setCancelHandler { [weak self, lease] in
                sink.finish(nil)
                lease.release()
                // Drop the sink: a resolver holds its userfaultfd, which holds this reader.
                self?.state.withLock { state in
                    state.sink = nil
                    state.source = nil
                }
            }
            state.source = source
            source.resume()
            return nil
        }
        if let result { throw result }
    }

    /// Stops reading; the sink's ``FaultEventSink/finish(_:)`` runs on the queue once the source is cancelled.
    func cancel() {
        let source = state.withLock { state -> (any DispatchSourceRead)? in
            state.cancelled = true
            return state.source
        }
        source?.cancel()
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
                    fail(sink, UserfaultError(operation: .readEvents, errno: error))
                    return
                }
                if count == 0 { return }
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
                    pollUntil = min(now &+ window, pollBudgetEnd)
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

    private func fail(_ sink: any FaultEventSink, _ error: UserfaultError) {
        let source = state.withLock { state -> (any DispatchSourceRead)? in
            let source = state.source
            state.source = nil
            state.cancelled = true
            return source
        }
        sink.finish(error)
        // The cancel handler then calls finish(nil), which sinks ignore once finished.
        source?.cancel()
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
