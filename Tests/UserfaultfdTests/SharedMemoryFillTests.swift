import Glibc
import Synchronization
import Testing
import Userfaultfd

/// `SharedMemoryFile.fill` puts a provider's pages into the file's page cache, and must never overwrite a page that is
/// already there: written through another mapping (another VM's, or this process's), even while the fill runs.
@Suite("Shared memory fill")
struct SharedMemoryFillTests {
    static let pageSize = systemPageSize

    /// Pages written through another mapping before the fill keep their bytes; the others get the source's (or zeros).
    @Test(arguments: [true, false])
    func pagesAlreadyWrittenAreKept(withSource: Bool) throws {
        let pages = 8
        let file = try SharedMemoryFile(length: pages * Self.pageSize)
        let other = try file.map()
        let bytes = other.address
        for page in [1, 4, 7] { UnsafeMutablePointer<UInt8>(bitPattern: bytes + UInt(page * Self.pageSize))!.pointee = 0xee }
        let source = [UInt8](repeating: 0x11, count: pages * Self.pageSize)
        source.withUnsafeBytes { file.fill(offset: 0, count: pages * Self.pageSize, from: withSource ? $0.baseAddress! : nil) }
        other.withUnsafeBytes { view in
            for page in 0..<pages {
                let written = [1, 4, 7].contains(page)
                #expect(view[page * Self.pageSize] == (written ? 0xee : withSource ? 0x11 : 0), "page \(page), byte 0")
                #expect(view[page * Self.pageSize + 1] == (written || !withSource ? 0 : 0x11), "page \(page), byte 1")
            }
        }
    }

    /// A writer stores one byte into each page through another mapping, last page first, while `fill` runs over the
    /// same pages: every store must survive (the fill either came first and the store landed on its page, or found the
    /// page there and left it). Repeated for up to 3 s; deciding with `mincore(2)` first and copying afterwards loses
    /// stores made in between.
    @Test(.timeLimit(.minutes(1)))
    func aPageWrittenDuringTheFillIsNeverOverwritten() async throws {
        let pages = 64
        let source = [UInt8](repeating: 0x11, count: pages * Self.pageSize)
        let deadline = ContinuousClock.now + .seconds(3)
        var rounds = 0, lost = 0
        while ContinuousClock.now < deadline && lost == 0 {
            let file = try SharedMemoryFile(length: pages * Self.pageSize)
            let other = try file.map()
            let go = StartFlag()
            let base = other.address
            let writer = OffPoolThread { () -> Bool in
                while !go.isSet {}
                for page in (0..<pages).reversed() {
                    UnsafeMutablePointer<UInt8>(bitPattern: base + UInt(page * Self.pageSize))!.pointee = 0xee
                }
                return true
            }
            go.set()
            source.withUnsafeBytes { file.fill(offset: 0, count: pages * Self.pageSize, from: $0.baseAddress!) }
            _ = await writer.value
            lost += other.withUnsafeBytes { view in (0..<pages).filter { view[$0 * Self.pageSize] != 0xee }.count }
            rounds += 1
        }
        #expect(lost == 0, "\(lost) stores overwritten by the fill in \(rounds) rounds")
        #expect(rounds > 0)
    }
}

/// A flag a spinning thread waits on.
final class StartFlag: Sendable {
    private let flag = Atomic<Bool>(false)
    var isSet: Bool { flag.load(ordering: .acquiring) }
    func set() { flag.store(true, ordering: .releasing) }
}
