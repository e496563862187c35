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

extension RegionEventTests {
    /// Under the zero-fill policy a removed page reads as zeros even when a neighbour's fault or a prefetch brings in a
    /// cluster that spans it: the provider's data must go around it (the stress suite found provider data there).
    @Test(.timeLimit(.minutes(1)), arguments: [false, true])
    func removedPagesStayZeroInsideANeighboursCluster(prefetch: Bool) async throws {
        let pageSize = Self.pageSize
        let source = SeededBytes.make(count: 16 * pageSize, seed: 512)
        let calls = CallLog()
        try await withFaultWatchdog(seconds: 20) { scope in
            let uffd = try scope.makeUFFD(required: [.eventRemove])
            let mapping = try scope.makeMapping(pages: 16)
            try uffd.register(mapping.range, mode: .missing)
            let provider = ClosureProvider(size: source.count, preferredReadSize: 16 * pageSize) { buffer, offset in
                calls.record(offset, buffer.count)
                return .bytes(fillBuffer(buffer, from: source, at: offset))
            }
            let resolver = FaultResolver(uffd: uffd, options: .init(afterRemove: .zeroFill))
            try await resolver.serve(mapping.range, provider: provider)
            try resolver.start()

            // Pages 8..<12 removed before anything touched them (madvise sleeps until the REMOVE is read: a thread).
            let discard = OffPoolThread(name: "uffd-ev-discard") {
                madvise(mapping.pointer + 8 * pageSize, 4 * pageSize, MADV_DONTNEED)
            }
            #expect(await finished(discard, releasing: uffd) == 0)

            if prefetch {
                try await resolver.prefetch(mapping.range)
            } else {
                // One fault at page 7: its cluster (aligned to the provider's 16-page reads) spans the removed pages.
                #expect(await finished(readOnThread(mapping.page(7)), releasing: uffd) == source[7 * pageSize])
            }
            let bytes = await finished(OffPoolThread(name: "uffd-ev-copy") {
                Array(UnsafeRawBufferPointer(start: mapping.pointer, count: 16 * pageSize))
            }, releasing: uffd)
            var expected = source
            expected.replaceSubrange(8 * pageSize..<12 * pageSize, with: repeatElement(0, count: 4 * pageSize))
            #expect(bytes.map { firstDifference($0, expected) } == .some(nil), "removed pages are zeros, the rest provider data")
            #expect(calls.all.allSatisfy { $0.offset + $0.count <= 8 * pageSize || $0.offset >= 12 * pageSize },
                    "the provider was never asked for removed pages: \(calls.all)")
        }
    }
}
