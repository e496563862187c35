import CUserfaultfd

/// The one place `struct uffd_msg` (32 bytes, packed) is decoded.
///
/// The layout is `struct cuffd_msg` of the C shim, whose size and field offsets are checked there with
/// `_Static_assert`s; the bytes are copied into one (any alignment, any content) and read by field name.
///
/// Not part of the API: `@_spi(Decoding)`, so `import Userfaultfd` does not see it. The fuzzers (a package of their own,
/// which `package` access cannot reach), the page server and the tests use it with `@_spi(Decoding) import Userfaultfd`.
@_spi(Decoding) public enum FaultMessage {
    /// Size of one message in bytes.
    public static let size = Int(CUFFD_MSG_SIZE)

    /// Decodes one message, before fork descriptors are adopted.
    public enum Decoded: Sendable, Hashable {
        case pageFault(PageFault)
        /// The raw descriptor of the child's userfaultfd, already installed in this process.
        case fork(descriptor: Int32)
        case remap(from: UInt, to: UInt, length: Int)
        case remove(MemoryRange)
        case unmap(MemoryRange)
    }

    /// Decodes the message at the start of `bytes`.
    ///
    /// - Parameters:
    ///   - features: the features the userfaultfd was opened with (decides whether `ptid` is meaningful).
    ///   - pageSize: the page size used to compute ``PageFault/pageAddress``.
    /// - Throws: ``UserfaultError/Code/malformedMessage`` for a short buffer or an impossible range,
    ///   ``UserfaultError/Code/unknownEvent(_:)`` for an event code this library does not know.
    public static func decode(
        _ bytes: UnsafeRawBufferPointer,
        features: UserfaultFeatures,
        pageSize: Int = systemPageSize
    ) throws(UserfaultError) -> Decoded {
        guard bytes.count >= size else {
            throw UserfaultError(.malformedMessage, operation: .readEvents,
                                 detail: "a uffd_msg is \(size) bytes, got \(bytes.count)")
        }
        // A copy, not a cast: `bytes` may have any alignment.
        var message = cuffd_msg()
        withUnsafeMutableBytes(of: &message) { $0.copyMemory(from: UnsafeRawBufferPointer(rebasing: bytes.prefix(size))) }
        let event = message.event
        func range(_ name: String) throws(UserfaultError) -> MemoryRange {
            let start = message.arg.remove.start, end = message.arg.remove.end
            guard end >= start, end - start <= UInt64(Int.max) else {
                throw UserfaultError(.malformedMessage, operation: .readEvents,
                                     detail: "\(name) event with end 0x\(String(end, radix: 16)) below start 0x\(String(start, radix: 16))")
            }
            return MemoryRange(start: UInt(start), end: UInt(end))
        }
        switch Int32(event) {
        case CUFFD_EVENT_PAGEFAULT:
            let flags = message.arg.pagefault.flags
            let kind: PageFault.Kind =
                flags & CUFFD_PAGEFAULT_FLAG_WP != 0 ? .writeProtect
                : flags & CUFFD_PAGEFAULT_FLAG_MINOR != 0 ? .minor : .missing
            let ptid = message.arg.pagefault.feat.ptid
            return .pageFault(PageFault(
                address: UInt(message.arg.pagefault.address), kind: kind, isWrite: flags & CUFFD_PAGEFAULT_FLAG_WRITE != 0,
                threadID: features.contains(.threadID) ? Int32(bitPattern: ptid) : nil,
                flags: flags, pageSize: pageSize))
        case CUFFD_EVENT_FORK:
            let descriptor = message.arg.fork.ufd
            guard descriptor <= UInt32(Int32.max) else {
                throw UserfaultError(.malformedMessage, operation: .readEvents, detail: "fork event with descriptor \(descriptor)")
            }
            return .fork(descriptor: Int32(descriptor))
        case CUFFD_EVENT_REMAP:
            let length = message.arg.remap.len
            guard length <= UInt64(Int.max) else {
                throw UserfaultError(.malformedMessage, operation: .readEvents, detail: "remap event with length \(length)")
            }
            return .remap(from: UInt(message.arg.remap.from), to: UInt(message.arg.remap.to), length: Int(length))
        case CUFFD_EVENT_REMOVE:
            return .remove(try range("remove"))
        case CUFFD_EVENT_UNMAP:
            return .unmap(try range("unmap"))
        default:
            throw UserfaultError(.unknownEvent(event), operation: .readEvents)
        }
    }

    /// Encodes a message the way the kernel lays it out; for tests and fuzzers that synthesize input.
    public static func encode(_ message: Decoded, threadID: UInt32 = 0) -> [UInt8] {
        var raw = cuffd_msg()
        switch message {
        case .pageFault(let fault):
            raw.event = UInt8(CUFFD_EVENT_PAGEFAULT)
            raw.arg.pagefault.flags = fault.flags
            raw.arg.pagefault.address = UInt64(fault.address)
            raw.arg.pagefault.feat.ptid = threadID
        case .fork(let descriptor):
            raw.event = UInt8(CUFFD_EVENT_FORK)
            raw.arg.fork.ufd = UInt32(bitPattern: descriptor)
        case .remap(let from, let to, let length):
            raw.event = UInt8(CUFFD_EVENT_REMAP)
            raw.arg.remap.from = UInt64(from)
            raw.arg.remap.to = UInt64(to)
            raw.arg.remap.len = UInt64(length)
        case .remove(let range), .unmap(let range):
            if case .remove = message { raw.event = UInt8(CUFFD_EVENT_REMOVE) } else { raw.event = UInt8(CUFFD_EVENT_UNMAP) }
            raw.arg.remove.start = UInt64(range.start)
            raw.arg.remove.end = UInt64(range.end)
        }
        return withUnsafeBytes(of: raw) { Array($0) }
    }
}
