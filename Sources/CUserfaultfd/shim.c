// Most of the shim is static inline in the header; this file holds what needs the CMSG_* macros, and compiles the
// header's _Static_asserts that check our kernel ABI declarations against the kernel's numbers.
#define _GNU_SOURCE
#include <stdio.h>
#include "CUserfaultfd.h"

#include <string.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <sys/un.h>

ssize_t cuffd_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > CUFFD_MAX_PASSED_FDS) {
        errno = EINVAL;
        return -1;
    }
    union {
        char bytes[CMSG_SPACE(sizeof(int) * CUFFD_MAX_PASSED_FDS)];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof(control));
    struct iovec iov = { .iov_base = (void *)buf, .iov_len = len };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
    if (nfds > 0) {
        msg.msg_control = control.bytes;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * (size_t)nfds);
        struct cmsghdr *header = CMSG_FIRSTHDR(&msg);
        header->cmsg_level = SOL_SOCKET;
        header->cmsg_type = SCM_RIGHTS;
        header->cmsg_len = CMSG_LEN(sizeof(int) * (size_t)nfds);
        memcpy(CMSG_DATA(header), fds, sizeof(int) * (size_t)nfds);
    }
    ssize_t sent;
    do {
        sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
    } while (sent < 0 && errno == EINTR);
    return sent;
}

size_t cuffd_cmsg_space(size_t data_len) { return CMSG_SPACE(data_len); }
size_t cuffd_cmsg_len(size_t data_len) { return CMSG_LEN(data_len); }

ssize_t cuffd_recv_raw(int sock, void *buf, size_t cap, void *control, size_t control_cap, size_t *control_len,
                       int *msg_flags) {
    struct iovec iov = { .iov_base = buf, .iov_len = cap };
    struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = control_cap };
    *control_len = 0;
    *msg_flags = 0;
    ssize_t received;
    do {
        received = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
    } while (received < 0 && errno == EINTR);
    if (received < 0) return -1;
    *control_len = msg.msg_controllen <= control_cap ? msg.msg_controllen : control_cap;
    *msg_flags = msg.msg_flags;
    return received;
}

// Not CMSG_FIRSTHDR/CMSG_NXTHDR: they trust cmsg_len more than a parser of untrusted bytes may (glibc's NXTHDR
// checks the next header's start, not that the current one's data fits), and they assume an aligned buffer.
// Offsets and memcpy instead, every bound checked against what is left before any read.
void cuffd_parse_rights(const void *control, size_t control_len, int *fds, size_t max_fds, size_t *nfds, int *flags) {
    const unsigned char *bytes = control;
    const size_t header_size = CMSG_LEN(0);  // the header with its padding up to the data
    size_t offset = 0;
    *nfds = 0;
    *flags = 0;
    while (offset < control_len) {
        size_t left = control_len - offset;
        if (left < header_size) {  // a partial header
            *flags |= CUFFD_RIGHTS_MALFORMED;
            return;
        }
        struct cmsghdr header;
        memcpy(&header, bytes + offset, sizeof(header));
        size_t length = header.cmsg_len;
        if (length < header_size || length > left) {
            *flags |= CUFFD_RIGHTS_MALFORMED;
            return;
        }
        if (header.cmsg_level == SOL_SOCKET && header.cmsg_type == SCM_RIGHTS) {
            size_t data_len = length - header_size;
            if (data_len % sizeof(int) != 0) {
                *flags |= CUFFD_RIGHTS_MALFORMED;
                return;
            }
            for (size_t at = 0; at < data_len; at += sizeof(int)) {
                if (*nfds == max_fds) {
                    *flags |= CUFFD_RIGHTS_EXCESS;
                    break;
                }
                memcpy(&fds[*nfds], bytes + offset + header_size + at, sizeof(int));
                *nfds += 1;
            }
        }
        // The next header starts after this one's padding; the last one's padding may be missing (length == left).
        size_t advance = CMSG_ALIGN(length);
        if (advance >= left) return;
        offset += advance;
    }
}

int cuffd_peer_pid(int sock) {
    struct ucred credentials;
    socklen_t length = sizeof(credentials);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &credentials, &length) < 0) return -1;
    return credentials.pid;
}

int cuffd_peer_credentials(int sock, int32_t *pid, uint32_t *uid, uint32_t *gid) {
    struct ucred credentials;
    socklen_t length = sizeof(credentials);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERCRED, &credentials, &length) < 0) return -1;
    *pid = credentials.pid;
    *uid = credentials.uid;
    *gid = credentials.gid;
    return 0;
}

#ifndef SO_PEERPIDFD
#define SO_PEERPIDFD 77
#endif

int cuffd_peer_pidfd(int sock) {
    int pidfd = -1;
    socklen_t length = sizeof(pidfd);
    if (getsockopt(sock, SOL_SOCKET, SO_PEERPIDFD, &pidfd, &length) == 0 && pidfd >= 0) {
        fcntl(pidfd, F_SETFD, FD_CLOEXEC);
        return pidfd;
    }
    int pid = cuffd_peer_pid(sock);
    if (pid <= 0) return -1;
    pidfd = (int)syscall(434 /* SYS_pidfd_open */, pid, 0);
    if (pidfd >= 0) fcntl(pidfd, F_SETFD, FD_CLOEXEC);
    return pidfd;
}

int cuffd_probe_userfaultfd(int fd) {
    struct stat info;
    if (fstat(fd, &info) < 0) return 0;
    // An anonymous inode has no file type today; should one ever report S_IFREG, that is accepted too (regular
    // files refuse the ioctl). Devices are refused outright: a driver could answer any ioctl.
    mode_t type = info.st_mode & S_IFMT;
    if (type != 0 && type != S_IFREG) return 0;
    long page = sysconf(_SC_PAGESIZE);
    struct cuffd_range range = { .start = (uint64_t)page, .len = (uint64_t)page };
    if (cuffd_ioctl_wake(fd, &range) == 0) return 1;
    return errno == ESRCH ? 1 : 0;
}

static int cuffd_unix_address(const char *path, struct sockaddr_un *address) {
    memset(address, 0, sizeof(*address));
    address->sun_family = AF_UNIX;
    size_t length = strlen(path);
    if (length == 0 || length >= sizeof(address->sun_path)) {
        errno = ENAMETOOLONG;
        return -1;
    }
    memcpy(address->sun_path, path, length);
    return 0;
}

int cuffd_unix_listen(const char *path, int backlog) {
    return cuffd_unix_listen_mode(path, backlog, 0, -1);
}

int cuffd_unix_listen_mode(const char *path, int backlog, unsigned mode, int64_t gid) {
    struct sockaddr_un address;
    if (cuffd_unix_address(path, &address) < 0) return -1;
    // The socket is bound under a staging name beside the final one, given its permissions, set listening, and only
    // then renamed into place: whoever sees the path can connect at once, and never sees it with other permissions.
    // A path too long for a staging name beside it is bound directly (connecting is refused until listen).
    struct sockaddr_un bound = address;
    int staged = snprintf(bound.sun_path, sizeof(bound.sun_path), "%s.%d.tmp", path, (int)getpid());
    if (staged <= 0 || (size_t)staged >= sizeof(bound.sun_path)) {
        bound = address;
        staged = 0;
    }
    struct stat info;
    if (lstat(path, &info) == 0 && S_ISSOCK(info.st_mode)) unlink(path);
    if (staged && lstat(bound.sun_path, &info) == 0 && S_ISSOCK(info.st_mode)) unlink(bound.sun_path);
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    if (bind(sock, (struct sockaddr *)&bound, sizeof(bound)) < 0) {
        int saved = errno;
        close(sock);
        errno = saved;
        return -1;
    }
    if ((mode != 0 && chmod(bound.sun_path, mode) < 0) || (gid >= 0 && chown(bound.sun_path, (uid_t)-1, (gid_t)gid) < 0)
        || listen(sock, backlog) < 0 || (staged && rename(bound.sun_path, path) < 0)) {
        int saved = errno;
        unlink(bound.sun_path);
        close(sock);
        errno = saved;
        return -1;
    }
    return sock;
}

int cuffd_unix_connect(const char *path) {
    struct sockaddr_un address;
    if (cuffd_unix_address(path, &address) < 0) return -1;
    int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0) return -1;
    int result;
    do {
        result = connect(sock, (struct sockaddr *)&address, sizeof(address));
    } while (result < 0 && errno == EINTR);
    if (result < 0 || cuffd_set_nonblocking(sock) < 0) {
        int saved = errno;
        close(sock);
        errno = saved;
        return -1;
    }
    return sock;
}

int cuffd_unix_accept(int listener) {
    int sock;
    do {
        sock = accept4(listener, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
    } while (sock < 0 && errno == EINTR);
    return sock;
}

ssize_t cuffd_pread_nowait(int fd, void *buf, size_t count, int64_t offset) {
    struct iovec vector = { .iov_base = buf, .iov_len = count };
    return preadv2(fd, &vector, 1, (off_t)offset, RWF_NOWAIT);
}
