// The C reference for swift-userfaultfd's benchmarks: userfaultfd(2)'s example handler, measured.
//
// A region of anonymous memory is registered for MISSING faults; a pthread handler loops
// poll → read(up to 64 uffd_msg) → UFFDIO_COPY, and the calling thread touches the region. Everything a Swift
// library adds (executors, actors, providers, bookkeeping) is measured against this.

#ifndef CUSERFAULTFD_BASELINE_H
#define CUSERFAULTFD_BASELINE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/// What the touching thread does with the region.
typedef enum {
    /// Read one byte per page, in order (one fault per page; the cost is the fault round trip).
    CBASELINE_TOUCH_ONE_BYTE_PER_PAGE = 0,
    /// Read every byte, in order, 8 bytes at a time (the fault round trip plus reading the data).
    CBASELINE_READ_EVERY_BYTE = 1,
} cbaseline_workload;

/// What one run measured.
typedef struct {
    /// Wall-clock nanoseconds of the touching loop (from the first touch to the last byte read).
    double nanoseconds;
    /// nanoseconds / pages.
    double ns_per_page;
    /// Page-fault messages the handler read.
    uint64_t faults;
    /// UFFDIO_COPY calls that installed pages.
    uint64_t copies;
    /// Messages for pages already installed (EEXIST, then UFFDIO_WAKE).
    uint64_t already_present;
    /// Sum of the bytes read (so the reads can't be optimized away; also a check of the content).
    uint64_t checksum;
    /// 0, or the errno of the step that failed.
    int error;
    /// The step that failed ("mmap", "userfaultfd", "UFFDIO_API", "UFFDIO_REGISTER", "pthread_create", "UFFDIO_COPY"...).
    const char *failed_step;
} cbaseline_result;

/// Maps `pages` pages, registers them MISSING with a new userfaultfd, starts the poll/read/COPY handler thread, touches
/// the region from the calling thread with `workload`, and tears everything down.
///
/// Each fault is resolved with one UFFDIO_COPY of the `pages_per_copy` pages (1, 16, 64...) of the aligned cluster that
/// holds the faulting page, from a source buffer prepared in memory (every byte `fill`). Returns ns per page (negative
/// on failure; `out`, if not NULL, gets the details).
double cbaseline_touch_pages(size_t pages, size_t pages_per_copy, cbaseline_workload workload, uint8_t fill,
                             cbaseline_result *out);

/// No userfaultfd: maps `pages` pages of private anonymous memory and touches one byte per page (a write when `write` is
/// non-zero: page allocation and zeroing, the floor of any copy-based handler; a read maps the shared zero page).
/// Returns ns per page, negative on failure.
double cbaseline_anonymous_first_touch(size_t pages, int write, cbaseline_result *out);

/// The touching loop the baseline measures, for any memory (so the Swift benchmarks touch their regions the same way):
/// reads one byte per page, or every byte (as 64-bit words), in order. Returns the sum of what it read.
uint64_t cbaseline_touch_region(const void *start, size_t length, cbaseline_workload workload);

/// The kernel's page size.
size_t cbaseline_page_size(void);

#ifdef __cplusplus
}
#endif

#endif
