import Foundation
import Glibc
import Testing
@_spi(Decoding) import Userfaultfd

@Suite("Passing a userfaultfd over a Unix socket")
struct DescriptorPassingTests {
    /// A connected pair of non-blocking Unix stream sockets.
    func socketPair(type: Int32 = Int32(SOCK_STREAM.rawValue)) throws -> (UnixSocketConnection, UnixSocketConnection) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, type | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw ChildProcessError("socketpair failed: \(errno)")
        }
        return (UnixSocketConnection(descriptor: fds[0]), UnixSocketConnection(descriptor: fds[1]))
    }

    /// A probe for "every copy of this descriptor was closed": pass `probe.passed` to the receiver, and
    /// ``isClosedEverywhere`` turns true once no copy of it is left open (the other end then reads end of stream).
    struct ClosureProbe {
        let passed: Int32
        let observer: Int32

        init() throws {
            var fds: [Int32] = [-1, -1]
            guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_NONBLOCK.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
                throw ChildProcessError("socketpair failed: \(errno)")
            }
            passed = fds[0]
            observer = fds[1]
        }

        /// Closes this process's own copy of `passed` and reports whether the peer end now sees end of stream.
        func isClosedEverywhere() -> Bool {
            close(passed)
            var byte: UInt8 = 0
            let result = read(observer, &byte, 1)
            close(observer)
            return result == 0
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func receivedUserfaultfdResolvesTheSendersFaults() async throws {
        let (a, b) = try socketPair()
        let original = try UserfaultFD()
        let region = try AnonymousMemory(length: 4 * systemPageSize)
        try original.register(region.range, mode: .missing)
        try original.send(over: a, payload: Array("hello".utf8))
        let (received, payload) = try await UserfaultFD.receive(from: b, timeout: .seconds(5))
        #expect(payload == Array("hello".utf8))
        #expect(received.fileDescriptor != original.fileDescriptor)

        // The received descriptor is the same userfaultfd: a copy through it fills the sender's registered page.
        let source = try AnonymousMemory(length: systemPageSize)
        memset(source.baseAddress, 0x5a, systemPageSize)
        try received.copy(from: source.baseAddress, to: region.address, length: systemPageSize)
        #expect(region.baseAddress.load(as: UInt8.self) == 0x5a)
        // ...and the page is now present for the original too.
        #expect(throws: UserfaultError.self) { try original.copy(from: source.baseAddress, to: region.address, length: systemPageSize) }
        received.close()
        original.close()
    }

    @Test(.timeLimit(.minutes(1)))
    func messageWithoutDescriptorIsTyped() async throws {
        let (a, b) = try socketPair()
        try a.send(Array("no fd".utf8))
        do {
            _ = try await UserfaultFD.receive(from: b, timeout: .seconds(5))
            Issue.record("accepted a message without a descriptor")
        } catch let error as DescriptorPassingError {
            #expect(error.code == .noDescriptor)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func severalDescriptorsAreRefusedAndClosed() async throws {
        let (a, b) = try socketPair()
        let first = try ClosureProbe(), second = try ClosureProbe()
        try a.send(Array("two".utf8), descriptors: [first.passed, second.passed])
        do {
            _ = try await UserfaultFD.receive(from: b, timeout: .seconds(5))
            Issue.record("accepted two descriptors")
        } catch let error as DescriptorPassingError {
            #expect(error.code == .tooManyDescriptors(2))
        }
        #expect(first.isClosedEverywhere(), "the received descriptors must be closed")
        #expect(second.isClosedEverywhere(), "the received descriptors must be closed")
    }

    /// sendmsg(2) by hand, to send what `UnixSocketConnection.send` refuses: `descriptors` in one SCM_RIGHTS message.
    func sendRaw(_ socket: UnixSocketConnection, payload: [UInt8], descriptors: [Int32]) throws {
        var control = ControlBuffer().with(rights: descriptors).bytes
        var payload = payload
        let sent = payload.withUnsafeMutableBytes { bytes in
            control.withUnsafeMutableBytes { control in
                var vector = iovec(iov_base: bytes.baseAddress, iov_len: bytes.count)
                return withUnsafeMutablePointer(to: &vector) { vector in
                    var header = msghdr(msg_name: nil, msg_namelen: 0, msg_iov: vector, msg_iovlen: 1,
                                        msg_control: control.baseAddress, msg_controllen: control.count, msg_flags: 0)
                    return sendmsg(socket.fileDescriptor, &header, Int32(MSG_NOSIGNAL))
                }
            }
        }
        guard sent == payload.count else { throw ChildProcessError("sendmsg failed: \(errno)") }
    }

    @Test(.timeLimit(.minutes(1)))
    func moreDescriptorsThanTheControlBufferHoldsAreTruncatedAndClosed() async throws {
        // 17 copies of one probe: the kernel installs the 16 that fit, sets MSG_CTRUNC and drops the 17th itself.
        let (a, b) = try socketPair()
        let probe = try ClosureProbe()
        try sendRaw(a, payload: Array("17".utf8), descriptors: [Int32](repeating: probe.passed, count: 17))
        do {
            _ = try await b.receive(timeout: .seconds(5))
            Issue.record("accepted a message whose descriptors were cut")
        } catch {
            #expect(error.code == .descriptorsTruncated)
        }
        #expect(probe.isClosedEverywhere(), "the 16 received copies must be closed")
    }

    @Test(.timeLimit(.minutes(1)))
    func descriptorThatIsNotAUserfaultfdIsRefused() async throws {
        let (a, b) = try socketPair()
        let probe = try ClosureProbe()
        try a.send([1, 2, 3], descriptors: [probe.passed])
        do {
            _ = try await UserfaultFD.receive(from: b, timeout: .seconds(5))
            Issue.record("adopted a socket")
        } catch let error as UserfaultError {
            #expect(error.code == .notUserfaultfd)
            #expect(error.detail.contains("socket"))
        }
        #expect(probe.isClosedEverywhere(), "the refused descriptor must be closed")
    }

    @Test(.timeLimit(.minutes(1)))
    func truncatedPayloadAndTimeoutsAndHangUp() async throws {
        // Message boundaries (and so truncation) exist on SOCK_SEQPACKET: a 100-byte message into a 16-byte buffer.
        let (a, b) = try socketPair(type: Int32(SOCK_SEQPACKET.rawValue))
        let probe = try ClosureProbe()
        try a.send([UInt8](repeating: 7, count: 100), descriptors: [probe.passed])
        do {
            _ = try await UserfaultFD.receive(from: b, maximumPayload: 16, timeout: .seconds(5))
            Issue.record("accepted a truncated payload")
        } catch let error as DescriptorPassingError {
            #expect(error.code == .payloadTruncated)
        }
        #expect(probe.isClosedEverywhere(), "the descriptor of a truncated message is closed")

        let (c, d) = try socketPair()
        do {
            _ = try await d.receive(timeout: .milliseconds(50))
            Issue.record("received from a silent peer")
        } catch {
            #expect(error.code == .timedOut)
        }
        c.close()
        let end = try await d.receive(timeout: .seconds(5))
        #expect(end.isEndOfStream)
        do {
            _ = try await UserfaultFD.receive(from: d, timeout: .seconds(5))
            Issue.record("received from a closed peer")
        } catch let error as DescriptorPassingError {
            #expect(error.code == .connectionClosed)
        }
    }

    @Test(.timeLimit(.minutes(1)))
    func listenerAcceptsAndCloseCancelsAccept() async throws {
        let directory = try TemporaryDirectory()
        let path = "\(directory.path)/s.sock"
        let listener = try UnixSocketListener(path: path)
        async let accepted = listener.accept()
        let client = try UnixSocketConnection.connect(path: path)
        let server = try await accepted
        try client.send(Array("ping".utf8))
        let message = try await server.receive(timeout: .seconds(5))
        #expect(message.payload == Array("ping".utf8))
        #expect(server.peerProcessID == getpid())

        async let pending = listener.accept()
        try await Task.sleep(for: .milliseconds(20))
        listener.close()
        do {
            _ = try await pending
            Issue.record("accept returned after close")
        } catch let error as DescriptorPassingError {
            #expect(error.code == .cancelled)
        }
        #expect(!FileManager.default.fileExists(atPath: path), "close removes the socket file")
        #expect(throws: DescriptorPassingError.self) { try UnixSocketConnection.connect(path: path) }
        #expect(throws: DescriptorPassingError.self) { try UnixSocketListener(path: "/tmp/" + String(repeating: "x", count: 200)) }
    }
}
