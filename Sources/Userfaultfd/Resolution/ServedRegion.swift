/// A range of memory a ``FaultResolver`` serves from one provider, with what it knows of each page.
///
/// Pages are numbered from the start of the region as registered; the addresses they live at are kept in
/// ``ServedSegment``s, so REMAP and UNMAP only edit segments and the per-page state stays where it is.
final class ServedRegion {
    let id: Int
    let provider: any PageProvider
    /// Offset in the provider's data of page 0.
    let providerOffset: Int
    let pageSize: Int
    let pageCount: Int
    /// Pages holding provider data; pages from here on are past the end of the data and read as zero.
    let dataPages: Int
    /// Bytes of provider data from `providerOffset` on (nil: unbounded).
    let dataBytes: Int?
    /// Pages resolved (copied, zero-filled or poisoned) and not removed since.
    let present: PageBitmap
    /// Pages covered by a fetch in flight.
    let inFlight: PageBitmap
    /// Pages removed (REMOVE event) under ``RemovedPagePolicy/zeroFill``: they fault in as zeros.
    let removed: PageBitmap
    /// Zero pages are made by copying zeros (hugetlbfs has no `UFFDIO_ZEROPAGE`).
    let zeroByCopy: Bool
    /// Read alignment, in pages, from the provider's preferred read size.
    let alignmentPages: Int
    /// For a shared-memory ``LazyRegion``: the file whose page cache holds the pages (installed by writing it, then
    /// `UFFDIO_CONTINUE`), page `i` of the region being page `i` of the file.
    let sharedFile: SharedMemoryFile?

    /// Readahead state: the sequential streams faulting in this region.
    var streams: ReadaheadStreams

    init(id: Int, length: Int, provider: any PageProvider, providerOffset: Int, pageSize: Int, readahead: ReadaheadPolicy,
         sharedFile: SharedMemoryFile? = nil, zeroByCopy: Bool = false) throws(UserfaultError) {
        // Provider offsets are computed as providerOffset + page * pageSize on the fault path: they must all fit.
        guard providerOffset >= 0, !providerOffset.addingReportingOverflow(length).overflow else {
            throw UserfaultError(.invalidArgument, operation: .register,
                                 detail: "provider offset \(providerOffset) with \(length) bytes does not fit 0 ... Int.max")
        }
        self.id = id
        self.provider = provider
        self.providerOffset = providerOffset
        self.pageSize = pageSize
        self.pageCount = length / pageSize
        if let size = provider.size {
            // A size below the offset (or negative) is no data; rounding up is done without adding (size may be Int.max).
            let bytes = size > providerOffset ? size - providerOffset : 0
            dataBytes = bytes
            dataPages = min(pageCount, bytes / pageSize + (bytes % pageSize == 0 ? 0 : 1))
        } else {
            dataBytes = nil
            dataPages = pageCount
        }
        present = try PageBitmap(pages: pageCount)
        inFlight = try PageBitmap(pages: pageCount)
        removed = try PageBitmap(pages: pageCount)
        self.zeroByCopy = zeroByCopy || pageSize > systemPageSize
        self.sharedFile = sharedFile
        streams = ReadaheadStreams(initialWindow: readahead.initialPages(pageSize: pageSize))
        alignmentPages = readahead == .none ? 1 : max(1, provider.preferredReadSize / pageSize)
    }

    /// Neither present nor being fetched, and not removed under the zero-fill policy: a page provider data may go to.
    @inline(__always) func isFree(_ page: Int) -> Bool { !present[page] && !inFlight[page] && !removed[page] }

    /// Removed under the zero-fill policy, neither present nor being fetched: a page that gets zeros.
    @inline(__always) func isRemovedAndFree(_ page: Int) -> Bool { removed[page] && !present[page] && !inFlight[page] }

    /// The pages one fault brings in, and the readahead stream it belongs to.
    struct Cluster {
        var pages: Range<Int>
        /// The stream in ``ServedRegion/streams`` (nil without readahead).
        var stream: Int?
        /// How the fault related to its stream.
        var continuation: ReadaheadStreams.Continuation
    }

    /// The pages one fault at `page` brings in: grown by readahead (per sequential stream; below the page for a stream
    /// going backwards), aligned to the provider's read size, clipped to `limit` (the segment and the data) and to
    /// `maximumPages` (a buffer's size), never over a page present or in flight.
    ///
    /// Not a query: the fault is counted in its readahead stream (continued, its window doubled, or a new stream in
    /// the least recently used slot), which then expects its next fault after the cluster. Call it once per fault.
    func advanceStream(faultingAt page: Int, within limit: Range<Int>, readahead: ReadaheadPolicy, maximumPages: Int) -> Cluster {
        guard readahead != .none else {
            return Cluster(pages: page..<page + 1, stream: nil, continuation: .starts)
        }
        let maximum = readahead.maximumPages(pageSize: pageSize)
        let cap = min(max(maximum, alignmentPages), maximumPages)
        let stream = streams.stream(for: page, initialWindow: readahead.initialPages(pageSize: pageSize), maximum: maximum)
        let windowPages = streams[stream.index].windowPages
        let alignedStart = max(limit.lowerBound, page - page % alignmentPages)
        let alignedEnd = alignedStart + alignmentPages
        // Going backwards the window lies below the page, its start rounded down to the provider's read size (so a
        // remote provider reads whole blocks, each once); otherwise above it. Never more than a buffer (`cap`).
        let floor: Int, ceiling: Int
        if stream.continuation == .backwards {
            let windowStart = page + 1 - windowPages
            floor = max(limit.lowerBound, page + 1 - cap, min(alignedStart, windowStart - windowStart % alignmentPages))
            ceiling = alignedEnd
        } else {
            floor = alignedStart
            ceiling = max(page + windowPages, alignedEnd)
        }
        var lower = page, upper = page + 1
        while lower > floor && isFree(lower - 1) { lower -= 1 }
        let target = min(limit.upperBound, ceiling, lower + cap)
        while upper < target && isFree(upper) { upper += 1 }
        streams[stream.index].firstPage = lower
        streams[stream.index].nextPage = upper
        return Cluster(pages: lower..<upper, stream: stream.index, continuation: stream.continuation)
    }

    /// For a fault that continued an established stream forwards (its window at `maximumWindow` pages): the free pages
    /// after its cluster, one window's worth (clipped to `limit` and `maximumPages`), to fetch ahead of the stream's faults;
    /// the stream then expects its next fault after them (its state changes). Nil when the stream is not established,
    /// or the page after the cluster is not free or past the limit.
    func advanceStreamAhead(of cluster: Cluster, within limit: Range<Int>, maximumWindow: Int, maximumPages: Int) -> Range<Int>? {
        guard cluster.continuation == .forwards, let stream = cluster.stream, streams[stream].windowPages >= maximumWindow else {
            return nil
        }
        let page = cluster.pages.upperBound
        guard page < limit.upperBound, page >= limit.lowerBound, isFree(page) else { return nil }
        let target = min(limit.upperBound, page + min(streams[stream].windowPages, maximumPages))
        var upper = page + 1
        while upper < target && isFree(upper) { upper += 1 }
        streams[stream].nextPage = upper
        return page..<upper
    }

    /// Bytes of provider data a read of `pages` should produce (clipped to the end of the data).
    func dataLength(of pages: Range<Int>) -> Int {
        let bytes = pages.count * pageSize
        guard let dataBytes else { return bytes }
        return max(0, min(bytes, dataBytes - pages.lowerBound * pageSize))
    }
}

/// Where a run of a region's pages currently lives in the address space.
struct ServedSegment {
    var range: MemoryRange
    let region: ServedRegion
    /// The region page at `range.start`.
    var firstPage: Int

    var pages: Range<Int> { firstPage..<firstPage + range.length / region.pageSize }

    func page(at address: UInt) -> Int { firstPage + Int((address - range.start) / UInt(region.pageSize)) }

    func address(of page: Int) -> UInt { range.start + UInt((page - firstPage) * region.pageSize) }

    /// The part of this segment inside `other`, as a segment.
    func slice(_ other: MemoryRange) -> ServedSegment? {
        guard let common = range.intersection(other) else { return nil }
        return ServedSegment(range: common, region: region, firstPage: page(at: common.start))
    }

    /// What is left of this segment outside `other` (zero, one or two pieces).
    func removing(_ other: MemoryRange) -> [ServedSegment] {
        guard let common = range.intersection(other) else { return [self] }
        var pieces: [ServedSegment] = []
        if common.start > range.start {
            pieces.append(ServedSegment(range: MemoryRange(start: range.start, end: common.start), region: region, firstPage: firstPage))
        }
        if common.end < range.end {
            pieces.append(ServedSegment(range: MemoryRange(start: common.end, end: range.end), region: region, firstPage: page(at: common.end)))
        }
        return pieces
    }
}
