import CUserfaultfdTestSupport
import Foundation
import Glibc
import Synchronization
import Testing
import UserfaultfdBenchSupport
import Userfaultfd

extension ReliabilityTests {
    /// In the spirit of the kernel's uffd-stress: a sparse region of 1 GiB served by a resolver, write-tracked on the same
    /// userfaultfd, under random reads and writes from 8 threads, MADV_DONTNEED of random ranges (REMOVE events) from 2
    /// more, and a tracker that write-protects random ranges, checks the protection in /proc/self/pagemap and repeats a
    /// COPY over present pages (which must fail with EEXIST and change nothing). Every read is checked against a per-page
    /// model, and at the end every page of the region; then the write tracking is checked: no page written since it
    /// was protected may still look clean, and no protected page that was not written may look written.
    ///
    /// Scale it with UFFD_STRESS_SECONDS, UFFD_STRESS_THREADS, UFFD_STRESS_REMOVERS, UFFD_STRESS_REGION_MIB,
    /// UFFD_STRESS_SEED (see the Reliability article, Sources/Userfaultfd/Userfaultfd.docc/Reliability.md).
    @Suite("Stress")
    struct Stress {
        @Test(.timeLimit(.minutes(StressConfiguration.current.timeLimitMinutes)),
              arguments: [RemovedPagePolicy.refetch, .zeroFill])
        func randomReadsWritesAndDiscardsLoseNothing(afterRemove: RemovedPagePolicy) async throws {
            let configuration = StressConfiguration.current
            let pageSize = systemPageSize
            let length = configuration.regionMiB << 20
            try await withFaultWatchdog(seconds: configuration.watchdogSeconds) { scope in
                let uffd = try scope.makeUFFD(required: [.eventRemove], optional: [.threadID])
                let memory = try AnonymousMemory(length: length, noReserve: true)
                let model = try StressModel(pageCount: length / pageSize, pageSize: pageSize, base: memory.address,
                                            dataSeed: configuration.seed)
                scope.onTearDown {
                    memory.unmap()
                    model.release()
                }
                // Write tracking on the same userfaultfd: the resolver lifts the protection of a page written to
                // (a write-protect fault), which is what a dirty tracker records.
                try uffd.register(memory.range, mode: [.missing, .writeProtect])
                let providerReads = CallCounter()
                let provider = ClosureProvider(size: length, immediate: { buffer, offset in
                    providerReads.increment()
                    let pages = min(buffer.count, length - offset) / pageSize
                    buffer.withUnsafeMutableBytes { raw in
                        for page in 0..<pages {
                            cuffd_stress_fill(raw.baseAddress! + page * pageSize, pageSize, model.providerSeed(offset / pageSize + page))
                        }
                    }
                    return .bytes(pages * pageSize)
                })
                let resolver = FaultResolver(uffd: uffd, options: .init(providerTimeout: .seconds(30), afterRemove: afterRemove))
                try await resolver.serve(memory.range, provider: provider)
                try resolver.start()

                let workers = (0..<configuration.threads).map { index in
                    OffPoolThread(name: "uffd-stress-worker") {
                        Self.work(model, seed: configuration.seed &+ UInt64(index) &* 0x1000_0001)
                    }
                }
                let removers = (0..<configuration.removers).map { index in
                    OffPoolThread(name: "uffd-stress-remover") {
                        Self.remove(model, afterRemove: afterRemove, seed: configuration.seed ^ (0xdead_0000 + UInt64(index)))
                    }
                }
                let tracker = OffPoolThread(name: "uffd-stress-tracker") {
                    Self.track(model, uffd: uffd, seed: configuration.seed ^ 0x7ac_0000)
                }
                let start = ContinuousClock.now
                try await Task.sleep(for: .milliseconds(Int(configuration.seconds * 1000)))
                model.stop.store(true, ordering: .relaxed)
                let loadThreads: [any ThreadCompletion] = workers + removers + [tracker]
                let stopped = await pollUntil(within: 60) { loadThreads.allSatisfy(\.isFinished) }
                #expect(stopped, "every load thread returns within 60 s of the stop (none is left blocked on a fault)")
                guard stopped else {
                    let states = loadThreads.map { $0.isFinished ? "returned" : "blocked" }
                    print("uffd-stress: threads \(states) (workers, removers, tracker); reads \(model.readsVerified.load(ordering: .relaxed)), writes \(model.writes.load(ordering: .relaxed)), discards \(model.removes.load(ordering: .relaxed)), protect rounds \(model.protectRounds.load(ordering: .relaxed)); \(resolver.statistics); \(model.recordedProblems)")
                    return
                }
                let loadDuration = ContinuousClock.now - start

                // Write tracking, before the final read (which changes nothing a writer did, but keep it simple).
                let (lostWrites, lostProtections) = Self.checkTracking(model)

                // Every page of the region against the model, 64 MiB at a time, each chunk given back once checked
                // (so the check's footprint stays small; it exercises REMOVE once more).
                let finalCheck = OffPoolThread(name: "uffd-stress-final") { () -> Int in
                    var verified = 0
                    let chunk = (64 << 20) / pageSize
                    for first in stride(from: 0, to: model.pageCount, by: chunk) {
                        let pages = first..<min(first + chunk, model.pageCount)
                        for page in pages where model.verify(page, when: "in the final check") { verified += 1 }
                        madvise(UnsafeMutableRawPointer(bitPattern: model.address(first)), pages.count * pageSize, MADV_DONTNEED)
                    }
                    return verified
                }
                let pagesVerifiedAtTheEnd = await finalCheck.value
                let statistics = resolver.statistics

                let corruptions = model.corruptions.load(ordering: .relaxed)
                let readsVerified = model.readsVerified.load(ordering: .relaxed)
                let report = """
                    uffd-stress afterRemove=\(afterRemove) \(configuration) (load ran \(loadDuration)):
                      faults served \(statistics.faults) (pages copied \(statistics.pagesCopied), zero pages \(statistics.zeroPages), \
                    joined \(statistics.deduplicatedFaults), already present \(statistics.alreadyPresentFaults), \
                    deferred retries \(statistics.deferredRetries), provider reads \(providerReads.current), provider errors \(statistics.providerErrors))
                      pages verified \(readsVerified + pagesVerifiedAtTheEnd) (\(readsVerified) reads during the load, \
                    \(pagesVerifiedAtTheEnd) of \(model.pageCount) pages at the end); writes \(model.writes.load(ordering: .relaxed))
                      discards \(model.removes.load(ordering: .relaxed)) (\(model.pagesRemoved.load(ordering: .relaxed)) pages); \
                    write-protect rounds \(model.protectRounds.load(ordering: .relaxed)), writes to protected pages \
                    \(model.writesToProtectedPages.load(ordering: .relaxed)); repeated COPY over present pages \
                    \(model.repeatedCopies.load(ordering: .relaxed)) (all EEXIST: \(model.copyOverPresentPage.load(ordering: .relaxed) == 0))
                      corruptions \(corruptions), tracking errors \(model.trackingErrors.load(ordering: .relaxed) + lostWrites + lostProtections) \
                    (written pages seen clean \(lostWrites), clean pages seen written \(lostProtections))
                    """
                print(report)
                for problem in model.recordedProblems { print("  uffd-stress: \(problem)") }

                #expect(corruptions == 0, "corruptions: \(model.recordedProblems)")
                #expect(pagesVerifiedAtTheEnd == model.pageCount)
                #expect(lostWrites == 0, "pages written since they were protected must not look clean")
                #expect(lostProtections == 0, "protected pages nobody wrote must still be protected")
                #expect(model.trackingErrors.load(ordering: .relaxed) == 0, "\(model.recordedProblems)")
                #expect(model.copyOverPresentPage.load(ordering: .relaxed) == 0, "a COPY over a present page must fail with EEXIST")
                // The load really happened (the test can fail only if it did).
                #expect(readsVerified > 0 && model.writes.load(ordering: .relaxed) > 0)
                #expect(statistics.faults > 0)
                if configuration.removers > 0 { #expect(model.removes.load(ordering: .relaxed) > 0) }
                #expect(model.protectRounds.load(ordering: .relaxed) > 0)
                #expect(model.writesToProtectedPages.load(ordering: .relaxed) > 0, "writes hit protected pages")
                #expect(model.repeatedCopies.load(ordering: .relaxed) > 0)
                await resolver.cancel()
            }
        }

        /// A page: half the time from a hot window of 1024 pages, where threads collide, else anywhere.
        static func pickPage(_ model: StressModel, _ random: inout SplitMix64) -> Int {
            let hot = min(1024, model.pageCount)
            return random.next() & 1 == 0 ? Int(random.next() % UInt64(hot)) : Int(random.next() % UInt64(model.pageCount))
        }

        /// A range of 1–64 pages (1 in 8: up to 512).
        static func pickRange(_ model: StressModel, _ random: inout SplitMix64) -> Range<Int> {
            let maximum = random.next() % 8 == 0 ? 512 : 64
            let count = min(model.pageCount, 1 + Int(random.next() % UInt64(maximum)))
            let first = min(pickPage(model, &random), model.pageCount - count)
            return first..<first + count
        }

        /// Reads (60 %) and writes (40 %) whole pages; every read is checked against the model.
        static func work(_ model: StressModel, seed: UInt64) {
            var random = SplitMix64(seed: seed)
            while !model.isStopped {
                let page = pickPage(model, &random)
                model.lock(page)
                if random.next() % 10 < 6 {
                    if model.verify(page, when: "on a read") { model.readsVerified.add(1, ordering: .relaxed) }
                } else {
                    let seed = random.next() | 2  // never 0 or 1 (provider data, zeros)
                    cuffd_stress_fill(UnsafeMutableRawPointer(bitPattern: model.address(page)), model.pageSize, seed)
                    model.content[page] = seed
                    if model.tracking[page] == StressModel.Tracking.protectedClean.rawValue {
                        model.writesToProtectedPages.add(1, ordering: .relaxed)
                    }
                    model.tracking[page] = StressModel.Tracking.written.rawValue
                    model.writes.add(1, ordering: .relaxed)
                }
                model.unlock(page)
            }
        }

        /// Gives random ranges back (MADV_DONTNEED: a REMOVE event, during which this thread sleeps until the resolver
        /// read it); the pages then read as the provider's data again, or zeros, per `afterRemove`.
        static func remove(_ model: StressModel, afterRemove: RemovedPagePolicy, seed: UInt64) {
            var random = SplitMix64(seed: seed)
            while !model.isStopped {
                let pages = pickRange(model, &random)
                model.lock(pages)
                if madvise(UnsafeMutableRawPointer(bitPattern: model.address(pages.lowerBound)), pages.count * model.pageSize, MADV_DONTNEED) != 0 {
                    model.record("madvise(DONTNEED) failed: errno \(errno)")
                    model.trackingErrors.add(1, ordering: .relaxed)
                } else {
                    for page in pages {
                        model.content[page] = afterRemove == .zeroFill ? StressModel.zeroContent : StressModel.providerContent
                        model.tracking[page] = StressModel.Tracking.unknown.rawValue
                    }
                    model.removes.add(1, ordering: .relaxed)
                    model.pagesRemoved.add(pages.count, ordering: .relaxed)
                }
                model.unlock(pages)
                usleep(300)
            }
        }

        /// Write-protects random ranges and records which pages are protected (present ones: an empty PTE cannot carry
        /// the protection without WP_UNPOPULATED); repeats a COPY over one present page, which must fail with EEXIST.
        static func track(_ model: StressModel, uffd: UserfaultFD, seed: UInt64) {
            var random = SplitMix64(seed: seed)
            var entries = [UInt64](repeating: 0, count: 512)
            let source = UnsafeMutableRawPointer.allocate(byteCount: model.pageSize, alignment: model.pageSize)
            source.initializeMemory(as: UInt8.self, repeating: 0xa5, count: model.pageSize)
            defer { source.deallocate() }
            while !model.isStopped {
                let pages = pickRange(model, &random)
                let range = MemoryRange(start: model.address(pages.lowerBound), length: pages.count * model.pageSize)
                model.lock(pages)
                defer { model.unlock(pages) }
                // Which pages are present before: only those can carry the protection. (A page missing now may be
                // filled meanwhile by readahead or a cluster of zero pages for a neighbour's fault: it is not protected.)
                let before = entries.withUnsafeMutableBufferPointer {
                    cuffd_stress_pagemap(range.start, pages.count, model.pageSize, $0.baseAddress!)
                }
                let presentBefore = entries.prefix(pages.count).map { $0 & (1 << 63) != 0 }
                guard before == 0 else {
                    model.record("pagemap read failed: \(before)")
                    model.trackingErrors.add(1, ordering: .relaxed)
                    continue
                }
                guard retryingWhileEventsPending(model, "UFFDIO_WRITEPROTECT", { () throws(UserfaultError) in
                    try uffd.writeProtect(range, enabled: true)
                }) else { continue }
                model.protectRounds.add(1, ordering: .relaxed)
                let status = entries.withUnsafeMutableBufferPointer {
                    cuffd_stress_pagemap(range.start, pages.count, model.pageSize, $0.baseAddress!)
                }
                guard status == 0 else {
                    model.record("pagemap read failed: \(status)")
                    model.trackingErrors.add(1, ordering: .relaxed)
                    continue
                }
                var present: Int?
                for (index, page) in pages.enumerated() {
                    let entry = entries[index]
                    guard presentBefore[index], entry & (1 << 63) != 0 else {
                        model.tracking[page] = StressModel.Tracking.unknown.rawValue
                        continue
                    }
                    present = page
                    if entry & (1 << 57) != 0 {
                        model.tracking[page] = StressModel.Tracking.protectedClean.rawValue
                    } else {
                        model.record("page \(page) is present but not write-protected right after UFFDIO_WRITEPROTECT")
                        model.trackingErrors.add(1, ordering: .relaxed)
                    }
                }
                // uffd-stress's check: a COPY over a present page fails with EEXIST and leaves it as it was.
                if let page = present {
                    _ = retryingWhileEventsPending(model, "UFFDIO_COPY over a present page", { () throws(UserfaultError) in
                        do throws(UserfaultError) {
                            try uffd.copy(from: source, to: model.address(page), length: model.pageSize)
                            model.copyOverPresentPage.add(1, ordering: .relaxed)
                            model.record("UFFDIO_COPY over present page \(page) succeeded")
                        } catch where error.code == .pageExists {
                            model.repeatedCopies.add(1, ordering: .relaxed)
                        }
                    })
                    model.verify(page, when: "after a repeated COPY")
                }
                usleep(2000)
            }
        }

        /// Runs `body`, again while the kernel says a non-fault event is unread (EAGAIN), for up to 10 s.
        static func retryingWhileEventsPending(
            _ model: StressModel, _ what: String, _ body: () throws(UserfaultError) -> Void
        ) -> Bool {
            let deadline = ContinuousClock.now + .seconds(10)
            while true {
                do {
                    try body()
                    return true
                } catch {
                    guard case .tryAgain = error.code, ContinuousClock.now < deadline else {
                        model.record("\(what) failed: \(error)")
                        model.trackingErrors.add(1, ordering: .relaxed)
                        return false
                    }
                    usleep(100)
                }
            }
        }

        /// After the load: every page written since it was protected must have lost its protection (the write was
        /// tracked), and every protected page nobody wrote must still have it.
        static func checkTracking(_ model: StressModel) -> (lostWrites: Int, lostProtections: Int) {
            var lostWrites = 0, lostProtections = 0
            let batch = 1 << 16
            var entries = [UInt64](repeating: 0, count: batch)
            for first in stride(from: 0, to: model.pageCount, by: batch) {
                let count = min(batch, model.pageCount - first)
                let status = entries.withUnsafeMutableBufferPointer {
                    cuffd_stress_pagemap(model.address(first), count, model.pageSize, $0.baseAddress!)
                }
                guard status == 0 else {
                    model.record("pagemap read failed: \(status)")
                    model.trackingErrors.add(1, ordering: .relaxed)
                    continue
                }
                for index in 0..<count {
                    let page = first + index, entry = entries[index]
                    let present = entry & (1 << 63) != 0, protected = entry & (1 << 57) != 0
                    switch StressModel.Tracking(rawValue: model.tracking[page]) {
                    case .written?:
                        if !present || protected {
                            lostWrites += 1
                            model.record("page \(page) was written but looks \(present ? "clean" : "absent")")
                        }
                    case .protectedClean?:
                        if !present || !protected {
                            lostProtections += 1
                            model.record("page \(page) was protected and not written but looks \(present ? "written" : "absent")")
                        }
                    default:
                        break
                    }
                }
            }
            return (lostWrites, lostProtections)
        }
    }
}
