import Testing
import Userfaultfd

/// Nothing keeps a userfaultfd's objects alive once it is closed and dropped: a long-lived server opening and closing
/// userfaultfds (one per VM, per forked child, per region) must not accumulate readers, queues or resolvers.
@Suite("Lifetime")
struct LifetimeTests {
    final class Weak<T: AnyObject>: @unchecked Sendable { weak var object: T? }

    /// Waits up to a second for `weak` to empty (a reader's cancel handler runs on its queue, asynchronously).
    func released<T>(_ weak: Weak<T>) async -> Bool {
        await pollUntil(within: 1) { weak.object == nil }
    }

    @Test(.timeLimit(.minutes(1)))
    func aUserfaultfdWhoseEventsWereReadIsReleasedAfterClose() async throws {
        let weak = Weak<UserfaultFD>()
        do {
            let uffd = try UserfaultFD()
            weak.object = uffd
            let events = uffd.events
            let reader = Task { () -> Bool in
                var iterator = events.makeAsyncIterator()
                return (try? await iterator.next()) == nil
            }
            try await Task.sleep(for: .milliseconds(50))
            uffd.close()
            #expect(await reader.value, "the sequence ends when the userfaultfd closes")
        }
        #expect(await released(weak), "the UserfaultFD (and its event reader) outlived close")
    }

    @Test(.timeLimit(.minutes(1)))
    func aLazyRegionsUserfaultfdAndResolverAreReleasedWhenItsScopeEnds() async throws {
        let uffd = Weak<UserfaultFD>(), resolver = Weak<FaultResolver>()
        let source = SeededBytes.make(count: 4 * systemPageSize, seed: 77)
        try await withFaultWatchdog(seconds: 20) { scope in
            try await LazyRegion.with(length: source.count, provider: MemoryProvider(source)) { region in
                uffd.object = region.uffd
                resolver.object = region.resolver
                #expect(await finished(readByteOnThread(region, at: systemPageSize + 3), releasing: region.uffd) == source[systemPageSize + 3])
            }
        }
        #expect(await released(resolver), "the region's FaultResolver outlived its scope")
        #expect(await released(uffd), "the region's UserfaultFD outlived its scope")
    }
}
