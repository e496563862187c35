// Test-only C helpers for the resolution tests (Tests/UserfaultfdTests/Resolution).

#ifndef CUSERFAULTFD_RESOLUTION_SUPPORT_H
#define CUSERFAULTFD_RESOLUTION_SUPPORT_H

#include <stddef.h>
#include <stdint.h>

/// FNV-1a over `length` bytes at `addr`, read with volatile loads (so every byte is really touched, faulting its page
/// in when it is missing). Eight bytes per step, then the tail byte by byte.
uint64_t cuffd_res_checksum(const volatile void *addr, size_t length);

/// Fills `out[i]` with the checksum of page `i` of `length` bytes at `addr` (`page_size` bytes per page; the last page may
/// be short). Returns the number of pages.
size_t cuffd_res_page_checksums(const void *addr, size_t length, size_t page_size, uint64_t *out);

#endif
