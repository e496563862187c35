import Glibc
import Testing
import Userfaultfd

extension RegionEventTests {
    /// A page the resolver installed can vanish without a REMOVE it could apply: madvise(DONTNEED) zaps *after* its
    /// REMOVE is read (a page installed in between is gone again), and a userfaultfd without EVENT_REMOVE gets no event
    /// at all. The next fault on such a page must be resolved again, not answered with a wake (which made the thread
    /// fault again forever: the stress suite's zero-fill case caught it as 9 M "already present" faults).
    @Test(.timeLimit(.minutes(1)))
    func pageZappedWithoutAnEventIsResolvedAgain() async throws {
        let pageSize = Self.pageSize
        let source = SeededBytes.make(count: 4 * pageSize, seed: 511)
        let calls = CallLog()
        try await withFaultWatchdog(seconds: 20) { scope in
            let uffd = try scope.makeUFFD()  // no EVENT_REMOVE: the zap below is invisible to the resolver
            let mapping = try scope.makeMapping(pages: 4)
            try uffd.register(mapping.range, mode: .missing)
            let resolver = FaultResolver(uffd: uffd, options: .init(readahead: .none))
            try await resolver.serve(mapping.range, provider: Self.counted(source, calls))
            try resolver.start()

            #expect(await finished(readOnThread(mapping.page(1) + 7), releasing: uffd) == source[pageSize + 7])
            #expect(calls.count(at: pageSize) == 1)
            #expect(madvise(mapping.pointer + pageSize, pageSize, MADV_DONTNEED) == 0)

            // Faults again: served from the provider again, with the provider's bytes.
            #expect(await finished(readOnThread(mapping.page(1) + 9), releasing: uffd) == source[pageSize + 9])
            #expect(calls.count(at: pageSize) == 2, "the zapped page was fetched again: \(calls.all)")
            let statistics = resolver.statistics
            #expect(statistics.alreadyPresentFaults == 0, "\(statistics)")
        }
    }
}
