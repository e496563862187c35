@_spi(Decoding) import Userfaultfd

/// Any bytes as a `uffd_msg`: decoding must return a message or a typed error, never trap; a decoded message must
/// encode back to the same decoding (round trip), with every feature set and page size the library supports.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzFaultMessage(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let bytes = UnsafeRawBufferPointer(start: data, count: size)
    let features: [UserfaultFeatures] = [[], [.threadID], .allKnown]
    for feature in features {
        for pageSize in [4096, 2 << 20] {
            guard let decoded = try? FaultMessage.decode(bytes, features: feature, pageSize: pageSize) else { continue }
            let encoded = FaultMessage.encode(decoded, threadID: size >= 28 ? bytes.loadUnaligned(fromByteOffset: 24, as: UInt32.self) : 0)
            let again = encoded.withUnsafeBytes { try? FaultMessage.decode($0, features: feature, pageSize: pageSize) }
            if again != decoded { fatalError("round trip changed \(decoded) into \(String(describing: again))") }
            if case .pageFault(let fault) = decoded {
                if fault.pageAddress % UInt(pageSize) != 0 || fault.pageAddress > fault.address {
                    fatalError("page address \(fault.pageAddress) of \(fault.address) with pages of \(pageSize)")
                }
            }
        }
    }
    return 0
}
