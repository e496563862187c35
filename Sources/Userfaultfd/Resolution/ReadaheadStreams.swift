/// The sequential streams of faults in one region, each with its own readahead window.
///
/// One stream is not enough: glibc's `memcpy` of a large buffer reads four far-apart parts of it in turn, a merge reads
/// two inputs, a VM boots several vCPUs. With a single "next expected page", every fault of such a pattern looks random
/// and gets one page. Like the kernel, which keeps readahead state per open file, a region keeps a few streams: a fault
/// right where a stream's last cluster ended continues that stream forwards, a fault on the page right before it
/// continues it backwards (glibc's `memcpy` copies from the end when source and destination share their offset in a
/// page); either way its window doubles, up to the maximum. Any other fault starts a new stream in the least recently
/// used slot.
///
/// Fixed capacity, no allocation after `init`.
struct ReadaheadStreams {
    /// How many interleaved streams are followed at once.
    static let capacity = 8

    struct Stream {
        /// The page right after this stream's last cluster: a fault there continues the stream forwards.
        var nextPage = -1
        /// The first page of this stream's last cluster: a fault on the page before it continues the stream backwards.
        var firstPage = -1
        /// The stream's current window, in pages.
        var windowPages: Int
        /// When the stream was last continued or started (a counter, for least-recently-used replacement).
        var lastUse: UInt64 = 0
    }

    private var streams: [Stream]
    private var clock: UInt64 = 0

    init(initialWindow: Int) {
        streams = Array(repeating: Stream(windowPages: initialWindow), count: Self.capacity)
    }

    /// How a fault relates to the stream it was given.
    enum Continuation {
        /// A new stream: the fault continued none.
        case starts
        /// Right after the stream's last cluster.
        case forwards
        /// Right before the stream's last cluster.
        case backwards
    }

    /// The stream a fault at `page` belongs to: the one it continues, forwards or backwards (window doubled, up to
    /// `maximum` pages), or a new one with `initialWindow` pages in the least recently used slot.
    mutating func stream(for page: Int, initialWindow: Int, maximum: Int) -> (index: Int, continuation: Continuation) {
        clock &+= 1
        var oldest = 0
        for index in streams.indices {
            let continuation: Continuation? = streams[index].nextPage == page ? .forwards
                : (streams[index].firstPage > 0 && streams[index].firstPage - 1 == page) ? .backwards : nil
            if let continuation {
                streams[index].windowPages = min(streams[index].windowPages * 2, maximum)
                streams[index].lastUse = clock
                return (index, continuation)
            }
            if streams[index].lastUse < streams[oldest].lastUse { oldest = index }
        }
        streams[oldest] = Stream(windowPages: initialWindow, lastUse: clock)
        return (oldest, .starts)
    }

    subscript(index: Int) -> Stream {
        get { streams[index] }
        set { streams[index] = newValue }
    }
}
