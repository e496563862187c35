import Glibc
import Synchronization

/// A mapping that follows `mremap(2)` and `munmap(2)` done by the application: where each run of its pages lives now.
///
/// A region that owns its memory must unmap what is still its own when it closes — not the address it started at, which
/// after a move may belong to something else. The resolver reports REMAP and UNMAP events here as it applies them.
final class RegionMapping: @unchecked Sendable {
    // @unchecked: the immutable page size; `pieces` is guarded by a Mutex.

    /// A run of the region's pages: `range` holds pages `firstPage ..< firstPage + range.length / pageSize`.
    struct Piece: Sendable, Equatable {
        var range: MemoryRange
        var firstPage: Int
    }

    private let pieces: Mutex<[Piece]>
    private let pageSize: Int

    /// Takes ownership of `range`, already mapped.
    init(owning range: MemoryRange, pageSize: Int = systemPageSize) {
        pieces = Mutex([Piece(range: range, firstPage: 0)])
        self.pageSize = pageSize
    }

    /// Maps `length` bytes (whole pages) of private anonymous memory. A length that is not positive or does not round
    /// up to whole pages within `Int.max` is ``UserfaultError/Code/invalidArgument``.
    static func anonymous(length: Int, noReserve: Bool) throws(UserfaultError) -> RegionMapping {
        let rounded = try wholePages(length, operation: .mmap, of: "an anonymous mapping")
        let pointer = mmap(nil, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | (noReserve ? MAP_NORESERVE : 0), -1, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw UserfaultError(.system, operation: .mmap, errno: errno, detail: "mmap of \(rounded) bytes of anonymous memory failed")
        }
        return RegionMapping(owning: MemoryRange(start: UInt(bitPattern: pointer), length: rounded))
    }

    /// Where the region's pages are now.
    var current: [Piece] { pieces.withLock { $0 } }

    /// The address of region page 0, while it is mapped.
    var baseAddress: UInt? { pieces.withLock { $0.first { $0.firstPage == 0 }.map(\.range.start) } }

    /// `length` bytes moved from `from` to `to` (a REMAP event).
    func moved(from: UInt, to: UInt, length: Int) {
        let moved = MemoryRange(start: from, length: length)
        pieces.withLock { pieces in
            var result: [Piece] = []
            for piece in pieces {
                guard let common = piece.range.intersection(moved) else { result.append(piece); continue }
                result.append(contentsOf: remainder(of: piece, without: common))
                let page = piece.firstPage + Int((common.start - piece.range.start) / UInt(pageSize))
                result.append(Piece(range: MemoryRange(start: common.start - from + to, length: common.length), firstPage: page))
            }
            pieces = result.sorted { $0.firstPage < $1.firstPage }
        }
    }

    /// `range` was unmapped (an UNMAP event, or the region closing part of itself).
    func unmapped(_ range: MemoryRange) {
        pieces.withLock { pieces in
            pieces = pieces.flatMap { piece -> [Piece] in
                guard let common = piece.range.intersection(range) else { return [piece] }
                return remainder(of: piece, without: common)
            }
        }
    }

    private func remainder(of piece: Piece, without common: MemoryRange) -> [Piece] {
        var result: [Piece] = []
        if common.start > piece.range.start {
            result.append(Piece(range: MemoryRange(start: piece.range.start, end: common.start), firstPage: piece.firstPage))
        }
        if common.end < piece.range.end {
            let page = piece.firstPage + Int((common.end - piece.range.start) / UInt(pageSize))
            result.append(Piece(range: MemoryRange(start: common.end, end: piece.range.end), firstPage: page))
        }
        return result
    }

    /// Unmaps every piece still owned (once).
    func unmapAll() {
        let owned = pieces.withLock { pieces in
            defer { pieces = [] }
            return pieces
        }
        for piece in owned { munmap(UnsafeMutableRawPointer(bitPattern: piece.range.start), piece.range.length) }
    }

    deinit { unmapAll() }
}
