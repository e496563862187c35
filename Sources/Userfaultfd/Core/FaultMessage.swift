import CUserfaultfd

/// The one place `struct uffd_msg` (32 bytes, packed) is decoded.
///
/// Layout (include/uapi/linux/userfaultfd.h): `event` u8 at 0; the argument union at 8. PAGEFAULT: flags u64 @8,
/// address u64 @16, ptid u32 @24. FORK: ufd u32 @8. REMAP: from @8, to @16, len @24. REMOVE/UNMAP: start @8, end @16.
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
        let event = bytes.load(fromByteOffset: 0, as: UInt8.self)
        func u64(_ offset: Int) -> UInt64 { bytes.loadUnaligned(fromByteOffset: offset, as: UInt64.self) }
        func range(_ name: String) throws(UserfaultError) -> MemoryRange {
            let start = u64(8), end = u64(16)
            guard end >= start, end - start <= UInt64(Int.max) else {
                throw UserfaultError(.malformedMessage, operation: .readEvents,
                                     detail: "\(name) event with end 0x\(String(end, radix: 16)) below start 0x\(String(start, radix: 16))")
            }
            return MemoryRange(start: UInt(start), end: UInt(end))
        }
        switch Int32(event) {
        case CUFFD_EVENT_PAGEFAULT:
            let flags = u64(8)
            let kind: PageFault.Kind =
                flags & CUFFD_PAGEFAULT_FLAG_WP != 0 ? .writeProtect
                : flags & CUFFD_PAGEFAULT_FLAG_MINOR != 0 ? .minor : .missing
            let ptid = bytes.loadUnaligned(fromByteOffset: 24, as: UInt32.self)
            return .pageFault(PageFault(
                address: UInt(u64(16)), kind: kind, isWrite: flags & CUFFD_PAGEFAULT_FLAG_WRITE != 0,
                threadID: features.contains(.threadID) ? Int32(bitPattern: ptid) : nil,
                flags: flags, pageSize: pageSize))
        case CUFFD_EVENT_FORK:
            let descriptor = bytes.loadUnaligned(fromByteOffset: 8, as: UInt32.self)
            guard descriptor <= UInt32(Int32.max) else {
                throw UserfaultError(.malformedMessage, operation: .readEvents, detail: "fork event with descriptor \(descriptor)")
            }
            return .fork(descriptor: Int32(descriptor))
        case CUFFD_EVENT_REMAP:
            let length = u64(24)
            guard length <= UInt64(Int.max) else {
                throw UserfaultError(.malformedMessage, operation: .readEvents, detail: "remap event with length \(length)")
            }
            return .remap(from: UInt(u64(8)), to: UInt(u64(16)), length: Int(length))
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
        var bytes = [UInt8](repeating: 0, count: size)
        func put(_ value: UInt64, at offset: Int) {
            withUnsafeBytes(of: value.littleEndian) { bytes.replaceSubrange(offset..<offset + 8, with: $0) }
        }
        switch message {
        case .pageFault(let fault):
            bytes[0] = UInt8(CUFFD_EVENT_PAGEFAULT)
            put(fault.flags, at: 8)
            put(UInt64(fault.address), at: 16)
            withUnsafeBytes(of: threadID.littleEndian) { bytes.replaceSubrange(24..<28, with: $0) }
        case .fork(let descriptor):
            bytes[0] = UInt8(CUFFD_EVENT_FORK)
            withUnsafeBytes(of: UInt32(bitPattern: descriptor).littleEndian) { bytes.replaceSubrange(8..<12, with: $0) }
        case .remap(let from, let to, let length):
            bytes[0] = UInt8(CUFFD_EVENT_REMAP)
            put(UInt64(from), at: 8)
            put(UInt64(to), at: 16)
            put(UInt64(length), at: 24)
        case .remove(let range), .unmap(let range):
            if case .remove = message { bytes[0] = UInt8(CUFFD_EVENT_REMOVE) } else { bytes[0] = UInt8(CUFFD_EVENT_UNMAP) }
            put(UInt64(range.start), at: 8)
            put(UInt64(range.end), at: 16)
        }
        return bytes
    }
}
