import Testing
import UserfaultfdBenchSupport
@_spi(Decoding) import Userfaultfd

/// `FaultMessage.decode` on synthesized `struct uffd_msg` bytes: no kernel involved.
@Suite("FaultMessage decoding")
struct FaultMessageTests {
    static let pageSize = 4096

    func decode(_ bytes: [UInt8], features: UserfaultFeatures = [], pageSize: Int = pageSize) throws(UserfaultError)
        -> FaultMessage.Decoded
    {
        let result = bytes.withUnsafeBytes { buffer in
            Result { () throws(UserfaultError) in try FaultMessage.decode(buffer, features: features, pageSize: pageSize) }
        }
        return try result.get()
    }

    /// A message built by hand, little-endian, independent of `FaultMessage.encode`.
    func message(event: UInt8, words: [(offset: Int, value: UInt64)] = [], u32: [(offset: Int, value: UInt32)] = []) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: 32)
        bytes[0] = event
        for (offset, value) in words {
            for index in 0..<8 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * UInt64(index))) }
        }
        for (offset, value) in u32 {
            for index in 0..<4 { bytes[offset + index] = UInt8(truncatingIfNeeded: value >> (8 * UInt32(index))) }
        }
        return bytes
    }

    @Test func messageSize() {
        #expect(FaultMessage.size == 32)
    }

    @Test("Hand-built page faults: flags decide kind and isWrite", arguments: [
        (UInt64(0), PageFault.Kind.missing, false),
        (UInt64(1), PageFault.Kind.missing, true),
        (UInt64(3), PageFault.Kind.writeProtect, true),
        (UInt64(2), PageFault.Kind.writeProtect, false),
        (UInt64(4), PageFault.Kind.minor, false),
        (UInt64(5), PageFault.Kind.minor, true),
    ])
    func pageFaultFlags(flags: UInt64, kind: PageFault.Kind, isWrite: Bool) throws {
        let bytes = message(event: 0x12, words: [(8, flags), (16, 0x7f12_3456_7abc)], u32: [(24, 4242)])
        guard case .pageFault(let fault) = try decode(bytes) else {
            Issue.record("not a page fault")
            return
        }
        #expect(fault.kind == kind)
        #expect(fault.isWrite == isWrite)
        #expect(fault.flags == flags)
        #expect(fault.address == 0x7f12_3456_7abc)
        #expect(fault.pageAddress == 0x7f12_3456_7000)
        #expect(fault.threadID == nil)
    }

    @Test func threadIDOnlyWithTheFeature() throws {
        let bytes = message(event: 0x12, words: [(8, 0), (16, 0x10000)], u32: [(24, 4242)])
        guard case .pageFault(let with) = try decode(bytes, features: .threadID),
              case .pageFault(let without) = try decode(bytes, features: [.exactAddress, .eventFork])
        else {
            Issue.record("not page faults")
            return
        }
        #expect(with.threadID == 4242)
        #expect(without.threadID == nil)
    }

    @Test func pageAddressFollowsThePageSize() throws {
        let bytes = message(event: 0x12, words: [(16, 0x1_2345_6789)])
        guard case .pageFault(let small) = try decode(bytes, pageSize: 4096),
              case .pageFault(let large) = try decode(bytes, pageSize: 65536)
        else {
            Issue.record("not page faults")
            return
        }
        #expect(small.pageAddress == 0x1_2345_6000)
        #expect(large.pageAddress == 0x1_2345_0000)
        #expect(small.address == 0x1_2345_6789)
    }

    @Test func handBuiltNonFaultEvents() throws {
        #expect(try decode(message(event: 0x13, u32: [(8, 17)])) == .fork(descriptor: 17))
        #expect(try decode(message(event: 0x14, words: [(8, 0x1000), (16, 0x9000), (24, 0x3000)]))
                == .remap(from: 0x1000, to: 0x9000, length: 0x3000))
        #expect(try decode(message(event: 0x15, words: [(8, 0x4000), (16, 0x6000)]))
                == .remove(MemoryRange(start: 0x4000, end: 0x6000)))
        #expect(try decode(message(event: 0x16, words: [(8, 0x8000), (16, 0xa000)]))
                == .unmap(MemoryRange(start: 0x8000, length: 0x2000)))
        // An empty range is possible (start == end).
        #expect(try decode(message(event: 0x15, words: [(8, 0x4000), (16, 0x4000)]))
                == .remove(MemoryRange(start: 0x4000, length: 0)))
    }

    @Test("encode then decode is the identity for every event")
    func roundTrips() throws {
        let faults: [(PageFault, UInt32, UserfaultFeatures)] = [
            (PageFault(address: 0x7000_0000_1234, kind: .missing, isWrite: false, flags: 0), 0, []),
            (PageFault(address: 0x7000_0000_2000, kind: .missing, isWrite: true, threadID: 99, flags: 1), 99, .threadID),
            (PageFault(address: 0x7000_0000_3000, kind: .writeProtect, isWrite: true, flags: 3), 0, []),
            (PageFault(address: 0x7000_0000_4fff, kind: .minor, isWrite: false, threadID: 7, flags: 4), 7, .threadID),
        ]
        for (fault, tid, features) in faults {
            let bytes = FaultMessage.encode(.pageFault(fault), threadID: tid)
            #expect(bytes.count == 32)
            #expect(bytes[0] == 0x12)
            #expect(try decode(bytes, features: features) == .pageFault(fault))
        }
        let others: [FaultMessage.Decoded] = [
            .fork(descriptor: 3),
            .fork(descriptor: Int32.max),
            .remap(from: 0x7f00_0000_0000, to: 0x7e00_0000_0000, length: 1 << 30),
            .remove(MemoryRange(start: 0x5000, length: 0x3000)),
            .unmap(MemoryRange(start: 0x5000, length: 0x1000)),
        ]
        for message in others {
            #expect(try decode(FaultMessage.encode(message)) == message)
        }
        #expect(FaultMessage.encode(.remove(MemoryRange(start: 0, length: 0)))[0] == 0x15)
        #expect(FaultMessage.encode(.unmap(MemoryRange(start: 0, length: 0)))[0] == 0x16)
    }

    @Test func decodesTheFirstMessageOfALongerUnalignedBuffer() throws {
        let first = FaultMessage.encode(.remap(from: 0x1000, to: 0x2000, length: 0x1000))
        let second = FaultMessage.encode(.fork(descriptor: 5))
        let buffer = [0xAA] + first + second
        let decoded = try buffer.withUnsafeBytes { raw in
            try FaultMessage.decode(UnsafeRawBufferPointer(rebasing: raw[1...]), features: [])
        }
        #expect(decoded == .remap(from: 0x1000, to: 0x2000, length: 0x1000))
    }

    @Test("A short buffer is malformed", arguments: [0, 1, 8, 24, 31])
    func shortBuffer(count: Int) {
        let bytes = Array(FaultMessage.encode(.fork(descriptor: 1)).prefix(count))
        expectUserfaultError(.malformedMessage) { () throws(UserfaultError) in try decode(bytes) }
    }

    @Test("An unknown event code is reported with the code", arguments: [UInt8(0x00), 0x11, 0x17, 0x7f, 0xff])
    func unknownEvent(code: UInt8) {
        let error = expectUserfaultError(.unknownEvent(code)) { () throws(UserfaultError) in
            try decode(message(event: code))
        }
        #expect(error?.operation == .readEvents)
    }

    @Test func impossibleFields() {
        // remove / unmap with end below start.
        expectUserfaultError(.malformedMessage) { () throws(UserfaultError) in
            try decode(message(event: 0x15, words: [(8, 0x6000), (16, 0x4000)]))
        }
        expectUserfaultError(.malformedMessage) { () throws(UserfaultError) in
            try decode(message(event: 0x16, words: [(8, 0x6000), (16, 0x5fff)]))
        }
        // A remap longer than Int.max, a fork descriptor above Int32.max.
        expectUserfaultError(.malformedMessage) { () throws(UserfaultError) in
            try decode(message(event: 0x14, words: [(24, UInt64.max)]))
        }
        expectUserfaultError(.malformedMessage) { () throws(UserfaultError) in
            try decode(message(event: 0x13, u32: [(8, 0x8000_0000)]))
        }
    }

    @Test("Random messages never crash the decoder")
    func randomMessages() {
        var generator = SplitMix64(seed: 0x5eed_cafe)
        let codes: [UInt8] = [0x12, 0x13, 0x14, 0x15, 0x16]
        var decoded = 0
        var thrown = 0
        for round in 0..<20_000 {
            var bytes = (0..<32).map { _ in UInt8.random(in: .min ... .max, using: &generator) }
            if round % 2 == 0 { bytes[0] = codes[round / 2 % codes.count] }
            let features = UserfaultFeatures(rawValue: UInt64.random(in: 0...0x1ffff, using: &generator))
            do {
                let message = try decode(bytes, features: features)
                decoded += 1
                if case .pageFault(let fault) = message {
                    #expect(fault.pageAddress == fault.address & ~UInt(4095))
                    #expect((fault.threadID != nil) == features.contains(.threadID))
                }
            } catch {
                thrown += 1
                // Typed throws: only UserfaultError can arrive here; check it is one of the decoding codes.
                switch error.code {
                case .malformedMessage, .unknownEvent: break
                default: Issue.record("unexpected error \(error)")
                }
            }
        }
        #expect(decoded + thrown == 20_000)
        #expect(decoded > 5_000)
        #expect(thrown > 5_000)
    }
}
