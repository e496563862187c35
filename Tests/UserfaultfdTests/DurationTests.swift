import Dispatch
import Testing
@_spi(Decoding) import Userfaultfd

/// Durations handed to Dispatch: any value a caller can write, `.seconds(Int64.max)` included, saturates instead of
/// overflowing.
@Suite("Durations")
struct DurationTests {
    @Test func veryLongDurationsSaturateToNever() {
        #expect(Duration.seconds(Int64.max).timeInterval == .never)
        #expect((Duration.seconds(Int64.max / 1_000_000_000) + .nanoseconds(999_999_999)).timeInterval == .never)
        #expect(Duration.seconds(9_223_372_036).timeInterval == .nanoseconds(9_223_372_036_000_000_000))
        #expect(Duration.milliseconds(1500).timeInterval == .nanoseconds(1_500_000_000))
    }

    @Test func negativeDurationsAreZero() {
        #expect(Duration.seconds(Int64.min).timeInterval == .nanoseconds(0))
        #expect(Duration.milliseconds(-1).timeInterval == .nanoseconds(0))
        #expect(Duration.seconds(-1).saturatingNanoseconds == 0)
        #expect(Duration.seconds(Int64.max).saturatingNanoseconds == .max)
    }

    /// Through the public API: a receive with a timeout of Int64.max seconds waits, and gets the message.
    @Test(.timeLimit(.minutes(1)))
    func aReceiveWithTheLongestTimeoutGetsItsMessage() async throws {
        let (a, b) = try DescriptorPassingTests().socketPair()
        let receiving = Task { try await b.receive(timeout: .seconds(Int64.max)) }
        try await Task.sleep(for: .milliseconds(20))
        try a.send([9, 8, 7])
        #expect(try await receiving.value.payload == [9, 8, 7])
    }

    /// A resolver's polling window of Int64.max seconds starts (the reader's window saturates; polling still stops at
    /// its 1 ms budget).
    @Test(.timeLimit(.minutes(1)))
    func theLongestPollingWindowStarts() throws {
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let resolver = FaultResolver(uffd: uffd, options: .init(pollingWindow: .seconds(Int64.max)))
        try resolver.start()
    }
}
