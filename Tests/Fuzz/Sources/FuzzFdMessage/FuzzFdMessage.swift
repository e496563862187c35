import Glibc
@_spi(Decoding) import Userfaultfd

/// Any bytes as what one `recvmsg(2)` returned when receiving a passed userfaultfd, split as
///
///     byte 0: msg_flags selector (bit 0 MSG_TRUNC, bit 1 MSG_CTRUNC, bit 2 MSG_EOR, bit 3 MSG_CMSG_CLOEXEC)
///     byte 1: payload length n (cut to what follows)
///     n bytes: payload
///     the rest: msg_control, passed in place (so at any alignment, and ending where the input ends: ASan sees a read
///               past it)
///
/// `ReceivedMessage.decode` (the production path, C parser included) must not trap; its result must match `model`,
/// written separately from the C parser: the descriptors it returns or closes are exactly the model's, in order,
/// at most 16 are returned, and it throws exactly when the model says the message is cut, too big or malformed.
/// Nothing is closed for real: the "descriptors" are whatever ints the input holds.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFdMessage(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let input = UnsafeRawBufferPointer(start: data, count: size)
    guard size >= 2 else { return 0 }
    let selector = input[0]
    var flags: Int32 = 0
    if selector & 1 != 0 { flags |= Int32(MSG_TRUNC) }
    if selector & 2 != 0 { flags |= Int32(MSG_CTRUNC) }
    if selector & 4 != 0 { flags |= Int32(MSG_EOR) }
    if selector & 8 != 0 { flags |= Int32(MSG_CMSG_CLOEXEC) }
    let payloadLength = min(Int(input[1]), size - 2)
    let payload = Array(input[2..<(2 + payloadLength)])
    let control = UnsafeRawBufferPointer(rebasing: input[(2 + payloadLength)...])

    var closed: [Int32] = []
    let result = Result { () throws(DescriptorPassingError) in
        try ReceivedMessage.decode(payload: payload, control: control, messageFlags: flags, closing: { closed.append($0) })
    }
    let expected = model(control)
    let expectedError: DescriptorPassingError.Code? =
        selector & 1 != 0 ? .payloadTruncated
        : selector & 2 != 0 || expected.descriptors.count > ReceivedMessage.maximumDescriptors ? .descriptorsTruncated
        : expected.malformed ? .malformedControlMessage : nil

    switch result {
    case .success(let message):
        guard expectedError == nil else { fatalError("accepted what the model refuses with \(expectedError!): \(message)") }
        guard message.descriptors == expected.descriptors, message.payload == payload, closed.isEmpty else {
            fatalError("decoded \(message.descriptors) (closed \(closed)), the model found \(expected.descriptors)")
        }
        guard message.descriptors.count <= ReceivedMessage.maximumDescriptors else {
            fatalError("returned \(message.descriptors.count) descriptors")
        }
        for descriptor in message.descriptors where !control.containsInt32(descriptor) {
            fatalError("returned descriptor \(descriptor), which is nowhere in the control bytes")
        }
    case .failure(let error):
        guard error.code == expectedError else { fatalError("threw \(error), the model expects \(String(describing: expectedError))") }
        guard closed == expected.descriptors else {
            fatalError("closed \(closed) on \(error.code), the model found \(expected.descriptors)")
        }
    }
    return 0
}

/// The control buffer as the kernel lays it out on 64-bit Linux, read by a separate, plain reading of cmsg(3): a run
/// of messages, each a 16-byte header (cmsg_len u64, cmsg_level i32, cmsg_type i32) and its data, the next one at
/// cmsg_len rounded up to 8. A header that does not fit, a cmsg_len below 16 or past the buffer, or SCM_RIGHTS data
/// that is not whole ints makes the buffer malformed; the descriptors before it still count (they were received).
func model(_ control: UnsafeRawBufferPointer) -> (descriptors: [Int32], malformed: Bool) {
    var descriptors: [Int32] = []
    var start = 0
    while start != control.count {
        guard control.count - start >= 16 else { return (descriptors, true) }
        let length = control.loadUnaligned(fromByteOffset: start, as: UInt64.self)
        let level = control.loadUnaligned(fromByteOffset: start + 8, as: Int32.self)
        let type = control.loadUnaligned(fromByteOffset: start + 12, as: Int32.self)
        guard length >= 16, length <= UInt64(control.count - start) else { return (descriptors, true) }
        let end = start + Int(length)
        if level == SOL_SOCKET && type == Int32(SCM_RIGHTS) {
            guard (end - start - 16) % 4 == 0 else { return (descriptors, true) }
            for offset in stride(from: start + 16, to: end, by: 4) {
                descriptors.append(control.loadUnaligned(fromByteOffset: offset, as: Int32.self))
            }
        }
        start = min((end + 7) / 8 * 8, control.count)
    }
    return (descriptors, false)
}

extension UnsafeRawBufferPointer {
    /// Whether the 4 bytes of `value` occur anywhere in the buffer.
    func containsInt32(_ value: Int32) -> Bool {
        guard count >= 4 else { return false }
        return (0...(count - 4)).contains { loadUnaligned(fromByteOffset: $0, as: Int32.self) == value }
    }
}
