// Test-only C helpers for the resolution tests (Tests/UserfaultfdTests/Resolution).

#ifndef CUSERFAULTFD_RESOLUTION_SUPPORT_H
#define CUSERFAULTFD_RESOLUTION_SUPPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// FNV-1a over `length` bytes at `addr`, read with volatile loads (so every byte is really touched, faulting its page
/// in when it is missing). Eight bytes per step, then the tail byte by byte.
uint64_t cuffd_res_checksum(const volatile void *addr, size_t length);

/// Fills `out[i]` with the checksum of page `i` of `length` bytes at `addr` (`page_size` bytes per page; the last page may
/// be short). Returns the number of pages.
size_t cuffd_res_page_checksums(const void *addr, size_t length, size_t page_size, uint64_t *out);

/// Forks (cuffd_test_clone_with_channels) a peer process whose memory is served from this one. The peer maps `pages` fresh anonymous pages at
/// `address` (MAP_FIXED over its copy of this process's mapping there: its pages start missing, whatever this process
/// has resident at the same address), registers them MISSING on a userfaultfd of its own made with no features (no
/// EVENT_REMOVE: a MADV_DONTNEED there sends no event), and hands the userfaultfd over on *socket_fd (a Unix stream
/// socket; SCM_RIGHTS with a 16-byte payload: the address, then 0). Then it obeys commands (uint32) from *command_fd,
/// each answered with one byte on *socket_fd: a page index reads the byte at offset 7 of that page (which may fault) and
/// answers it; a page index | 0x80000000 zaps that page with MADV_DONTNEED and answers 1; UINT32_MAX exits 0 (any
/// failure exits 10-18). An alarm(30) bounds it. Returns the peer's pid, or -1 with errno.
pid_t cuffd_res_spawn_peer(void *address, size_t pages, int *command_fd, int *socket_fd);

#endif
