import Glibc

/// Whether a page is mapped right now, asked of the kernel with `mincore(2)`.
///
/// A resolver's own record of which pages it installed can go stale without an event saying so: `madvise(DONTNEED)`
/// sends REMOVE and waits for it to be *read*, then zaps the range, so a page installed between the read and the zap
/// is gone again although the REMOVE was already applied. A missing-page fault on a page recorded as present is either
/// such a page or a duplicate fault message from a thread that was already woken; this tells the two apart.
///
/// It asks about *this* process's memory, so it says nothing about a userfaultfd of another address space (received
/// from a VMM, or a forked child's): ``UserfaultFD/servesOwnAddressSpace`` tells which is which.
///
/// - Returns: `true` when the page is mapped (anonymous memory: a page-table entry, the shared zero page included;
///   file or shared memory: the page is in the page cache), `false` when it is not or the address is not mapped at all.
func pageIsResident(_ page: MemoryRange) -> Bool {
    var vector: UInt8 = 0
    guard let address = UnsafeMutableRawPointer(bitPattern: page.start),
          mincore(address, systemPageSize, &vector) == 0 else { return false }
    return vector & 1 != 0
}
