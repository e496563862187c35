import Testing
import Userfaultfd

/// The examples in the API documentation, run as written: they must compile and do what the text says.
@Suite("Documented examples")
struct DocumentedExampleTests {
    /// `FaultResolver`'s own loop example: serve a range, then feed the resolver from `uffd.events`. `serve` throws, so
    /// the example says `try await`; the loop ends when the userfaultfd is closed.
    @Test(.timeLimit(.minutes(1)))
    func faultResolverLoopExample() async throws {
        let pageSize = systemPageSize
        let bytes = (0..<(2 * pageSize)).map { UInt8(truncatingIfNeeded: $0 % 253 + 1) }
        let provider = MemoryProvider(bytes)
        try await withFaultWatchdog(seconds: 20) { scope in
            let uffd = try scope.makeUFFD()
            let mapping = try scope.makeMapping(pages: 2)
            let range = mapping.range
            try uffd.register(range, mode: .missing)
            let loop = Task(executorPreference: uffd.eventExecutor) {
                // The documented example, verbatim from here:
                let resolver = FaultResolver(uffd: uffd)
                try await resolver.serve(range, provider: provider)
                for try await event in uffd.events {
                    try await resolver.handle(event)
                }
            }
            let reader = readOnThread(mapping.page(1) + 7)
            #expect(await reader.value == bytes[pageSize + 7])
            uffd.close()
            try await loop.value
        }
    }
}
