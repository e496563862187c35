/// The pages a ``DirtyTracker`` reported, as page indices relative to its range (page 0 is the range's first page): what
/// ``DirtyTracker/collectPages()`` returns.
///
/// Iterating gives the indices in ascending order; ``runs`` gives them as maximal runs, as ``DirtyTracker/collect()``
/// gives address ranges.
public struct DirtyPages: Sequence, Sendable, Hashable {
    /// Maximal runs of written pages, ascending, never empty or touching.
    public let runs: [Range<Int>]

    /// The pages in `runs` (maximal, ascending runs of page indices).
    public init(runs: [Range<Int>]) {
        self.runs = runs
    }

    /// The pages of `ranges` (page-aligned, inside the range that starts at `base`), as indices from `base`.
    init(_ ranges: [MemoryRange], from base: UInt, pageSize: Int) {
        runs = ranges.map { range in
            let first = Int((range.start - base) / UInt(pageSize))
            return first..<first + range.length / pageSize
        }
    }

    /// How many pages were written.
    public var count: Int { runs.reduce(0) { $0 + $1.count } }

    /// Whether no page was written.
    public var isEmpty: Bool { runs.isEmpty }

    /// Whether page `index` was written.
    public func contains(_ index: Int) -> Bool {
        // Binary search: the runs are ascending and disjoint.
        var low = 0, high = runs.count
        while low < high {
            let middle = (low + high) / 2
            if runs[middle].upperBound <= index { low = middle + 1 } else { high = middle }
        }
        return low < runs.count && runs[low].contains(index)
    }

    /// The page indices in ascending order.
    public func makeIterator() -> FlattenSequence<[Range<Int>]>.Iterator {
        runs.joined().makeIterator()
    }
}
