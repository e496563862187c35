// CUserfaultfd: the part of userfaultfd(2) that Swift cannot import by itself.
//
// - The system's <linux/userfaultfd.h> on these machines predates the kernel (no MOVE, POISON, WP_ASYNC), so the
//   kernel ABI is declared here in full, under our own names, and checked against the kernel's sizes and numbers.
// - ioctl(2) and syscall(2) are variadic and cannot be called from Swift; each request gets a typed wrapper.
// - _IOWR and friends are function-like macros; the request numbers are computed here.
//
// Every wrapper returns what the system call returned (-1 on error) and leaves errno as the kernel set it.

#ifndef CUSERFAULTFD_H
#define CUSERFAULTFD_H

#include <stddef.h>
#include <stdint.h>
#include <errno.h>
#include <fcntl.h>
#include <unistd.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <linux/ioctl.h>

#ifndef __NR_userfaultfd
#if defined(__x86_64__)
#define __NR_userfaultfd 323
#elif defined(__aarch64__)
#define __NR_userfaultfd 282
#endif
#endif

// MARK: - Kernel ABI (include/uapi/linux/userfaultfd.h, kernel 6.18)

#define CUFFD_API 0xAAULL
#define CUFFD_IOCTL_TYPE 0xAA

/// Flag for userfaultfd(2) / USERFAULTFD_IOC_NEW: only handle faults from user mode.
#define CUFFD_USER_MODE_ONLY 1

/// uffd_msg.event codes.
#define CUFFD_EVENT_PAGEFAULT 0x12
#define CUFFD_EVENT_FORK 0x13
#define CUFFD_EVENT_REMAP 0x14
#define CUFFD_EVENT_REMOVE 0x15
#define CUFFD_EVENT_UNMAP 0x16

/// uffd_msg.arg.pagefault.flags.
#define CUFFD_PAGEFAULT_FLAG_WRITE 1ULL
#define CUFFD_PAGEFAULT_FLAG_WP 2ULL
#define CUFFD_PAGEFAULT_FLAG_MINOR 4ULL


/// Ioctl command numbers (bit positions in the `ioctls` masks).
#define CUFFD_CMD_REGISTER 0x00
#define CUFFD_CMD_UNREGISTER 0x01
#define CUFFD_CMD_WAKE 0x02
#define CUFFD_CMD_COPY 0x03
#define CUFFD_CMD_ZEROPAGE 0x04
#define CUFFD_CMD_MOVE 0x05
#define CUFFD_CMD_WRITEPROTECT 0x06
#define CUFFD_CMD_CONTINUE 0x07
#define CUFFD_CMD_POISON 0x08
#define CUFFD_CMD_API 0x3F

struct cuffd_api {
    uint64_t api;
    uint64_t features;
    uint64_t ioctls;
};

struct cuffd_range {
    uint64_t start;
    uint64_t len;
};

struct cuffd_register {
    struct cuffd_range range;
    uint64_t mode;
    uint64_t ioctls;
};

struct cuffd_copy {
    uint64_t dst;
    uint64_t src;
    uint64_t len;
    uint64_t mode;
    int64_t copy;
};

struct cuffd_zeropage {
    struct cuffd_range range;
    uint64_t mode;
    int64_t zeropage;
};

struct cuffd_writeprotect {
    struct cuffd_range range;
    uint64_t mode;
};

struct cuffd_continue {
    struct cuffd_range range;
    uint64_t mode;
    int64_t mapped;
};

struct cuffd_poison {
    struct cuffd_range range;
    uint64_t mode;
    int64_t updated;
};

struct cuffd_move {
    uint64_t dst;
    uint64_t src;
    uint64_t len;
    uint64_t mode;
    int64_t move;
};

/// struct uffd_msg: what one read(2) of a userfaultfd returns per event. Packed, as in the kernel; every field is at its
/// natural alignment anyway, so the layout is the same with or without packing (only the struct's alignment is 1).
struct __attribute__((packed)) cuffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct __attribute__((packed)) {
            uint64_t flags;
            uint64_t address;
            union {
                uint32_t ptid;
            } feat;
        } pagefault;
        struct __attribute__((packed)) {
            uint32_t ufd;
        } fork;
        struct __attribute__((packed)) {
            uint64_t from;
            uint64_t to;
            uint64_t len;
        } remap;
        struct __attribute__((packed)) {
            uint64_t start;
            uint64_t end;
        } remove;
        struct __attribute__((packed)) {
            uint64_t reserved1;
            uint64_t reserved2;
            uint64_t reserved3;
        } reserved;
    } arg;
};

/// Size of one struct uffd_msg (packed).
#define CUFFD_MSG_SIZE 32

_Static_assert(sizeof(struct cuffd_msg) == CUFFD_MSG_SIZE, "uffd_msg is 32 bytes");
_Static_assert(offsetof(struct cuffd_msg, event) == 0, "uffd_msg.event");
_Static_assert(offsetof(struct cuffd_msg, arg) == 8, "uffd_msg.arg");
_Static_assert(offsetof(struct cuffd_msg, arg.pagefault.flags) == 8, "uffd_msg.arg.pagefault.flags");
_Static_assert(offsetof(struct cuffd_msg, arg.pagefault.address) == 16, "uffd_msg.arg.pagefault.address");
_Static_assert(offsetof(struct cuffd_msg, arg.pagefault.feat.ptid) == 24, "uffd_msg.arg.pagefault.feat.ptid");
_Static_assert(offsetof(struct cuffd_msg, arg.fork.ufd) == 8, "uffd_msg.arg.fork.ufd");
_Static_assert(offsetof(struct cuffd_msg, arg.remap.from) == 8, "uffd_msg.arg.remap.from");
_Static_assert(offsetof(struct cuffd_msg, arg.remap.to) == 16, "uffd_msg.arg.remap.to");
_Static_assert(offsetof(struct cuffd_msg, arg.remap.len) == 24, "uffd_msg.arg.remap.len");
_Static_assert(offsetof(struct cuffd_msg, arg.remove.start) == 8, "uffd_msg.arg.remove.start");
_Static_assert(offsetof(struct cuffd_msg, arg.remove.end) == 16, "uffd_msg.arg.remove.end");

_Static_assert(sizeof(struct cuffd_api) == 24, "uffdio_api is 24 bytes");
_Static_assert(sizeof(struct cuffd_range) == 16, "uffdio_range is 16 bytes");
_Static_assert(sizeof(struct cuffd_register) == 32, "uffdio_register is 32 bytes");
_Static_assert(sizeof(struct cuffd_copy) == 40, "uffdio_copy is 40 bytes");
_Static_assert(sizeof(struct cuffd_zeropage) == 32, "uffdio_zeropage is 32 bytes");
_Static_assert(sizeof(struct cuffd_writeprotect) == 24, "uffdio_writeprotect is 24 bytes");
_Static_assert(sizeof(struct cuffd_continue) == 32, "uffdio_continue is 32 bytes");
_Static_assert(sizeof(struct cuffd_poison) == 32, "uffdio_poison is 32 bytes");
_Static_assert(sizeof(struct cuffd_move) == 40, "uffdio_move is 40 bytes");

#define CUFFD_IOC_API _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_API, struct cuffd_api)
#define CUFFD_IOC_REGISTER _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_REGISTER, struct cuffd_register)
#define CUFFD_IOC_UNREGISTER _IOR(CUFFD_IOCTL_TYPE, CUFFD_CMD_UNREGISTER, struct cuffd_range)
#define CUFFD_IOC_WAKE _IOR(CUFFD_IOCTL_TYPE, CUFFD_CMD_WAKE, struct cuffd_range)
#define CUFFD_IOC_COPY _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_COPY, struct cuffd_copy)
#define CUFFD_IOC_ZEROPAGE _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_ZEROPAGE, struct cuffd_zeropage)
#define CUFFD_IOC_MOVE _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_MOVE, struct cuffd_move)
#define CUFFD_IOC_WRITEPROTECT _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_WRITEPROTECT, struct cuffd_writeprotect)
#define CUFFD_IOC_CONTINUE _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_CONTINUE, struct cuffd_continue)
#define CUFFD_IOC_POISON _IOWR(CUFFD_IOCTL_TYPE, CUFFD_CMD_POISON, struct cuffd_poison)
/// /dev/userfaultfd: create a new userfaultfd (argument: the flags, as for userfaultfd(2)).
#define CUFFD_IOC_NEW _IO(CUFFD_IOCTL_TYPE, 0x00)

_Static_assert(CUFFD_IOC_API == 0xC018AA3F, "UFFDIO_API");
_Static_assert(CUFFD_IOC_REGISTER == 0xC020AA00, "UFFDIO_REGISTER");
_Static_assert(CUFFD_IOC_UNREGISTER == 0x8010AA01, "UFFDIO_UNREGISTER");
_Static_assert(CUFFD_IOC_WAKE == 0x8010AA02, "UFFDIO_WAKE");
_Static_assert(CUFFD_IOC_COPY == 0xC028AA03, "UFFDIO_COPY");
_Static_assert(CUFFD_IOC_ZEROPAGE == 0xC020AA04, "UFFDIO_ZEROPAGE");
_Static_assert(CUFFD_IOC_MOVE == 0xC028AA05, "UFFDIO_MOVE");
_Static_assert(CUFFD_IOC_WRITEPROTECT == 0xC018AA06, "UFFDIO_WRITEPROTECT");
_Static_assert(CUFFD_IOC_CONTINUE == 0xC020AA07, "UFFDIO_CONTINUE");
_Static_assert(CUFFD_IOC_POISON == 0xC020AA08, "UFFDIO_POISON");
_Static_assert(CUFFD_IOC_NEW == 0xAA00, "USERFAULTFD_IOC_NEW");

// MARK: - Wrappers

/// userfaultfd(2). Returns the new descriptor or -1 with errno set.
static inline int cuffd_userfaultfd(int flags) {
#ifdef __NR_userfaultfd
    return (int)syscall(__NR_userfaultfd, flags);
#else
    errno = ENOSYS;
    return -1;
#endif
}

/// ioctl(devfd, USERFAULTFD_IOC_NEW, flags) on an open /dev/userfaultfd.
static inline int cuffd_dev_new(int devfd, int flags) {
    return ioctl(devfd, CUFFD_IOC_NEW, flags);
}

static inline int cuffd_ioctl_api(int fd, struct cuffd_api *arg) { return ioctl(fd, CUFFD_IOC_API, arg); }
static inline int cuffd_ioctl_register(int fd, struct cuffd_register *arg) { return ioctl(fd, CUFFD_IOC_REGISTER, arg); }
static inline int cuffd_ioctl_unregister(int fd, struct cuffd_range *arg) { return ioctl(fd, CUFFD_IOC_UNREGISTER, arg); }
static inline int cuffd_ioctl_wake(int fd, struct cuffd_range *arg) { return ioctl(fd, CUFFD_IOC_WAKE, arg); }
static inline int cuffd_ioctl_copy(int fd, struct cuffd_copy *arg) { return ioctl(fd, CUFFD_IOC_COPY, arg); }
static inline int cuffd_ioctl_zeropage(int fd, struct cuffd_zeropage *arg) { return ioctl(fd, CUFFD_IOC_ZEROPAGE, arg); }
static inline int cuffd_ioctl_move(int fd, struct cuffd_move *arg) { return ioctl(fd, CUFFD_IOC_MOVE, arg); }
static inline int cuffd_ioctl_writeprotect(int fd, struct cuffd_writeprotect *arg) { return ioctl(fd, CUFFD_IOC_WRITEPROTECT, arg); }
static inline int cuffd_ioctl_continue(int fd, struct cuffd_continue *arg) { return ioctl(fd, CUFFD_IOC_CONTINUE, arg); }
static inline int cuffd_ioctl_poison(int fd, struct cuffd_poison *arg) { return ioctl(fd, CUFFD_IOC_POISON, arg); }

/// fcntl(fd, F_GETFL) without the variadic call.
static inline int cuffd_get_status_flags(int fd) { return fcntl(fd, F_GETFL); }

/// Sets O_NONBLOCK on fd. Returns 0 or -1 with errno set.
static inline int cuffd_set_nonblocking(int fd) {
    int flags = fcntl(fd, F_GETFL);
    if (flags < 0) return -1;
    if (flags & O_NONBLOCK) return 0;
    return fcntl(fd, F_SETFL, flags | O_NONBLOCK);
}

/// open(path, O_RDWR | O_CLOEXEC) without the variadic call.
static inline int cuffd_open_rdwr(const char *path) { return open(path, O_RDWR | O_CLOEXEC); }

/// Flags for creation: O_CLOEXEC | O_NONBLOCK, plus UFFD_USER_MODE_ONLY when asked.
static inline int cuffd_creation_flags(int user_mode_only) {
    return O_CLOEXEC | O_NONBLOCK | (user_mode_only ? CUFFD_USER_MODE_ONLY : 0);
}

// MARK: - Passing descriptors over Unix sockets (SCM_RIGHTS; the CMSG_* macros are not importable)

#include <sys/types.h>

/// The most descriptors one message may carry in either direction.
#define CUFFD_MAX_PASSED_FDS 16

/// sendmsg(2) of `len` bytes with `nfds` descriptors (0 to CUFFD_MAX_PASSED_FDS) as SCM_RIGHTS.
/// Returns the bytes sent or -1 with errno set (EINVAL for too many descriptors).
ssize_t cuffd_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds);

/// CMSG_SPACE(data_len) and CMSG_LEN(data_len): the room one control message with `data_len` bytes of data takes in a
/// control buffer (with its padding), and the value of its cmsg_len.
size_t cuffd_cmsg_space(size_t data_len);
size_t cuffd_cmsg_len(size_t data_len);

/// One recvmsg(2) with MSG_CMSG_CLOEXEC, retrying EINTR, and nothing else: up to `cap` payload bytes into `buf`, the
/// raw control messages into `control` (room for `control_cap` bytes; their length in `*control_len`) and the
/// message's msg_flags (MSG_TRUNC, MSG_CTRUNC, ...) in `*msg_flags`. Returns the payload length (0 at end of stream)
/// or -1 with errno set. Any descriptor in `control` is now installed in this process: the caller parses them out
/// with cuffd_parse_rights and owns them, including the ones it does not want.
ssize_t cuffd_recv_raw(int sock, void *buf, size_t cap, void *control, size_t control_cap, size_t *control_len,
                       int *msg_flags);

/// Flags cuffd_parse_rights reports.
/// A control message header that cannot be: cmsg_len below the header's size or past the end of the buffer, an
/// SCM_RIGHTS message whose data is not a whole number of ints, or a partial header at the end. Parsing stops there.
#define CUFFD_RIGHTS_MALFORMED 1
/// More descriptors than `max_fds`: the rest were neither stored nor counted. With room for
/// `control_len / sizeof(int)` descriptors (all a buffer of that length can hold) this never happens.
#define CUFFD_RIGHTS_EXCESS 2

/// Walks the control messages in `control[0 ..< control_len]` (any alignment) and stores the descriptors of every
/// SOL_SOCKET/SCM_RIGHTS message, in order, in `fds` (room for `max_fds`), their count in `*nfds` and CUFFD_RIGHTS_*
/// bits in `*flags`. Other control messages are skipped. Never reads outside `control[0 ..< control_len]`, whatever
/// the headers claim. A pure function: it closes nothing. What to do with the descriptors (keep, or close because
/// there are too many or the buffer is malformed) is the caller's decision; on a malformed buffer `fds` holds those
/// found before the bad header.
void cuffd_parse_rights(const void *control, size_t control_len, int *fds, size_t max_fds, size_t *nfds, int *flags);

/// The process id of a connected Unix socket's peer (SO_PEERCRED), or -1 with errno set.
int cuffd_peer_pid(int sock);

/// The peer's credentials when it connected (SO_PEERCRED): 0, or -1 with errno set.
int cuffd_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid);

/// A close-on-exec pidfd for the peer's process: SO_PEERPIDFD (Linux 6.5+, no pid-reuse race), else pidfd_open(2)
/// on the SO_PEERCRED pid (Linux 5.3+). -1 with errno when neither works. It becomes readable when the process exits.
int cuffd_peer_pidfd(int sock);

/// Whether `fd` is a userfaultfd, asked of the kernel without /proc: its inode is not a device, socket, pipe or
/// directory (an anonymous inode has no file type) and UFFDIO_WAKE of one page, which wakes nothing that is not
/// waiting there, succeeds (every other kind of descriptor refuses that ioctl with ENOTTY or EINVAL). 1 yes, 0 no.
int cuffd_probe_userfaultfd(int fd);

/// A non-blocking, close-on-exec Unix stream socket bound to `path` and listening. A stale socket file at `path` is
/// removed first (any other kind of file is left alone: bind then fails with EADDRINUSE). -1 with errno on failure
/// (ENAMETOOLONG for a path that does not fit sockaddr_un).
int cuffd_unix_listen(const char *path, int backlog);

/// cuffd_unix_listen, but the socket file gets `mode` (e.g. 0600) and, when `gid` is not -1, that group: set after
/// bind and before listen, so that nobody can connect while the file still has the umask's permissions.
int cuffd_unix_listen_mode(const char *path, int backlog, unsigned mode, int64_t gid);

/// A non-blocking, close-on-exec Unix stream socket connected to `path` (a blocking connect, which for Unix sockets is
/// immediate), or -1 with errno.
int cuffd_unix_connect(const char *path);

/// accept4(2) with SOCK_NONBLOCK | SOCK_CLOEXEC, retrying EINTR; -1 with errno (EAGAIN when none is pending).
int cuffd_unix_accept(int listener);

// MARK: - PAGEMAP_SCAN (fs/proc/task_mmu.c, include/uapi/linux/fs.h, 6.7+): dirty tracking with WP_ASYNC

/// page_region / pm_scan_arg categories.
#define CUFFD_PAGE_IS_WPALLOWED (1ULL << 0)
#define CUFFD_PAGE_IS_WRITTEN (1ULL << 1)
#define CUFFD_PAGE_IS_FILE (1ULL << 2)
#define CUFFD_PAGE_IS_PRESENT (1ULL << 3)
/// pm_scan_arg.flags: write-protect the pages that match (re-arms WP_ASYNC tracking in the same walk).
#define CUFFD_PM_SCAN_WP_MATCHING (1ULL << 0)
/// pm_scan_arg.flags: fail with EPERM unless the whole range is registered with WP_ASYNC.
#define CUFFD_PM_SCAN_CHECK_WPASYNC (1ULL << 1)

struct cuffd_page_region {
    uint64_t start;
    uint64_t end;
    uint64_t categories;
};

struct cuffd_pm_scan_arg {
    uint64_t size;
    uint64_t flags;
    uint64_t start;
    uint64_t end;
    uint64_t walk_end;
    uint64_t vec;
    uint64_t vec_len;
    uint64_t max_pages;
    uint64_t category_inverted;
    uint64_t category_mask;
    uint64_t category_anyof_mask;
    uint64_t return_mask;
};

_Static_assert(sizeof(struct cuffd_page_region) == 24, "page_region is 24 bytes");
_Static_assert(sizeof(struct cuffd_pm_scan_arg) == 96, "pm_scan_arg is 96 bytes");

#define CUFFD_PAGEMAP_SCAN _IOWR('f', 16, struct cuffd_pm_scan_arg)
_Static_assert(CUFFD_PAGEMAP_SCAN == 0xC0606610, "PAGEMAP_SCAN");

/// ioctl(pagemap_fd, PAGEMAP_SCAN, arg): the number of page_region entries filled, or -1 with errno set.
static inline int cuffd_ioctl_pagemap_scan(int fd, struct cuffd_pm_scan_arg *arg) { return ioctl(fd, CUFFD_PAGEMAP_SCAN, arg); }

/// open(path, O_RDONLY | O_CLOEXEC) without the variadic call.
static inline int cuffd_open_rdonly(const char *path) { return open(path, O_RDONLY | O_CLOEXEC); }

/// memfd_create(name, MFD_CLOEXEC) as a raw system call. Returns the descriptor or -1 with errno set.
static inline int cuffd_memfd_create(const char *name) {
#ifdef SYS_memfd_create
    return (int)syscall(SYS_memfd_create, name, 0x0001U /* MFD_CLOEXEC */);
#else
    errno = ENOSYS;
    return -1;
#endif
}

/// preadv2(fd, {buf, count}, 1, offset, RWF_NOWAIT): reads only what the page cache already holds. Returns the bytes
/// read (fewer than `count` when part of the range is not cached), or -1 with errno EAGAIN when nothing is cached,
/// EOPNOTSUPP when the file system cannot read without blocking, or another errno.
ssize_t cuffd_pread_nowait(int fd, void *buf, size_t count, int64_t offset);

#endif // CUSERFAULTFD_H
