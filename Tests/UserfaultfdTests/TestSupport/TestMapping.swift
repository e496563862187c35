import CUserfaultfdTestSupport
import Foundation
import Glibc
import Userfaultfd

/// Page-granular memory for tests: a private anonymous mapping, or a shared mapping of a file descriptor, unmapped when
/// the owning ``FaultScope`` tears down (after its userfaultfds are closed) unless a test unmapped or moved it itself.
final class TestMapping: @unchecked Sendable {
    // @unchecked: `address`/`length` are immutable; `unmapped` is guarded by `lock`; the memory is shared on purpose.
    let address: UInt
    let length: Int
    let pageSize = systemPageSize
    private let lock = NSLock()
    private var unmapped = false

    /// `pages` pages of private anonymous memory (PROT_READ|PROT_WRITE unless `prot` says otherwise).
    convenience init(pages: Int, prot: Int32 = PROT_READ | PROT_WRITE) throws {
        try self.init(length: pages * systemPageSize, prot: prot, flags: MAP_PRIVATE | MAP_ANONYMOUS, fd: -1)
    }

    init(length: Int, prot: Int32, flags: Int32, fd: Int32) throws {
        let pointer = mmap(nil, length, prot, flags, fd, 0)
        guard let pointer, pointer != MAP_FAILED else {
            throw TestFailure("mmap of \(length) bytes failed: \(String(cString: strerror(errno)))")
        }
        self.address = UInt(bitPattern: pointer)
        self.length = length
    }

    var pages: Int { length / pageSize }
    var range: MemoryRange { MemoryRange(start: address, length: length) }
    var pointer: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: address)! }

    /// Address of page `index`.
    func page(_ index: Int) -> UInt { address + UInt(index * pageSize) }

    /// The range of `count` pages starting at page `index`.
    func pages(_ index: Int, count: Int = 1) -> MemoryRange {
        MemoryRange(start: page(index), length: count * pageSize)
    }

    /// Fills page `index` with `byte` (the page must be resolvable without a fault, e.g. not yet registered).
    func fill(page index: Int, with byte: UInt8) {
        memset(UnsafeMutableRawPointer(bitPattern: page(index))!, Int32(byte), pageSize)
    }

    /// The bytes of page `index` (the page must be present, or reading it would fault).
    func bytes(page index: Int) -> [UInt8] {
        Array(UnsafeRawBufferPointer(start: UnsafeRawPointer(bitPattern: page(index))!, count: pageSize))
    }

    /// Records that the test unmapped (or moved) the memory itself.
    func markUnmapped() {
        lock.lock()
        unmapped = true
        lock.unlock()
    }

    func unmap() {
        lock.lock()
        let already = unmapped
        unmapped = true
        lock.unlock()
        if !already { munmap(pointer, length) }
    }
}

/// A shmem file (memfd) mapped twice MAP_SHARED: writing through one mapping fills the page cache that the other maps.
final class SharedMemfd: @unchecked Sendable {
    // @unchecked: immutable after init.
    let descriptor: Int32
    let first: TestMapping
    let second: TestMapping

    init(pages: Int, scope: FaultScope) throws {
        let length = pages * systemPageSize
        descriptor = cuffd_test_memfd("uffd-test-minor", length)
        guard descriptor >= 0 else { throw TestFailure("memfd_create failed: \(String(cString: strerror(errno)))") }
        do {
            first = try scope.track(TestMapping(length: length, prot: PROT_READ | PROT_WRITE, flags: MAP_SHARED, fd: descriptor))
            second = try scope.track(TestMapping(length: length, prot: PROT_READ | PROT_WRITE, flags: MAP_SHARED, fd: descriptor))
        } catch {
            Glibc.close(descriptor)
            throw error
        }
        scope.onTearDown { [descriptor] in Glibc.close(descriptor) }
    }
}

/// A test precondition that did not hold (mmap failed, ...); thrown so the test fails with a message.
struct TestFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}
