import Foundation
import Glibc
import Testing
import Userfaultfd

/// The send side of descriptor passing: the message that carries the userfaultfd always has a byte (a zero-length
/// stream message carries no SCM_RIGHTS on Linux), and a peer that never reads makes the send fail in bounded time.
@Suite("Sending a userfaultfd")
struct DescriptorSendTests {
    /// `send(over:)` with its default, empty payload: the descriptor arrives, the payload reads as empty, and the
    /// received userfaultfd is the sender's (a copy through it fills the sender's registered page).
    @Test(.timeLimit(.minutes(1)))
    func theDefaultEmptyPayloadCarriesTheDescriptor() async throws {
        let (a, b) = try DescriptorPassingTests().socketPair()
        let original = try UserfaultFD()
        defer { original.close() }
        let region = try AnonymousMemory(length: systemPageSize)
        try original.register(region.range, mode: .missing)
        try original.send(over: a)
        let (received, payload) = try await UserfaultFD.receive(from: b, timeout: .seconds(2))
        defer { received.close() }
        #expect(payload.isEmpty)
        let source = try AnonymousMemory(length: systemPageSize)
        memset(source.baseAddress, 0x6b, systemPageSize)
        try received.copy(from: source.baseAddress, to: region.address, length: systemPageSize)
        #expect(region.baseAddress.load(as: UInt8.self) == 0x6b)
    }

    /// A peer whose receive buffer is full and who never reads: the send gives up with `.timedOut` after its default
    /// timeout (5 s) instead of spinning on EAGAIN forever. On a thread of its own: the send waits synchronously.
    @Test(.timeLimit(.minutes(1)))
    func aFullSocketMakesTheSendTimeOut() async throws {
        let (a, b) = try DescriptorPassingTests().socketPair()
        defer { b.close() }
        var filler = [UInt8](repeating: 1, count: 65536)
        var queued = 0
        while true {
            let sent = Glibc.send(a.fileDescriptor, &filler, filler.count, Int32(MSG_DONTWAIT))
            if sent < 0 { break }
            queued += sent
        }
        #expect(errno == EAGAIN && queued > 0, "the socket should be full (errno \(errno), \(queued) bytes queued)")
        let uffd = try UserfaultFD()
        defer { uffd.close() }
        let start = ContinuousClock.now
        let sender = OffPoolThread { () -> DescriptorPassingError? in
            do throws(DescriptorPassingError) {
                try uffd.send(over: a, payload: [1, 2, 3])
                return nil
            } catch {
                return error
            }
        }
        let finished = await sender.finishes(within: 12)
        #expect(finished, "send still spinning on EAGAIN after 12 s")
        if !finished {
            // Let the spinning send through (drain the peer), so that the thread ends.
            while !sender.isFinished {
                _ = Glibc.recv(b.fileDescriptor, &filler, filler.count, Int32(MSG_DONTWAIT))
                try await Task.sleep(for: .milliseconds(1))
            }
            return
        }
        let error = await sender.value
        #expect(error?.code == .timedOut, "\(String(describing: error))")
        let elapsed = ContinuousClock.now - start
        #expect(elapsed >= .seconds(4) && elapsed < .seconds(10), "gave up after \(elapsed)")
        a.close()
    }
}
