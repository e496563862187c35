import CUserfaultfd
import Glibc

/// One message received from a Unix socket: bytes and the descriptors that came with them (owned by the receiver).
///
/// Not part of the API: `@_spi(Decoding)`, so `import Userfaultfd` does not see it. The fuzzers (a package of their own,
/// which `package` access cannot reach), the page server and the tests use it with `@_spi(Decoding) import Userfaultfd`.
@_spi(Decoding) public struct ReceivedMessage: Sendable {
    /// The bytes.
    public var payload: [UInt8]
    /// The descriptors passed with SCM_RIGHTS, installed in this process (close-on-exec).
    public var descriptors: [Int32]
    /// True when the peer closed the connection (no bytes, no descriptors).
    public var isEndOfStream: Bool { payload.isEmpty && descriptors.isEmpty }

    /// The most descriptors one message may carry (more is ``DescriptorPassingError/Code/descriptorsTruncated``).
    public static let maximumDescriptors = Int(CUFFD_MAX_PASSED_FDS)

    /// Closes every received descriptor.
    public func closeDescriptors() {
        for descriptor in descriptors { _ = Glibc.close(descriptor) }
    }

    /// Turns what one `recvmsg(2)` returned into a message: the payload, the raw control buffer (`msg_control`, its
    /// length `msg_controllen`) and `msg_flags`. Everything in `control` is the peer's word and is checked: headers
    /// are read only within the buffer, whatever their `cmsg_len` says, and control messages other than
    /// `SCM_RIGHTS` are skipped.
    ///
    /// The receive path of ``UnixSocketConnection`` uses this; it has public access so that tests and fuzzers can feed it
    /// synthesized buffers.
    ///
    /// - Parameters:
    ///   - payload: the bytes received.
    ///   - control: the control messages, any alignment.
    ///   - messageFlags: `msg_flags` (`MSG_TRUNC`, `MSG_CTRUNC`; others are ignored).
    ///   - close: called once for each descriptor the message carried when it is refused (the default closes it).
    ///     The descriptors in `control` were installed in this process by the kernel, so refusing one means closing it;
    ///     a fuzzer, whose "descriptors" are arbitrary numbers, passes a closure that only records them.
    /// - Returns: the payload and the descriptors, in order, when the message is whole and carries at most
    ///   ``maximumDescriptors``; the caller owns them.
    /// - Throws: ``DescriptorPassingError/Code/payloadTruncated`` (`MSG_TRUNC`), else
    ///   ``DescriptorPassingError/Code/descriptorsTruncated`` (`MSG_CTRUNC`, or more than ``maximumDescriptors``),
    ///   else ``DescriptorPassingError/Code/malformedControlMessage``; in each case every descriptor found is passed
    ///   to `close` first.
    public static func decode(
        payload: [UInt8],
        control: UnsafeRawBufferPointer,
        messageFlags: Int32,
        closing close: (Int32) -> Void = { _ = Glibc.close($0) }
    ) throws(DescriptorPassingError) -> ReceivedMessage {
        // Room for every int the buffer could hold, so the parser never has to drop (and so leak) one.
        let capacity = control.count / MemoryLayout<Int32>.size
        var count = 0
        var flags: Int32 = 0
        let descriptors: [Int32]
        if capacity == 0 {
            // No room for a descriptor (a closed connection's recvmsg has no control bytes): parse into nothing. Never
            // `[Int32](unsafeUninitializedCapacity: 0)`: it stores its count into the shared empty-array singleton,
            // which ThreadSanitizer reports as a race when two handshakes end at once (seen in `uffd serve`).
            var none: Int32 = -1
            cuffd_parse_rights(control.baseAddress, control.count, &none, 0, &count, &flags)
            descriptors = []
        } else {
            descriptors = [Int32](unsafeUninitializedCapacity: capacity) { fds, initialized in
                cuffd_parse_rights(control.baseAddress, control.count, fds.baseAddress, capacity, &count, &flags)
                initialized = count
            }
        }
        let message = ReceivedMessage(payload: payload, descriptors: descriptors)
        let code: DescriptorPassingError.Code
        let detail: String
        if messageFlags & Int32(MSG_TRUNC) != 0 {
            (code, detail) = (.payloadTruncated, "MSG_TRUNC")
        } else if messageFlags & Int32(MSG_CTRUNC) != 0 {
            (code, detail) = (.descriptorsTruncated, "MSG_CTRUNC")
        } else if flags & CUFFD_RIGHTS_EXCESS != 0 || count > maximumDescriptors {
            (code, detail) = (.descriptorsTruncated, "more than \(maximumDescriptors) descriptors")
        } else if flags & CUFFD_RIGHTS_MALFORMED != 0 {
            (code, detail) = (.malformedControlMessage, "\(control.count) bytes of control messages")
        } else {
            return message
        }
        message.descriptors.forEach(close)
        throw DescriptorPassingError(code, operation: "recvmsg", detail: "\(detail); \(payload.count)-byte payload, "
                                     + "\(count) descriptor\(count == 1 ? "" : "s") closed")
    }
}
