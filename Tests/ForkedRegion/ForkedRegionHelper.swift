// uffd-forked-region: the fork scenario of a LazyRegion, run in a process of its own by the region-event tests.
//
// A region with `serveForkedChildren` asks for UFFD_FEATURE_EVENT_FORK, and FORK events are process-wide: while such a
// region exists, every fork in its process (any test's, any thread's) sleeps in the kernel until the region's reader has
// read the event, and the region gets a userfaultfd for each of those children. In the parallel test runner that couples
// unrelated tests, so the scenario lives here, where the only fork is its own.
//
//   uffd-forked-region --serve      the region opts in: the child's fault is served with the provider's byte, and
//                                   once the child has exited its resolver is let go (forkedChildrenExited)
//   uffd-forked-region --no-serve   it does not: the child's copy of the page is ordinary (zero) anonymous memory
//   uffd-forked-region --emfile     as --serve, but the FORK event is first read while the process is out of
//                                   descriptors (RLIMIT_NOFILE lowered, so the kernel cannot install the child's
//                                   userfaultfd: EMFILE); the error is reported, and once the limit is raised again the
//                                   reader reads the event (the fork returns) and the child is served
//   uffd-forked-region --unconsumed-forks
//                                   a resolver whose forkedChildren nobody consumes sees 300 forks: the descriptors it
//                                   keeps for them stay bounded, and closing it closes those it kept
//
// Either way the parent's page is still missing after the child ran (the child's fault never reaches the parent's
// userfaultfd) and the parent then reads the provider's byte through its own fault.
//
// Prints one line `OK ...` and exits 0 when every check holds; otherwise prints `FAIL: ...` on stderr and exits 1
// (2: usage or setup error).

import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Userfaultfd

@main
enum ForkedRegionHelper {
    static func main() async {
        let arguments = Array(CommandLine.arguments.dropFirst())
        guard arguments.count == 1, ["--serve", "--no-serve", "--emfile", "--unconsumed-forks"].contains(arguments[0]) else {
            fail(2, "usage: uffd-forked-region --serve|--no-serve|--emfile|--unconsumed-forks")
        }
        alarm(60)  // a last-resort bound; the test kills this process earlier when it overruns
        do {
            let report: String
            switch arguments[0] {
            case "--emfile": report = try await ForkScenario.runOutOfDescriptors()
            case "--unconsumed-forks": report = try await ForkScenario.runUnconsumedForks()
            default: report = try await ForkScenario.run(serving: arguments[0] == "--serve")
            }
            print("OK \(report)")
            exit(0)
        } catch let failure as ScenarioFailure {
            fail(1, failure.description)
        } catch {
            fail(2, "setup: \(error)")
        }
    }

    static func fail(_ status: Int32, _ message: String) -> Never {
        FileHandle.standardError.write(Data("uffd-forked-region: FAIL: \(message)\n".utf8))
        exit(status)
    }
}

struct ScenarioFailure: Error, CustomStringConvertible {
    let description: String
}

enum ForkScenario {
    /// Runs the scenario; returns the report line, or throws ``ScenarioFailure`` naming the first check that failed.
    static func run(serving: Bool) async throws -> String {
        let pageSize = systemPageSize
        // Never a zero byte: the child without a server reads zeros and must be told apart.
        let source = (0..<(8 * pageSize)).map { UInt8(truncatingIfNeeded: $0 % 251 + 1) }
        let offset = 5 * pageSize + 17
        let expected = source[offset]
        return try await LazyRegion.with(length: source.count, provider: MemoryProvider(source),
                                         options: .init(readahead: .none, serveForkedChildren: serving)) { region in
            let address = UInt(bitPattern: region.baseAddress) + UInt(offset)
            // The raw clone sleeps in the kernel until the region's reader (on its own queue) has read the FORK event.
            let pid = cuffd_test_fork_toucher(UnsafeRawPointer(bitPattern: address), expected, 20)
            guard pid > 0 else { throw ScenarioFailure(description: "fork failed: errno \(errno)") }
            guard let status = await waitForChild(pid, seconds: 25) else {
                kill(pid, SIGKILL)
                var ignored: Int32 = 0
                _ = cuffd_test_waitpid(pid, &ignored, 0)
                throw ScenarioFailure(description: "the child did not exit within 25 s (its fault was never resolved)")
            }
            let served = region.statistics.forkedChildrenServed
            let parentFaultsBefore = region.statistics.faults
            // Served: the child read the provider's byte (0). Not served: its page was plain anonymous memory (3: a zero).
            let wantedStatus: Int32 = serving ? 0 : 3
            guard status == wantedStatus else {
                throw ScenarioFailure(description: "child exit status \(status), expected \(wantedStatus) (0: provider's byte, 3: another byte, negative: signal)")
            }
            guard served == (serving ? 1 : 0) else {
                throw ScenarioFailure(description: "forkedChildrenServed is \(served), expected \(serving ? 1 : 0)")
            }
            guard parentFaultsBefore == 0 else {
                throw ScenarioFailure(description: "the parent's resolver saw \(parentFaultsBefore) faults from the child's read")
            }
            // The child has exited: its resolver is let go within about a second (no event says so; it is probed).
            let exitDeadline = ContinuousClock.now + .seconds(5)
            while serving && region.statistics.forkedChildrenExited == 0 && ContinuousClock.now < exitDeadline {
                try? await Task.sleep(for: .milliseconds(20))
            }
            let exited = region.statistics.forkedChildrenExited
            guard exited == (serving ? 1 : 0) else {
                throw ScenarioFailure(description: "forkedChildrenExited is \(exited) 5 s after the child exited, expected \(serving ? 1 : 0)")
            }
            // The parent's own page: still missing here, faulted in by this read.
            let parentByte = await readOnThread(address)
            guard parentByte == expected else {
                throw ScenarioFailure(description: "the parent read \(String(describing: parentByte)), expected \(expected)")
            }
            let parentFaultsAfter = region.statistics.faults
            guard parentFaultsAfter == 1 else {
                throw ScenarioFailure(description: "the parent's read raised \(parentFaultsAfter) faults in its resolver, expected 1")
            }
            return "serving=\(serving) childStatus=\(status) forkedChildrenServed=\(served) forkedChildrenExited=\(exited) parentFaults=\(parentFaultsBefore)->\(parentFaultsAfter)"
        }
    }

    /// The FORK event arrives while the process has no descriptor left: `read(2)` of the parent's userfaultfd fails with
    /// EMFILE (the kernel cannot install the child's userfaultfd) and leaves the event queued, the forking thread asleep.
    /// The reader must report that and keep trying; once the limit is raised it reads the event, the fork returns and
    /// the child's fault is served.
    static func runOutOfDescriptors() async throws -> String {
        let pageSize = systemPageSize
        let source = (0..<(8 * pageSize)).map { UInt8(truncatingIfNeeded: $0 % 251 + 1) }
        let offset = 3 * pageSize + 5
        let expected = source[offset]
        return try await LazyRegion.with(length: source.count, provider: MemoryProvider(source),
                                         options: .init(readahead: .none, serveForkedChildren: true)) { region in
            let address = UInt(bitPattern: region.baseAddress) + UInt(offset)
            // libdispatch makes a timerfd the first time a timer of a kind is armed: arm the kinds used here now, while
            // descriptors are still available (a server out of descriptors has armed its timers long before).
            await warmUpTimers(region.uffd.eventExecutor)
            var saved = rlimit()
            guard getrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved) == 0 else {
                throw ScenarioFailure(description: "getrlimit: errno \(errno)")
            }
            // The lowest free descriptor number becomes the limit: the next descriptor the kernel installs fails EMFILE.
            let lowestFree = dup(0)
            guard lowestFree >= 0 else { throw ScenarioFailure(description: "dup: errno \(errno)") }
            close(lowestFree)
            var lowered = saved
            lowered.rlim_cur = rlim_t(lowestFree)
            guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &lowered) == 0 else {
                throw ScenarioFailure(description: "setrlimit: errno \(errno)")
            }
            let fork = ForkOnThread(address: address, expected: expected)
            // The reader's first read fails with EMFILE; it must say so on the region's error stream.
            let reported = await firstError(of: region.errors, within: .seconds(5))
            let forkReturnedEarly = fork.pid != nil
            guard setrlimit(Int32(RLIMIT_NOFILE.rawValue), &saved) == 0 else {
                throw ScenarioFailure(description: "setrlimit (restoring): errno \(errno)")
            }
            guard !forkReturnedEarly else {
                throw ScenarioFailure(description: "fork returned while the process had no descriptor for the child's userfaultfd")
            }
            guard let reported, let underlying = reported.underlying as? UserfaultError, underlying.errno == EMFILE else {
                throw ScenarioFailure(description: "the EMFILE read was not reported (got \(String(describing: reported)))")
            }
            // The limit is back: the event must now be read (the fork returns) and the child served.
            let forkDeadline = ContinuousClock.now + .seconds(10)
            while fork.pid == nil && ContinuousClock.now < forkDeadline {
                try? await Task.sleep(for: .milliseconds(5))
            }
            guard let pid = fork.pid else {
                throw ScenarioFailure(description: "the fork did not return within 10 s of the limit being raised: the FORK event was never read")
            }
            guard pid > 0 else { throw ScenarioFailure(description: "fork failed: errno \(fork.forkErrno)") }
            guard let status = await waitForChild(pid, seconds: 20) else {
                kill(pid, SIGKILL)
                var ignored: Int32 = 0
                _ = cuffd_test_waitpid(pid, &ignored, 0)
                throw ScenarioFailure(description: "the child did not exit within 20 s (its fault was never resolved)")
            }
            guard status == 0 else { throw ScenarioFailure(description: "child exit status \(status), expected 0 (the provider's byte)") }
            let served = region.statistics.forkedChildrenServed
            guard served == 1 else { throw ScenarioFailure(description: "forkedChildrenServed is \(served), expected 1") }
            return "emfile reported=EMFILE childStatus=\(status) forkedChildrenServed=\(served)"
        }
    }

    /// 300 forks of a process whose resolver's `forkedChildren` nobody consumes: each FORK installs a userfaultfd in this
    /// process, and the resolver must not keep them all. Closing the userfaultfd closes the ones it kept.
    static func runUnconsumedForks() async throws -> String {
        let forks = 300
        let memory = try AnonymousMemory(length: systemPageSize)
        let uffd = try UserfaultFD(requiredFeatures: [.eventFork])
        try uffd.register(memory.range, mode: .missing)
        let resolver = FaultResolver(uffd: uffd)
        try resolver.start()
        let before = openUserfaultfdCount()
        // The children exit at once (running nothing, so the scenario also runs under ThreadSanitizer); only the FORK
        // events matter.
        // One thread forks them all, one after another (each fork returns once its event is read), and reaps each child.
        let outcome = ForkerOutcome()
        let forker = Thread {
            var failure = ""
            for index in 0..<forks {
                let pid = cuffd_test_fork_exiting()
                guard pid > 0 else { failure = "fork \(index) failed: errno \(Glibc.errno)"; break }
                var status: Int32 = 0
                guard cuffd_test_waitpid(pid, &status, 0) == pid, cuffd_test_decode_status(status) == 0 else {
                    failure = "child \(index) failed: status \(cuffd_test_decode_status(status))"
                    break
                }
            }
            outcome.value.withLock { $0 = failure }
        }
        forker.start()
        let deadline = ContinuousClock.now + .seconds(40)
        while outcome.value.withLock({ $0 }) == nil && ContinuousClock.now < deadline { try? await Task.sleep(for: .milliseconds(5)) }
        guard let failure = outcome.value.withLock({ $0 }) else {
            throw ScenarioFailure(description: "\(forks) forks did not finish within 40 s (a FORK event was never read)")
        }
        guard failure.isEmpty else { throw ScenarioFailure(description: failure) }
        let after = openUserfaultfdCount()
        // What the resolver may buffer for a consumer that comes later (FaultResolver.forkedChildrenLimit), and the
        // last child's: the fork returns once its event is read, maybe before the resolver has applied it.
        let allowed = 64 + 1
        let kept = after - before
        guard kept <= allowed else {
            throw ScenarioFailure(description: "\(kept) userfaultfds more after \(forks) unconsumed forks (\(before) -> \(after)); at most \(allowed) may be kept")
        }
        uffd.close()
        let closeDeadline = ContinuousClock.now + .seconds(5)
        while openUserfaultfdCount() > 0 && ContinuousClock.now < closeDeadline {
            try? await Task.sleep(for: .milliseconds(5))
        }
        let closed = openUserfaultfdCount()
        guard closed == 0 else {
            throw ScenarioFailure(description: "\(closed) userfaultfds open 5 s after closing the resolver's (the children's it kept must be closed with it)")
        }
        withExtendedLifetime(resolver) {}
        return "unconsumed forks=\(forks) kept<=\(allowed) closedAtFinish"
    }

    /// Userfaultfds open in this process (entries of /proc/self/fd that link to one; the runtime's own descriptors,
    /// timerfds and pipes made along the way, are not counted).
    static func openUserfaultfdCount() -> Int {
        let names = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return names.filter {
            (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)")) == "anon_inode:[userfaultfd]"
        }.count
    }

    /// The first error of `stream` within `timeout`, or nil.
    static func firstError(of stream: AsyncStream<RegionError>, within timeout: Duration) async -> RegionError? {
        await withTaskGroup(of: RegionError?.self) { group in
            group.addTask { for await error in stream { return error }; return nil }
            group.addTask { try? await Task.sleep(for: timeout); return nil }
            let first = await group.next() ?? nil
            group.cancelAll()
            return first
        }
    }

    /// Arms a one-shot timer on `executor`'s queue and one through Task.sleep, and waits for both to fire.
    static func warmUpTimers(_ executor: QueueExecutor) async {
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            executor.queue.asyncAfter(deadline: .now() + .milliseconds(1)) { continuation.resume() }
        }
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            let timer = DispatchSource.makeTimerSource(queue: executor.queue)
            timer.setEventHandler { timer.cancel(); continuation.resume() }
            timer.schedule(deadline: .now() + .milliseconds(1))
            timer.resume()
        }
        try? await Task.sleep(for: .milliseconds(1))
    }

    /// Waits for `pid` (polling, so no thread blocks), up to `seconds`: its exit code (or -signal), or nil.
    static func waitForChild(_ pid: pid_t, seconds: Int) async -> Int32? {
        let deadline = ContinuousClock.now + .seconds(seconds)
        while ContinuousClock.now < deadline {
            var status: Int32 = 0
            let result = cuffd_test_waitpid(pid, &status, 1)
            if result == pid { return cuffd_test_decode_status(status) }
            if result < 0 { return -1001 }
            try? await Task.sleep(for: .milliseconds(5))
        }
        return nil
    }

    /// One byte read at `address` on a thread of its own (the read blocks until the region resolves the fault); nil when
    /// it takes more than 20 s.
    static func readOnThread(_ address: UInt) async -> UInt8? {
        let read = ThreadRead()
        Thread {
            let byte = cuffd_test_read_byte(UnsafeRawPointer(bitPattern: address))  // faults: not under the lock
            read.value.withLock { $0 = byte }
        }.start()
        let deadline = ContinuousClock.now + .seconds(20)
        while read.value.withLock({ $0 }) == nil && ContinuousClock.now < deadline {
            try? await Task.sleep(for: .milliseconds(2))
        }
        return read.value.withLock { $0 }
    }
}

/// `cuffd_test_fork_toucher` on a thread of its own: with EVENT_FORK it returns only once the FORK event has been read.
final class ForkOnThread: Sendable {
    private let result = Mutex<(pid: pid_t, errno: Int32)?>(nil)

    init(address: UInt, expected: UInt8) {
        Thread { [self] in
            let pid = cuffd_test_fork_toucher(UnsafeRawPointer(bitPattern: address), expected, 20)
            let error = Glibc.errno
            self.result.withLock { $0 = (pid, error) }
        }.start()
    }

    /// The child's pid once the fork returned (-1 if it failed), nil while it has not.
    var pid: pid_t? { result.withLock { $0?.pid } }
    var forkErrno: Int32 { result.withLock { $0?.errno ?? 0 } }
}

/// What the forking thread of --unconsumed-forks found: nil while it runs, "" when every fork went well.
final class ForkerOutcome: Sendable {
    let value = Mutex<String?>(nil)
}

/// The byte a reader thread read, once it has.
final class ThreadRead: Sendable {
    let value = Mutex<UInt8?>(nil)
}
