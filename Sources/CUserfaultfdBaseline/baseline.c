// The userfaultfd(2) man-page handler, instrumented: see include/CUserfaultfdBaseline.h.
//
// The kernel interface is declared here rather than taken from <linux/userfaultfd.h> (older than the kernels this runs
// on, and the baseline only needs the API handshake, REGISTER, COPY and WAKE). Layouts and numbers follow
// include/uapi/linux/userfaultfd.h.

#define _GNU_SOURCE
#include "CUserfaultfdBaseline.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

// MARK: - The kernel interface

#define CBL_UFFD_API 0xAAu
#define CBL_UFFD_USER_MODE_ONLY 1
#define CBL_EVENT_PAGEFAULT 0x12
#define CBL_REGISTER_MODE_MISSING 1ull

struct cbl_uffdio_api {
    uint64_t api;
    uint64_t features;
    uint64_t ioctls;
};

struct cbl_uffdio_range {
    uint64_t start;
    uint64_t len;
};

struct cbl_uffdio_register {
    struct cbl_uffdio_range range;
    uint64_t mode;
    uint64_t ioctls;
};

struct cbl_uffdio_copy {
    uint64_t dst;
    uint64_t src;
    uint64_t len;
    uint64_t mode;
    int64_t copy;  // bytes copied, or -errno
};

// The 32-byte message read(2) returns; only the page-fault arm is used here.
struct cbl_uffd_msg {
    uint8_t event;
    uint8_t reserved1;
    uint16_t reserved2;
    uint32_t reserved3;
    union {
        struct {
            uint64_t flags;
            uint64_t address;
            uint32_t ptid;
        } __attribute__((packed)) pagefault;
        uint64_t raw[3];
    } arg;
} __attribute__((packed));

_Static_assert(sizeof(struct cbl_uffdio_api) == 24, "uffdio_api");
_Static_assert(sizeof(struct cbl_uffdio_register) == 32, "uffdio_register");
_Static_assert(sizeof(struct cbl_uffdio_copy) == 40, "uffdio_copy");
_Static_assert(sizeof(struct cbl_uffd_msg) == 32, "uffd_msg");

#define CBL_UFFDIO_API _IOWR(0xAA, 0x3F, struct cbl_uffdio_api)
#define CBL_UFFDIO_REGISTER _IOWR(0xAA, 0x00, struct cbl_uffdio_register)
#define CBL_UFFDIO_WAKE _IOR(0xAA, 0x02, struct cbl_uffdio_range)
#define CBL_UFFDIO_COPY _IOWR(0xAA, 0x03, struct cbl_uffdio_copy)

_Static_assert(CBL_UFFDIO_API == 0xC018AA3Fu, "UFFDIO_API number");
_Static_assert(CBL_UFFDIO_REGISTER == 0xC020AA00u, "UFFDIO_REGISTER number");
_Static_assert(CBL_UFFDIO_WAKE == 0x8010AA02u, "UFFDIO_WAKE number");
_Static_assert(CBL_UFFDIO_COPY == 0xC028AA03u, "UFFDIO_COPY number");

#define CBL_BATCH 64

// MARK: - Helpers

static uint64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000ull + (uint64_t)t.tv_nsec;
}

size_t cbaseline_page_size(void) {
    return (size_t)sysconf(_SC_PAGESIZE);
}

static double fail(cbaseline_result *out, const char *step, int error) {
    if (out) {
        out->error = error ? error : EIO;
        out->failed_step = step;
    }
    return -1;
}

static int open_userfaultfd(void) {
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | CBL_UFFD_USER_MODE_ONLY);
    if (fd < 0 && errno == EINVAL) {
        // Kernels before 5.11 don't know UFFD_USER_MODE_ONLY.
        fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    }
    return fd;
}

// MARK: - The handler thread

struct handler {
    int uffd;
    int stop_fd;  // eventfd: readable when the handler must return
    uint8_t *region;
    size_t region_length;
    size_t page_size;
    size_t cluster_length;  // pages_per_copy × page size
    const uint8_t *source;  // cluster_length bytes
    uint8_t *copied;        // one flag per cluster, touched only by the handler
    uint64_t faults;
    uint64_t copies;
    uint64_t already_present;
    int error;
    const char *failed_step;
};

// Installs the aligned cluster holding `address`, or wakes the thread if it is already there.
static int resolve(struct handler *h, uint64_t address) {
    uint64_t base = (uint64_t)(uintptr_t)h->region;
    size_t offset = (size_t)(address - base);
    size_t cluster = offset / h->cluster_length;
    size_t start = cluster * h->cluster_length;
    size_t length = h->cluster_length;
    if (start + length > h->region_length) length = h->region_length - start;

    if (h->copied[cluster]) {
        // A second message for a cluster already installed (another thread, or a re-fault after a signal).
        struct cbl_uffdio_range wake = {.start = base + start, .len = length};
        h->already_present++;
        if (ioctl(h->uffd, CBL_UFFDIO_WAKE, &wake) != 0) return errno;
        return 0;
    }
    struct cbl_uffdio_copy copy = {.dst = base + start, .src = (uint64_t)(uintptr_t)h->source, .len = length, .mode = 0};
    if (ioctl(h->uffd, CBL_UFFDIO_COPY, &copy) != 0) {
        if (errno != EEXIST) return errno;
        // Partly present: wake whatever waits in the cluster.
        struct cbl_uffdio_range wake = {.start = base + start, .len = length};
        h->already_present++;
        if (ioctl(h->uffd, CBL_UFFDIO_WAKE, &wake) != 0) return errno;
    } else {
        h->copies++;
    }
    h->copied[cluster] = 1;
    return 0;
}

static void *handler_main(void *argument) {
    struct handler *h = argument;
    struct cbl_uffd_msg messages[CBL_BATCH];
    struct pollfd fds[2] = {
        {.fd = h->uffd, .events = POLLIN},
        {.fd = h->stop_fd, .events = POLLIN},
    };
    for (;;) {
        int ready = poll(fds, 2, -1);
        if (ready < 0) {
            if (errno == EINTR) continue;
            h->error = errno;
            h->failed_step = "poll";
            return NULL;
        }
        if (fds[1].revents) return NULL;
        if (!(fds[0].revents & POLLIN)) continue;
        ssize_t count = read(h->uffd, messages, sizeof messages);
        if (count < 0) {
            if (errno == EAGAIN || errno == EINTR) continue;
            h->error = errno;
            h->failed_step = "read";
            return NULL;
        }
        size_t n = (size_t)count / sizeof messages[0];
        for (size_t i = 0; i < n; i++) {
            if (messages[i].event != CBL_EVENT_PAGEFAULT) continue;
            h->faults++;
            int error = resolve(h, messages[i].arg.pagefault.address);
            if (error) {
                h->error = error;
                h->failed_step = "UFFDIO_COPY";
                return NULL;
            }
        }
    }
}

// MARK: - Touching

static uint64_t touch(const uint8_t *region, size_t length, size_t page_size, cbaseline_workload workload) {
    uint64_t sum = 0;
    if (workload == CBASELINE_READ_EVERY_BYTE) {
        const volatile uint64_t *words = (const volatile uint64_t *)region;
        size_t count = length / sizeof(uint64_t);
        for (size_t i = 0; i < count; i++) sum += words[i];
    } else {
        const volatile uint8_t *bytes = region;
        for (size_t offset = 0; offset < length; offset += page_size) sum += bytes[offset];
    }
    return sum;
}

uint64_t cbaseline_touch_region(const void *start, size_t length, cbaseline_workload workload) {
    return touch(start, length, cbaseline_page_size(), workload);
}

double cbaseline_touch_pages(size_t pages, size_t pages_per_copy, cbaseline_workload workload, uint8_t fill,
                             cbaseline_result *out) {
    if (out) memset(out, 0, sizeof *out);
    if (pages == 0 || pages_per_copy == 0) return fail(out, "arguments", EINVAL);
    size_t page_size = cbaseline_page_size();
    size_t length = pages * page_size;
    size_t clusters = (pages + pages_per_copy - 1) / pages_per_copy;

    struct handler h = {.page_size = page_size, .cluster_length = pages_per_copy * page_size, .region_length = length};
    double result = -1;
    pthread_t thread;
    int started = 0;

    void *region = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    void *source = mmap(NULL, h.cluster_length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    h.copied = calloc(clusters, 1);
    h.uffd = -1;
    h.stop_fd = -1;
    if (region == MAP_FAILED || source == MAP_FAILED || !h.copied) {
        fail(out, "mmap", errno);
        goto done;
    }
    memset(source, fill, h.cluster_length);
    h.region = region;
    h.source = source;

    h.uffd = open_userfaultfd();
    if (h.uffd < 0) {
        fail(out, "userfaultfd", errno);
        goto done;
    }
    struct cbl_uffdio_api api = {.api = CBL_UFFD_API, .features = 0};
    if (ioctl(h.uffd, CBL_UFFDIO_API, &api) != 0) {
        fail(out, "UFFDIO_API", errno);
        goto done;
    }
    struct cbl_uffdio_register registration = {
        .range = {.start = (uint64_t)(uintptr_t)region, .len = length},
        .mode = CBL_REGISTER_MODE_MISSING,
    };
    if (ioctl(h.uffd, CBL_UFFDIO_REGISTER, &registration) != 0) {
        fail(out, "UFFDIO_REGISTER", errno);
        goto done;
    }
    h.stop_fd = eventfd(0, EFD_CLOEXEC);
    if (h.stop_fd < 0) {
        fail(out, "eventfd", errno);
        goto done;
    }
    int error = pthread_create(&thread, NULL, handler_main, &h);
    if (error) {
        fail(out, "pthread_create", error);
        goto done;
    }
    started = 1;

    uint64_t begin = now_ns();
    uint64_t sum = touch(region, length, page_size, workload);
    uint64_t elapsed = now_ns() - begin;

    uint64_t one = 1;
    if (write(h.stop_fd, &one, sizeof one) != sizeof one) { /* the join below would hang; fall through to report */ }
    pthread_join(thread, NULL);
    started = 0;
    if (h.error) {
        fail(out, h.failed_step, h.error);
        goto done;
    }
    result = (double)elapsed / (double)pages;
    if (out) {
        out->nanoseconds = (double)elapsed;
        out->ns_per_page = result;
        out->faults = h.faults;
        out->copies = h.copies;
        out->already_present = h.already_present;
        out->checksum = sum;
    }

done:
    if (started) {
        uint64_t one = 1;
        (void)!write(h.stop_fd, &one, sizeof one);
        pthread_join(thread, NULL);
    }
    if (h.uffd >= 0) close(h.uffd);  // unregisters the region
    if (h.stop_fd >= 0) close(h.stop_fd);
    if (region != MAP_FAILED) munmap(region, length);
    if (source != MAP_FAILED) munmap(source, h.cluster_length);
    free(h.copied);
    return result;
}

double cbaseline_anonymous_first_touch(size_t pages, int write_touch, cbaseline_result *out) {
    if (out) memset(out, 0, sizeof *out);
    if (pages == 0) return fail(out, "arguments", EINVAL);
    size_t page_size = cbaseline_page_size();
    size_t length = pages * page_size;
    uint8_t *region = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (region == MAP_FAILED) return fail(out, "mmap", errno);
    uint64_t sum = 0;
    uint64_t begin = now_ns();
    if (write_touch) {
        volatile uint8_t *bytes = region;
        for (size_t offset = 0; offset < length; offset += page_size) bytes[offset] = 1;
        sum = pages;
    } else {
        sum = touch(region, length, page_size, CBASELINE_TOUCH_ONE_BYTE_PER_PAGE);
    }
    uint64_t elapsed = now_ns() - begin;
    munmap(region, length);
    double result = (double)elapsed / (double)pages;
    if (out) {
        out->nanoseconds = (double)elapsed;
        out->ns_per_page = result;
        out->checksum = sum;
    }
    return result;
}
