// Test-only helpers for the reliability suite; see stress_support.h.
#define _GNU_SOURCE
#include "stress_support.h"
#include "resolution_support.h"

#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <unistd.h>

static inline uint64_t splitmix_next(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ULL);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

void cuffd_stress_fill(void *addr, size_t length, uint64_t seed) {
    uint64_t *words = (uint64_t *)addr;
    uint64_t state = seed;
    for (size_t index = 0; index < length / 8; index++) words[index] = splitmix_next(&state);
}

uint64_t cuffd_stress_expected_checksum(size_t length, uint64_t seed) {
    // Same arithmetic as cuffd_res_checksum over the words cuffd_stress_fill writes.
    uint64_t hash = 0xcbf29ce484222325ULL;
    uint64_t state = seed;
    for (size_t index = 0; index < length / 8; index++) {
        hash ^= splitmix_next(&state);
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

void *cuffd_stress_locks_create(size_t count) {
    pthread_mutex_t *locks = calloc(count, sizeof(pthread_mutex_t));
    if (!locks) return NULL;
    for (size_t index = 0; index < count; index++) pthread_mutex_init(&locks[index], NULL);
    return locks;
}

void cuffd_stress_lock(void *locks, size_t index) { pthread_mutex_lock(&((pthread_mutex_t *)locks)[index]); }

void cuffd_stress_unlock(void *locks, size_t index) { pthread_mutex_unlock(&((pthread_mutex_t *)locks)[index]); }

void cuffd_stress_locks_destroy(void *locks, size_t count) {
    for (size_t index = 0; index < count; index++) pthread_mutex_destroy(&((pthread_mutex_t *)locks)[index]);
    free(locks);
}

int cuffd_stress_pagemap(uintptr_t address, size_t pages, size_t page_size, uint64_t *out) {
    int fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC);
    if (fd < 0) return -errno;
    size_t wanted = pages * sizeof(uint64_t), done = 0;
    off_t offset = (off_t)(address / page_size * sizeof(uint64_t));
    while (done < wanted) {
        ssize_t got = pread(fd, (char *)out + done, wanted - done, offset + (off_t)done);
        if (got < 0 && errno == EINTR) continue;
        if (got <= 0) {
            int error = got < 0 ? errno : EIO;
            close(fd);
            return -error;
        }
        done += (size_t)got;
    }
    close(fd);
    return 0;
}
