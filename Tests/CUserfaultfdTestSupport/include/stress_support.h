// Test-only C helpers for the reliability suite (Tests/UserfaultfdTests/Reliability): page contents derived from a seed,
// and the per-page locks of the stress test's model. In C because the suite runs as a debug build, where a Swift loop
// over every word of a page would dominate the run.

#ifndef CUSERFAULTFD_STRESS_SUPPORT_H
#define CUSERFAULTFD_STRESS_SUPPORT_H

#include <stddef.h>
#include <stdint.h>

/// Fills `length` bytes at `addr` (8-byte aligned, a multiple of 8) with the SplitMix64 stream of `seed`, with plain
/// stores. Used for the provider's pages and the writers' pages alike.
void cuffd_stress_fill(void *addr, size_t length, uint64_t seed);

/// The checksum (`cuffd_res_checksum`) of `length` bytes as `cuffd_stress_fill` would write them with `seed`,
/// computed without any memory of the caller's.
uint64_t cuffd_stress_expected_checksum(size_t length, uint64_t seed);

/// `count` pthread mutexes, initialised; NULL on failure.
void *cuffd_stress_locks_create(size_t count);
void cuffd_stress_lock(void *locks, size_t index);
void cuffd_stress_unlock(void *locks, size_t index);
void cuffd_stress_locks_destroy(void *locks, size_t count);

/// Reads the /proc/self/pagemap entries of `pages` pages from `address` into `out` (one 64-bit entry per page:
/// bit 63 present, bit 57 uffd-wp write-protected). Returns 0, or -errno.
int cuffd_stress_pagemap(uintptr_t address, size_t pages, size_t page_size, uint64_t *out);

#endif
