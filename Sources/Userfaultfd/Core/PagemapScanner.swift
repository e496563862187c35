import CUserfaultfd
import Glibc

/// `/proc/PID/pagemap` opened for the `PAGEMAP_SCAN` ioctl (Linux 6.7+): which pages of a range were written since
/// they were last write-protected, for memory registered ``RegistrationMode/writeProtect`` on a userfaultfd with
/// ``UserfaultFeatures/wpAsync``.
///
/// One scan can also re-protect the pages it reports (`PM_SCAN_WP_MATCHING`), page by page under the page-table lock,
/// so a write racing the scan lands either in this scan's result or in the next one, never in neither.
package final class PagemapScanner: @unchecked Sendable {
    // @unchecked: the descriptor is immutable; every scan uses its own result buffer.

    /// The process whose memory is scanned (`nil`: this process, through `/proc/self/pagemap`).
    package let pid: pid_t?
    private let descriptor: Int32
    /// `page_region` entries per `PAGEMAP_SCAN` call; a scan with more runs than that continues from `walk_end`.
    let regionCapacity: Int

    /// Opens the pagemap of `pid` (or of this process). Another process's needs ptrace access (root, or the same user
    /// with a permissive `ptrace_scope`).
    package convenience init(pid: pid_t? = nil) throws(UserfaultError) {
        try self.init(pid: pid, regionCapacity: 512)
    }

    /// The same with a result vector of `regionCapacity` entries (tests use a tiny one to make every scan resume).
    package init(pid: pid_t?, regionCapacity: Int) throws(UserfaultError) {
        precondition(regionCapacity > 0, "regionCapacity must be positive")
        let path = pid.map { "/proc/\($0)/pagemap" } ?? "/proc/self/pagemap"
        let descriptor = cuffd_open_rdonly(path)
        guard descriptor >= 0 else {
            throw UserfaultError(operation: .scanPagemap, errno: Glibc.errno, detail: "cannot open \(path)")
        }
        self.pid = pid
        self.descriptor = descriptor
        self.regionCapacity = regionCapacity
    }

    deinit {
        _ = Glibc.close(descriptor)
    }

    /// The written pages of `range` (page-aligned), as maximal runs in ascending order.
    ///
    /// - Parameter rearm: write-protect the reported pages in the same walk, so that the next scan reports only what is
    ///   written after this one.
    /// - Throws: ``UserfaultError`` with operation ``UserfaultError/Operation/scanPagemap`` (`EINVAL` on kernels without
    ///   `PAGEMAP_SCAN`, `EPERM` when re-arming memory not registered with ``UserfaultFeatures/wpAsync``).
    package func writtenPages(in range: MemoryRange, rearm: Bool) throws(UserfaultError) -> [MemoryRange] {
        try scan(range, category: UInt64(CUFFD_PAGE_IS_WRITTEN),
                 flags: rearm ? UInt64(CUFFD_PM_SCAN_WP_MATCHING | CUFFD_PM_SCAN_CHECK_WPASYNC) : 0)
    }

    /// The pages of `range` (page-aligned) that lie in mappings registered for write protection on a userfaultfd with
    /// ``UserfaultFeatures/wpAsync``, as maximal runs in ascending order: what a WP_ASYNC tracker of `range` still
    /// sees. Pages unmapped since (`munmap`, or moved away by `mremap`) or covered by a mapping that replaced the
    /// registered one are missing. Nothing is re-protected.
    package func asyncWriteProtectedPages(in range: MemoryRange) throws(UserfaultError) -> [MemoryRange] {
        try scan(range, category: UInt64(CUFFD_PAGE_IS_WPALLOWED), flags: 0)
    }

    /// One `PAGEMAP_SCAN` walk over `range` for the pages in `category`, resumed from `walk_end` as often as the result
    /// vector fills.
    private func scan(_ range: MemoryRange, category: UInt64, flags: UInt64) throws(UserfaultError) -> [MemoryRange] {
        guard range.length > 0, range.isAligned(to: systemPageSize) else {
            throw UserfaultError(.invalidArgument, operation: .scanPagemap, range: range, detail: "the range must be page-aligned and not empty")
        }
        let capacity = regionCapacity
        let regions = UnsafeMutablePointer<cuffd_page_region>.allocate(capacity: capacity)
        defer { regions.deallocate() }
        var result: [MemoryRange] = []
        var start = UInt64(range.start)
        let end = UInt64(range.end)
        while start < end {
            var argument = cuffd_pm_scan_arg()
            argument.size = UInt64(MemoryLayout<cuffd_pm_scan_arg>.size)
            argument.flags = flags
            argument.start = start
            argument.end = end
            argument.vec = UInt64(UInt(bitPattern: regions))
            argument.vec_len = UInt64(capacity)
            argument.category_mask = category
            argument.return_mask = category
            let count = retryingInterrupts { cuffd_ioctl_pagemap_scan(descriptor, &argument) }
            guard count >= 0 else {
                throw UserfaultError(operation: .scanPagemap, errno: Glibc.errno, range: range,
                                     detail: "PAGEMAP_SCAN on the pagemap of \(pid.map(String.init) ?? "self")")
            }
            for index in 0..<Int(count) {
                let region = regions[index]
                let piece = MemoryRange(start: UInt(region.start), end: UInt(region.end))
                if let last = result.last, last.end == piece.start {
                    result[result.count - 1] = MemoryRange(start: last.start, end: piece.end)
                } else {
                    result.append(piece)
                }
            }
            // The walk stops early when the vector is full; walk_end says where to go on.
            guard argument.walk_end > start else { break }
            start = argument.walk_end
        }
        return result
    }
}
