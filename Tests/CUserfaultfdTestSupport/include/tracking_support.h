// Test-only C helpers for the dirty-tracking tests (Tests/UserfaultfdTests/Tracking).

#ifndef CUSERFAULTFD_TRACKING_SUPPORT_H
#define CUSERFAULTFD_TRACKING_SUPPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

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

/// A copy of descriptor `fd` of process `pid` in this process (pidfd_open + pidfd_getfd), or -1 with errno.
int cuffd_test_pidfd_getfd(pid_t pid, int fd);

#endif
