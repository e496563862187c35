import Foundation
import Userfaultfd

/// One guest memory region, as a Firecracker-compatible VMM describes it in its handshake.
///
/// The VMM sends a JSON array of these with its userfaultfd. Accepted forms (Firecracker 1.1 to 1.12+):
/// `{"base_host_virt_addr": N, "size": N, "offset": N}` (4 KiB pages implied), plus `"page_size_kib"` (which despite its
/// name holds bytes) and/or `"page_size"` (bytes).
public struct GuestMemoryRegion: Sendable, Hashable, CustomStringConvertible {
    /// Where the region is mapped in the VMM's address space.
    public var baseHostVirtualAddress: UInt
    /// Bytes in the region.
    public var size: Int
    /// Where the region's bytes start in the snapshot memory file.
    public var offset: Int
    /// The region's page size: 4096, or 2097152 for huge pages.
    public var pageSize: Int

    /// A region of `size` bytes at `baseHostVirtualAddress`, whose bytes start at `offset` in the memory file.
    public init(baseHostVirtualAddress: UInt, size: Int, offset: Int, pageSize: Int = 4096) {
        self.baseHostVirtualAddress = baseHostVirtualAddress
        self.size = size
        self.offset = offset
        self.pageSize = pageSize
    }

    /// The region's address range.
    public var range: MemoryRange { MemoryRange(start: baseHostVirtualAddress, length: size) }

    public var description: String {
        "0x\(String(baseHostVirtualAddress, radix: 16)) size \(size) offset \(offset) page \(pageSize)"
    }

    /// Page sizes a server can serve.
    public static let supportedPageSizes: Set<Int> = [4096, 2 << 20]

    /// Parses and validates a handshake body against a memory file of `memoryFileSize` bytes.
    ///
    /// - Throws: ``FirecrackerHandshakeError`` for JSON that is not an array of region objects, a missing or negative
    ///   field, page sizes that disagree or are not supported, unaligned regions, regions past the end of the file, and
    ///   regions that overlap (in the address space or in the file).
    public static func parse(_ body: [UInt8], memoryFileSize: Int) throws(FirecrackerHandshakeError) -> [GuestMemoryRegion] {
        let decoded: [WireRegion]
        do {
            decoded = try JSONDecoder().decode([WireRegion].self, from: Data(body))
        } catch let error as DecodingError {
            throw .invalidJSON(Self.describe(error))
        } catch {
            throw .invalidJSON(String(describing: error))
        }
        guard !decoded.isEmpty else { throw .noRegions }
        var regions: [GuestMemoryRegion] = []
        for (index, wire) in decoded.enumerated() {
            func required(_ value: UInt64?, _ field: String) throws(FirecrackerHandshakeError) -> Int {
                guard let value else { throw .invalidField(region: index, field: field, detail: "missing") }
                guard value <= UInt64(Int.max) else { throw .invalidField(region: index, field: field, detail: "too large: \(value)") }
                return Int(value)
            }
            let base = try required(wire.base_host_virt_addr, "base_host_virt_addr")
            let size = try required(wire.size, "size")
            let offset = try required(wire.offset, "offset")
            if let pageSize = wire.page_size, let pageSizeKib = wire.page_size_kib, pageSize != pageSizeKib {
                throw .invalidField(region: index, field: "page_size",
                                    detail: "page_size \(pageSize) and page_size_kib \(pageSizeKib) disagree")
            }
            let effectivePageSize = Int(clamping: wire.page_size ?? wire.page_size_kib ?? 4096)
            guard supportedPageSizes.contains(effectivePageSize) else {
                throw .unsupportedPageSize(region: index, pageSize: effectivePageSize)
            }
            let region = GuestMemoryRegion(baseHostVirtualAddress: UInt(base), size: size, offset: offset, pageSize: effectivePageSize)
            guard size > 0, base % effectivePageSize == 0, size % effectivePageSize == 0 else {
                throw .misaligned(region: index, detail: "\(region): base and size must be positive multiples of the page size")
            }
            guard offset <= memoryFileSize, size <= memoryFileSize - offset else {
                throw .outsideMemoryFile(region: index, detail: "\(region) ends past the \(memoryFileSize)-byte memory file")
            }
            regions.append(region)
        }
        if Set(regions.map(\.pageSize)).count > 1 {
            throw .invalidField(region: 0, field: "page_size", detail: "all regions must share one page size")
        }
        for (i, a) in regions.enumerated() {
            for (j, b) in regions.enumerated() where j > i {
                if a.range.overlaps(b.range) { throw .overlapping(first: i, second: j, detail: "address ranges overlap") }
                if a.offset < b.offset + b.size && b.offset < a.offset + a.size {
                    throw .overlapping(first: i, second: j, detail: "file ranges overlap")
                }
            }
        }
        return regions
    }
}

extension GuestMemoryRegion {
    /// The JSON object as sent; unknown fields are ignored, as newer VMMs may add some.
    private struct WireRegion: Decodable {
        var base_host_virt_addr: UInt64?
        var size: UInt64?
        var offset: UInt64?
        var page_size: UInt64?
        var page_size_kib: UInt64?
    }

    private static func describe(_ error: DecodingError) -> String {
        switch error {
        case .typeMismatch(_, let context), .valueNotFound(_, let context), .keyNotFound(_, let context),
             .dataCorrupted(let context):
            let path = context.codingPath.map { $0.intValue.map { "[\($0)]" } ?? ".\($0.stringValue)" }.joined()
            return (path.isEmpty ? "" : path + ": ") + context.debugDescription
        @unknown default:
            return String(describing: error)
        }
    }
}

/// Why a VMM's handshake was refused.
public enum FirecrackerHandshakeError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The message is not the JSON array of regions Firecracker sends (the decoder's reason).
    case invalidJSON(String)
    /// The array names no region.
    case noRegions
    /// A field of region `region` (0-based) is missing, too large or inconsistent with the other regions.
    case invalidField(region: Int, field: String, detail: String)
    /// Region `region` uses a page size the server cannot serve (4 KiB and 2 MiB are supported).
    case unsupportedPageSize(region: Int, pageSize: Int)
    /// Region `region`'s address, size or offset is not a multiple of its page size.
    case misaligned(region: Int, detail: String)
    /// Region `region` reaches past the end of the memory file.
    case outsideMemoryFile(region: Int, detail: String)
    /// Regions `first` and `second` overlap in guest memory.
    case overlapping(first: Int, second: Int, detail: String)

    public var description: String {
        switch self {
        case .invalidJSON(let detail): "invalid handshake JSON: \(detail)"
        case .noRegions: "the handshake lists no memory regions"
        case .invalidField(let region, let field, let detail): "region \(region) field \(field): \(detail)"
        case .unsupportedPageSize(let region, let pageSize): "region \(region): page size \(pageSize) is not supported (4096 or 2097152)"
        case .misaligned(let region, let detail): "region \(region) misaligned: \(detail)"
        case .outsideMemoryFile(let region, let detail): "region \(region) outside the memory file: \(detail)"
        case .overlapping(let first, let second, let detail): "regions \(first) and \(second) overlap: \(detail)"
        }
    }
}
