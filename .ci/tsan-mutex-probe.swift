// Why .ci/tsan.supp suppresses races inside `Mutex.withLock` closures, checked on every CI run.
//
// Synchronization.Mutex locks with atomics and futex(2) inside the prebuilt toolchain, which ThreadSanitizer does not
// instrument, so it sees no happens-before edge between two critical sections: a correct program that only touches
// its state under `withLock` is reported as a "Swift access race". `.ci/run` builds this file with -sanitize=thread
// and runs it twice:
//   `mutex`  only Mutex-guarded accesses: must be reported without the suppressions (else they are stale: remove
//            them) and must be silent with them;
//   `plain`  the same plus an unguarded counter: must still be reported with the suppressions, so they cannot hide
//            a real race outside a critical section.
import Dispatch
import Foundation
import Synchronization

final class Shared: @unchecked Sendable {
    let guarded = Mutex<[Int: Int]>([:])
    var unguarded = 0
}

let racePlainCounter = CommandLine.arguments.dropFirst().first == "plain"
let shared = Shared()
let group = DispatchGroup()
// Four threads of their own, not Dispatch workers: on a loaded machine libdispatch may run all four blocks one after
// the other on one worker, and accesses from a single thread are no race (a CI run saw nothing reported that way).
for thread in 0..<4 {
    group.enter()
    Thread {
        for step in 0..<20_000 {
            shared.guarded.withLock { $0[step % 64, default: 0] += thread }
            if racePlainCounter { shared.unguarded += 1 }
        }
        group.leave()
    }.start()
}
group.wait()
print("entries \(shared.guarded.withLock { $0.count })")
