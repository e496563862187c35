import CUserfaultfd
import Glibc

extension UserfaultFD {
    /// Whether the address space this userfaultfd serves is gone: its process exited (or exec'd). A userfaultfd
    /// received from a FORK event or another process stays open and quiet after that — no event says so — and this is
    /// how a server notices and lets it go.
    ///
    /// Changes nothing: it asks for a `UFFDIO_COPY` to `page` from an unreadable source without waking anyone. A live
    /// address space refuses it (`EFAULT`: the source; `EEXIST`: the page is present; `ENOENT`: not registered;
    /// `EAGAIN`: an event is unread); a gone one answers `ESRCH` before looking at anything.
    ///
    /// - Parameter page: a page-aligned address in a range registered with this userfaultfd.
    /// - Returns: true only when the kernel said the address space has exited; false too when this userfaultfd is closed.
    public func addressSpaceHasExited(probing page: UInt) -> Bool {
        let range = MemoryRange(start: page, length: systemPageSize)
        let failure = try? lease.withDescriptor(.copy, range: range) { descriptor throws(UserfaultError) -> Int32 in
            // DONTWAKE, source address 0: never readable, so nothing can be copied or woken.
            var argument = cuffd_copy(dst: UInt64(page), src: 0, len: UInt64(systemPageSize), mode: 1, copy: 0)
            return cuffd_ioctl_copy(descriptor, &argument) < 0 ? errno : 0
        }
        return failure == ESRCH
    }
}
