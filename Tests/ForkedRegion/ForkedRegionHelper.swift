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
        guard arguments.count == 1, ["--serve", "--no-serve"].contains(arguments[0]) else {
            fail(2, "usage: uffd-forked-region --serve|--no-serve")
        }
        alarm(60)  // a last-resort bound; the test kills this process earlier when it overruns
        do {
            let report = try await ForkScenario.run(serving: arguments[0] == "--serve")
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

/// The byte a reader thread read, once it has.
final class ThreadRead: Sendable {
    let value = Mutex<UInt8?>(nil)
}
