import CUserfaultfd
import Glibc
import Testing
@_spi(Decoding) import Userfaultfd

/// Control buffers laid out by hand, the way the kernel lays out `msg_control` on a 64-bit Linux: each message is a
/// 16-byte header (`cmsg_len` u64, `cmsg_level` i32, `cmsg_type` i32), its data, and padding to 8 bytes.
struct ControlBuffer {
    var bytes: [UInt8] = []

    /// Appends one control message; `length` overrides the honest `cmsg_len`, `padded: false` leaves off the padding.
    func with(level: Int32 = SOL_SOCKET, type: Int32 = Int32(SCM_RIGHTS), data: [UInt8], length: UInt64? = nil,
              padded: Bool = true) -> ControlBuffer {
        var next = self
        next.bytes += withUnsafeBytes(of: (length ?? UInt64(16 + data.count)).littleEndian, Array.init)
        next.bytes += withUnsafeBytes(of: level.littleEndian, Array.init)
        next.bytes += withUnsafeBytes(of: type.littleEndian, Array.init)
        next.bytes += data
        if padded { next.bytes += [UInt8](repeating: 0, count: (8 - data.count % 8) % 8) }
        return next
    }

    /// Appends an SCM_RIGHTS message carrying `descriptors`.
    func with(rights descriptors: [Int32], length: UInt64? = nil, padded: Bool = true) -> ControlBuffer {
        with(data: descriptors.flatMap { withUnsafeBytes(of: $0.littleEndian, Array.init) }, length: length, padded: padded)
    }

    /// Appends raw bytes (a partial header, garbage).
    func with(raw: [UInt8]) -> ControlBuffer {
        var next = self
        next.bytes += raw
        return next
    }
}

/// What decoding returned: the message or the error's code, and the descriptors it closed.
struct DecodeOutcome {
    var result: Result<ReceivedMessage, DescriptorPassingError>
    var closed: [Int32]

    var descriptors: [Int32]? { try? result.get().descriptors }
    var code: DescriptorPassingError.Code? {
        if case .failure(let error) = result { return error.code }
        return nil
    }
}

/// Decodes `control` (copied `misalignment` bytes into a fresh buffer) without closing anything real.
func decodeRecordingCloses(payload: [UInt8] = [1, 2, 3], _ control: ControlBuffer, flags: Int32 = 0,
                           misalignment: Int = 0) -> DecodeOutcome {
    var closed: [Int32] = []
    let storage = [UInt8](repeating: 0xEE, count: misalignment) + control.bytes
    let result = storage.withUnsafeBytes { bytes in
        Result { () throws(DescriptorPassingError) in
            try ReceivedMessage.decode(payload: payload, control: UnsafeRawBufferPointer(rebasing: bytes[misalignment...]),
                                       messageFlags: flags, closing: { closed.append($0) })
        }
    }
    return DecodeOutcome(result: result, closed: closed)
}

@Suite("Decoding a received message's control buffer (SCM_RIGHTS)")
struct ReceivedMessageDecodingTests {
    @Test func handMadeLayoutMatchesTheKernelMacros() {
        #expect(cuffd_cmsg_len(0) == 16)
        #expect(cuffd_cmsg_len(4) == 20)
        #expect(cuffd_cmsg_space(4) == 24)
        #expect(ControlBuffer().with(rights: [7]).bytes.count == cuffd_cmsg_space(4))
        #expect(ControlBuffer().with(rights: [7, 8, 9]).bytes.count == cuffd_cmsg_space(12))
    }

    @Test func emptyControlIsAPlainMessage() throws {
        let outcome = decodeRecordingCloses(payload: [9, 8], ControlBuffer())
        let message = try outcome.result.get()
        #expect(message.payload == [9, 8])
        #expect(message.descriptors.isEmpty)
        #expect(outcome.closed.isEmpty)
        // No bytes and no control: end of stream.
        #expect(try decodeRecordingCloses(payload: [], ControlBuffer()).result.get().isEndOfStream)
    }

    @Test func oneDescriptor() throws {
        let outcome = decodeRecordingCloses(ControlBuffer().with(rights: [7]))
        #expect(try outcome.result.get().payload == [1, 2, 3])
        #expect(outcome.descriptors == [7])
        #expect(outcome.closed.isEmpty)
    }

    @Test func lastMessageWithoutItsPadding() {
        // The kernel reports msg_controllen as the space used, which may stop at the last message's data.
        let control = ControlBuffer().with(rights: [7], padded: false)
        #expect(control.bytes.count == 20)
        #expect(decodeRecordingCloses(control).descriptors == [7])
    }

    @Test func severalDescriptorsInOneAndInTwoMessages() {
        #expect(decodeRecordingCloses(ControlBuffer().with(rights: [3, 4, 5])).descriptors == [3, 4, 5])
        let two = ControlBuffer().with(rights: [3, 4, 5]).with(rights: [6])
        #expect(two.bytes.count == 32 + 24)
        #expect(decodeRecordingCloses(two).descriptors == [3, 4, 5, 6])
        // The same bytes at an odd address: the parser reads headers and descriptors unaligned.
        #expect(decodeRecordingCloses(two, misalignment: 3).descriptors == [3, 4, 5, 6])
    }

    @Test func otherControlMessagesAreSkipped() {
        let credentials = [UInt8](repeating: 0xAB, count: 12)  // SCM_CREDENTIALS: pid, uid, gid
        let control = ControlBuffer()
            .with(type: 2, data: credentials)
            .with(rights: [11])
            .with(level: 0, type: Int32(SCM_RIGHTS), data: withUnsafeBytes(of: Int32(99), Array.init))  // not SOL_SOCKET
            .with(rights: [12])
        let outcome = decodeRecordingCloses(control)
        #expect(outcome.descriptors == [11, 12])
        #expect(outcome.closed.isEmpty)
    }

    @Test(arguments: [0, 1, 8, 15] as [UInt64])
    func lengthBelowTheHeaderIsMalformed(length: UInt64) {
        // A good message first: its descriptor must be handed to `close`.
        let control = ControlBuffer().with(rights: [5]).with(rights: [6], length: length)
        let outcome = decodeRecordingCloses(control)
        #expect(outcome.code == .malformedControlMessage)
        #expect(outcome.closed == [5])
    }

    @Test(arguments: [25, 64, UInt64(Int32.max), UInt64.max] as [UInt64])
    func lengthBeyondTheBufferIsMalformed(length: UInt64) {
        let control = ControlBuffer().with(rights: [5]).with(rights: [6], length: length)
        #expect(control.bytes.count == 48)
        let outcome = decodeRecordingCloses(control)
        #expect(outcome.code == .malformedControlMessage)
        #expect(outcome.closed == [5])
    }

    @Test func rightsThatAreNotWholeDescriptorsAreMalformed() {
        // cmsg_len 21: one descriptor and a stray byte.
        let control = ControlBuffer().with(data: [1, 0, 0, 0, 2], length: 21)
        let outcome = decodeRecordingCloses(control)
        #expect(outcome.code == .malformedControlMessage)
        #expect(outcome.closed.isEmpty, "nothing before the bad header")
        // The same length on a message that is not SCM_RIGHTS is fine: its data is not ours to read.
        #expect(decodeRecordingCloses(ControlBuffer().with(type: 2, data: [1, 0, 0, 0, 2])).descriptors == [])
    }

    @Test func partialHeaderAtTheEndIsMalformed() {
        let outcome = decodeRecordingCloses(ControlBuffer().with(rights: [4]).with(raw: [20, 0, 0, 0, 0, 0, 0, 0]))
        #expect(outcome.code == .malformedControlMessage)
        #expect(outcome.closed == [4])
    }

    @Test func truncationFlagsAreTypedAndCloseEverything() {
        let control = ControlBuffer().with(rights: [3, 4])
        let controlTruncated = decodeRecordingCloses(control, flags: Int32(MSG_CTRUNC))
        #expect(controlTruncated.code == .descriptorsTruncated)
        #expect(controlTruncated.closed == [3, 4])

        let payloadTruncated = decodeRecordingCloses(control, flags: Int32(MSG_TRUNC))
        #expect(payloadTruncated.code == .payloadTruncated)
        #expect(payloadTruncated.closed == [3, 4])

        // Both: the payload is named first; a malformed buffer that was also cut is reported as the cut.
        #expect(decodeRecordingCloses(control, flags: Int32(MSG_TRUNC | MSG_CTRUNC)).code == .payloadTruncated)
        let cutAndMalformed = decodeRecordingCloses(control.with(raw: [1]), flags: Int32(MSG_CTRUNC))
        #expect(cutAndMalformed.code == .descriptorsTruncated)
        #expect(cutAndMalformed.closed == [3, 4])

        // Flags that say nothing about truncation are ignored.
        #expect(decodeRecordingCloses(control, flags: Int32(MSG_EOR | MSG_CMSG_CLOEXEC)).descriptors == [3, 4])
    }

    @Test func moreThanSixteenDescriptorsAreRefusedAndClosed() {
        let sixteen = (100..<116).map(Int32.init)
        #expect(decodeRecordingCloses(ControlBuffer().with(rights: sixteen)).descriptors == sixteen)
        let seventeen = (100..<117).map(Int32.init)
        let split = ControlBuffer().with(rights: Array(seventeen[..<10])).with(rights: Array(seventeen[10...]))
        let outcome = decodeRecordingCloses(split)
        #expect(outcome.code == .descriptorsTruncated)
        #expect(outcome.closed == seventeen)
    }

    @Test func malformedMessagesDescribeThemselves() {
        let outcome = decodeRecordingCloses(ControlBuffer().with(rights: [5]).with(raw: [0]))
        guard case .failure(let error) = outcome.result else {
            Issue.record("decoded a malformed buffer")
            return
        }
        #expect(error.description == "recvmsg: malformedControlMessage: 25 bytes of control messages; 3-byte payload, 1 descriptor closed")
    }
}
