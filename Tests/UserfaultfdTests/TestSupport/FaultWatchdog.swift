import CUserfaultfdTestSupport
import Dispatch
import Foundation
import Glibc
import Testing
import Userfaultfd

/// The resources of one faulting test and the watchdog that bounds it.
///
/// Everything a test creates through the scope (userfaultfds, mappings, forked children) is released at the end in a
/// safe order: children killed and reaped, userfaultfds closed (which wakes every thread still blocked on one of their
/// faults), then memory unmapped. If the test has not finished after the watchdog's deadline, the watchdog closes every
/// tracked userfaultfd and kills every tracked child right away, so blocked threads and iterators return, and the test
/// records a failure instead of hanging.
final class FaultScope: @unchecked Sendable {
    // @unchecked: all mutable state is guarded by `lock`.
    private let lock = NSLock()
    private var uffds: [UserfaultFD] = []
    private var mappings: [TestMapping] = []
    private var children: [pid_t] = []
    private var tearDowns: [@Sendable () -> Void] = []
    private var threads: [any ThreadCompletion] = []

    /// The scope of the test running on this task, so that threads started by it are tracked without being passed it.
    @TaskLocal static var current: FaultScope?
    private(set) var watchdogFired = false
    private var finished = false

    /// A userfaultfd closed by the watchdog and at tear-down.
    func makeUFFD(
        required: UserfaultFeatures = [], optional: UserfaultFeatures = [], path: UserfaultFD.CreationPath = .automatic
    ) throws -> UserfaultFD {
        track(try UserfaultFD(requiredFeatures: required, optionalFeatures: optional, path: path))
    }

    /// `pages` pages of private anonymous memory, unmapped at tear-down.
    func makeMapping(pages: Int) throws -> TestMapping {
        track(try TestMapping(pages: pages))
    }

    @discardableResult
    func track(_ uffd: UserfaultFD) -> UserfaultFD {
        lock.withLock { uffds.append(uffd) }
        if lock.withLock({ watchdogFired }) { uffd.close() }
        return uffd
    }

    @discardableResult
    func track(_ mapping: TestMapping) -> TestMapping {
        lock.withLock { mappings.append(mapping) }
        return mapping
    }

    /// A child process killed (SIGKILL) and reaped if it is still around when the watchdog fires or the test ends.
    func track(child pid: pid_t) {
        lock.withLock { children.append(pid) }
    }

    /// Forget a child the test reaped itself.
    func reaped(child pid: pid_t) {
        lock.withLock { children.removeAll { $0 == pid } }
    }

    /// A thread started by the test: memory is unmapped only once every such thread has returned, because a thread
    /// still blocked on a fault would retry it after the unmap and crash the process.
    func track(thread: any ThreadCompletion) {
        lock.withLock { threads.append(thread) }
    }

    /// Runs `action` at tear-down, after the userfaultfds are closed and the test's threads returned.
    func onTearDown(_ action: @escaping @Sendable () -> Void) {
        lock.withLock { tearDowns.append(action) }
    }

    fileprivate func fire() {
        let (uffds, children) = lock.withLock { () -> ([UserfaultFD], [pid_t]) in
            guard !finished else { return ([], []) }
            watchdogFired = true
            return (self.uffds, self.children)
        }
        for pid in children { kill(pid, SIGKILL) }
        for uffd in uffds { uffd.close() }
    }

    /// Kills children, closes userfaultfds (waking every thread blocked on them), waits for the test's threads, then
    /// unmaps. Returns false if a thread is still running after `seconds`: its memory is then left mapped (leaked), as
    /// unmapping it under a blocked thread would turn its retried access into a crash.
    fileprivate func tearDown(waitingForThreads seconds: Double) async -> Bool {
        let (uffds, children, threads) = lock.withLock {
            finished = true
            return (self.uffds, self.children, self.threads)
        }
        for pid in children {
            kill(pid, SIGKILL)
            _ = await waitForChild(pid, seconds: 10)
        }
        for uffd in uffds { uffd.close() }
        let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
        while threads.contains(where: { !$0.isFinished }) && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
        guard !threads.contains(where: { !$0.isFinished }) else { return false }
        releaseMemory()
        return true
    }

    private func releaseMemory() {
        let (mappings, tearDowns) = lock.withLock { (self.mappings, self.tearDowns) }
        for mapping in mappings { mapping.unmap() }
        for action in tearDowns { action() }
    }

    var fired: Bool { lock.withLock { watchdogFired } }

    /// Releases everything, for scopes used without ``withFaultWatchdog(seconds:sourceLocation:_:)`` by tests that start
    /// no thread.
    func finishWithoutWatchdog() {
        let uffds = lock.withLock {
            finished = true
            return self.uffds
        }
        for uffd in uffds { uffd.close() }
        releaseMemory()
    }
}

/// What a scope needs to know about a thread it tracks.
protocol ThreadCompletion: Sendable {
    var isFinished: Bool { get }
}

/// Where every watchdog's alarm runs.
private let watchdogQueue = DispatchQueue(label: "uffd-test-watchdog")

/// Runs a test that faults under a watchdog: after `seconds`, every userfaultfd and child of the scope is closed or
/// killed (so nothing stays blocked) and the test records a failure. Resources are released when `body` returns or throws.
func withFaultWatchdog(
    seconds: Double = 20,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (FaultScope) async throws -> Void
) async throws {
    let scope = FaultScope()
    let alarm = DispatchWorkItem { scope.fire() }
    // A queue of its own (a serial queue gets a thread even when every thread of the global queues is blocked): the
    // cooperative pool runs on the default global queue here, and a test that blocks its threads (a fork waiting on
    // a FORK event, a fault) must not also block the watchdog that would release them.
    watchdogQueue.asyncAfter(deadline: .now() + seconds, execute: alarm)
    let outcome: Result<Void, any Error>
    do {
        try await FaultScope.$current.withValue(scope) { try await body(scope) }
        outcome = .success(())
    } catch {
        outcome = .failure(error)
    }
    alarm.cancel()
    if !(await scope.tearDown(waitingForThreads: 10)) {
        Issue.record("a thread of the test was still running 10 s after its userfaultfds were closed; its memory was leaked",
                     sourceLocation: sourceLocation)
    }
    if scope.fired {
        Issue.record("watchdog: the test did not finish within \(seconds) s; its userfaultfds were closed",
                     sourceLocation: sourceLocation)
    }
    try outcome.get()
}

/// The next event, or a thrown failure when the sequence ended (e.g. the watchdog closed the userfaultfd).
func nextEvent(
    _ iterator: inout FaultEvents.Iterator, sourceLocation: SourceLocation = #_sourceLocation
) async throws -> FaultEvent {
    guard let event = try await iterator.next() else {
        throw TestFailure("the events ended before the expected event arrived")
    }
    return event
}

/// The next event, which must be a page fault.
func nextPageFault(
    _ iterator: inout FaultEvents.Iterator, sourceLocation: SourceLocation = #_sourceLocation
) async throws -> PageFault {
    let event = try await nextEvent(&iterator, sourceLocation: sourceLocation)
    guard case .pageFault(let fault) = event else {
        throw TestFailure("expected a page fault, got \(event)")
    }
    return fault
}

/// Starts a thread that reads the byte at `address` (blocking while its page is missing in a registered range).
func readOnThread(_ address: UInt) -> OffPoolThread<UInt8> {
    OffPoolThread(name: "uffd-test-reader") { cuffd_test_read_byte(UnsafeRawPointer(bitPattern: address)) }
}

/// Starts a thread that writes `value` at `address`.
func writeOnThread(_ address: UInt, _ value: UInt8) -> OffPoolThread<Bool> {
    OffPoolThread(name: "uffd-test-writer") {
        cuffd_test_write_byte(UnsafeMutableRawPointer(bitPattern: address), value)
        return true
    }
}

/// Reads a byte of memory that is known to be present or ordinary (never blocks on a fault), possibly while another
/// thread is blocked storing to it (a write-protect fault): not instrumented by ThreadSanitizer, which would count the
/// blocked store as done.
func peek(_ address: UInt) -> UInt8 {
    cuffd_test_peek_byte(UnsafeRawPointer(bitPattern: address))
}

/// A page-sized buffer filled with `byte`, for copy sources.
func sourcePage(_ byte: UInt8, pages: Int = 1) -> [UInt8] {
    [UInt8](repeating: byte, count: pages * systemPageSize)
}

/// Expects `body` to throw a UserfaultError and returns it (nil, with a recorded issue, if it did not throw one).
@discardableResult
func expectUserfaultError<R>(
    _ code: UserfaultError.Code? = nil,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: () throws(UserfaultError) -> R
) -> UserfaultError? {
    do {
        let result = try body()
        Issue.record("expected a UserfaultError\(code.map { " \($0)" } ?? ""), got \(result)", sourceLocation: sourceLocation)
        return nil
    } catch {
        if let code { #expect(error.code == code, "\(error)", sourceLocation: sourceLocation) }
        return error
    }
}

/// Waits until `fd` is readable (poll POLLIN) for at most `seconds`; true if it became readable.
func waitReadable(_ fd: Int32, seconds: Double) async -> Bool {
    let deadline = ContinuousClock.now + .milliseconds(Int(seconds * 1000))
    while ContinuousClock.now < deadline {
        var pollfd = Glibc.pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
        if poll(&pollfd, 1, 0) == 1 && pollfd.revents & Int16(POLLIN) != 0 { return true }
        try? await Task.sleep(for: .milliseconds(5))
    }
    return false
}
