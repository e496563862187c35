import Testing
import Userfaultfd

/// What `FaultResolver.forkedChildren` keeps for a consumer: bounded, oldest closed first, the rest closed at the end
/// (the fork scenarios themselves run in `uffd-forked-region`; see the region-event tests). Plain userfaultfds stand in
/// for children's: only their descriptors matter here.
@Suite("Forked child queue")
struct ForkedChildQueueTests {
    @Test(.timeLimit(.minutes(1)))
    func keepsTheNewestUpToItsLimitAndClosesTheRestAtTheEnd() async throws {
        let queue = ForkedChildQueue(limit: 4)
        let children = try (0..<6).map { _ in try UserfaultFD() }
        let dropped = children.map { queue.offer($0) }.reduce(0, +)
        #expect(dropped == 2)
        #expect(children.map(\.isClosed) == [true, true, false, false, false, false], "the two oldest are closed")
        var iterator = queue.stream.makeAsyncIterator()
        let first = await iterator.next()
        #expect(first === children[2], "the consumer gets the oldest kept child first")
        queue.finish()
        #expect(children[3...].allSatisfy { $0.isClosed }, "children still kept at the end are closed")
        #expect(!children[2].isClosed, "the consumer's child is its own")
        #expect(await iterator.next() == nil)
        let late = try UserfaultFD()
        #expect(queue.offer(late) == 1 && late.isClosed, "a child arriving after the end is closed")
        children[2].close()
    }

    @Test(.timeLimit(.minutes(1)))
    func aWaitingConsumerGetsTheChildAndCancellingItEndsItsStream() async throws {
        let queue = ForkedChildQueue(limit: 4)
        let child = try UserfaultFD()
        let consumer = Task { await queue.next() }
        try await Task.sleep(for: .milliseconds(20))
        queue.offer(child)
        #expect(await consumer.value === child)
        #expect(queue.count == 0)
        let cancelled = Task { await queue.next() }
        try await Task.sleep(for: .milliseconds(20))
        cancelled.cancel()
        #expect(await cancelled.value == nil)
        child.close()
    }
}
