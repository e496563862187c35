import Userfaultfd
import UserfaultfdFirecracker

/// Any bytes as a Firecracker handshake body: parsing returns regions or a typed error, never traps; accepted regions
/// are inside the memory file, at page-aligned addresses, of a supported page size, and do not overlap.
@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzHandshake(_ data: UnsafePointer<UInt8>, _ size: Int) -> Int32 {
    let body = Array(UnsafeBufferPointer(start: data, count: size))
    for fileSize in [0, 1 << 20, 64 << 20, Int.max] {
        guard let regions = try? GuestMemoryRegion.parse(body, memoryFileSize: fileSize) else { continue }
        for region in regions {
            guard GuestMemoryRegion.supportedPageSizes.contains(region.pageSize),
                  region.size > 0, region.offset >= 0, region.offset <= fileSize, region.size <= fileSize - region.offset,
                  region.size % region.pageSize == 0,
                  region.baseHostVirtualAddress % UInt(region.pageSize) == 0
            else { fatalError("accepted an invalid region \(region) for a file of \(fileSize) bytes") }
        }
        for (index, region) in regions.enumerated() {
            for other in regions[(index + 1)...] where region.range.overlaps(other.range) {
                fatalError("accepted overlapping regions \(region) and \(other)")
            }
        }
    }
    return 0
}
