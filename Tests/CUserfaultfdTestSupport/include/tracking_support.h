// Test-only C helpers for the dirty-tracking tests (Tests/UserfaultfdTests/Tracking).

#ifndef CUSERFAULTFD_TRACKING_SUPPORT_H
#define CUSERFAULTFD_TRACKING_SUPPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// Forks the process with a raw clone(SIGCHLD), connected to the child by a pipe for commands (the child's descriptor 3,
/// read end; *command_fd here, write end) and a Unix stream socket for replies (the child's descriptor 4; *reply_fd
/// here). Returns 0 in the child, which has closed every other descriptor above stderr, unblocked SIGALRM and armed
/// alarm(30), and may run only async-signal-safe code; the child's pid in the parent, or -1 with errno.
pid_t cuffd_test_clone_with_channels(int *command_fd, int *reply_fd);

/// Forks (raw clone) a child that maps `pages` anonymous pages, creates a userfaultfd with `features`, registers the
/// pages for write protection, and reports (see cuffd_test_read_child_hello). With `hand_over`, the report (16 bytes:
/// address, descriptor number, status 0) carries the userfaultfd itself (SCM_RIGHTS): the child hands its faults over,
/// as a process that asks another to track it does. It then reads page numbers (uint32) from *command_fd and writes one
/// byte into each page, answering each with one byte on *reply_fd (a Unix stream socket); UINT32_MAX makes it exit 0.
/// An alarm(30) bounds it. Returns the child's pid, or -1 with errno.
pid_t cuffd_test_spawn_tracked_child(size_t pages, uint64_t features, int hand_over, int *command_fd, int *reply_fd);

/// Reads the child's report: its region's address and its userfaultfd's descriptor number (in the child). Returns 0, or
/// the child's failure status (10-13), or -1 when the read failed.
int cuffd_test_read_child_hello(int reply_fd, uint64_t *address, int *uffd);

/// Sends `length` bytes of `payload` on `socket` with `descriptor` attached (SCM_RIGHTS): the way a process hands its
/// userfaultfd to another. Async-signal-safe (for raw-cloned children). Returns 0, or -1 with errno.
int cuffd_test_send_descriptor(int socket, const void *payload, size_t length, int descriptor);

/// A copy of descriptor `fd` of process `pid` in this process (pidfd_open + pidfd_getfd), or -1 with errno.
int cuffd_test_pidfd_getfd(pid_t pid, int fd);

#endif
