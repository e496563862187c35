import Testing
import Userfaultfd

/// The test helpers' own guarantees: a fault nobody resolves does not hang the suite.
@Suite("Watchdog")
struct WatchdogTests {
    @Test("An unresolved fault is ended by the watchdog, which records a failure", .timeLimit(.minutes(1)))
    func watchdogClosesTheUserfaultfd() async throws {
        var blockedReader: OffPoolThread<UInt8>?
        await withKnownIssue("the watchdog records that the test ran out of time") {
            try await withFaultWatchdog(seconds: 1) { scope in
                let uffd = try scope.makeUFFD()
                let mapping = try scope.makeMapping(pages: 1)
                try uffd.register(mapping.range, mode: .missing)
                let reader = readOnThread(mapping.address)
                blockedReader = reader
                var events = uffd.events.makeAsyncIterator()
                _ = try await nextPageFault(&events)
                // Never resolved: the watchdog closes the userfaultfd, which ends the events and wakes the reader.
                #expect(try await events.next() == nil)
                #expect(await reader.value == 0)
                #expect(uffd.isClosed)
            }
        }
        let reader = try #require(blockedReader)
        #expect(reader.isFinished)
    }
}
