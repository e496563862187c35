import Dispatch

/// Waits `duration` without holding a thread and without Swift's timers: a continuation that a Dispatch timer resumes.
///
/// What a slow provider awaits in the benchmarks and tests: it leaves the cooperative pool's threads free, as a network
/// read would.
public func dispatchSleep(_ duration: Duration) async {
    let nanoseconds = Int(duration.components.seconds) * 1_000_000_000 + Int(duration.components.attoseconds / 1_000_000_000)
    await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
        DispatchQueue.global().asyncAfter(deadline: .now() + .nanoseconds(nanoseconds)) { continuation.resume() }
    }
}
