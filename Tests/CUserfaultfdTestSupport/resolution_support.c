// Test-only helpers for the resolution tests; see resolution_support.h.
#define _GNU_SOURCE
#include "CUserfaultfdTestSupport.h"

#include <fcntl.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>


uint64_t cuffd_res_checksum(const volatile void *addr, size_t length) {
    const volatile unsigned char *bytes = (const volatile unsigned char *)addr;
    uint64_t hash = 0xcbf29ce484222325ULL;
    size_t index = 0;
    for (; index + 8 <= length; index += 8) {
        uint64_t word;
        // A volatile 8-byte load (the address is 8-byte aligned when `addr` is, which page starts are).
        word = *(const volatile uint64_t *)(bytes + index);
        hash ^= word;
        hash *= 0x100000001b3ULL;
    }
    for (; index < length; index++) {
        hash ^= bytes[index];
        hash *= 0x100000001b3ULL;
    }
    return hash;
}

size_t cuffd_res_page_checksums(const void *addr, size_t length, size_t page_size, uint64_t *out) {
    size_t pages = (length + page_size - 1) / page_size;
    const unsigned char *bytes = (const unsigned char *)addr;
    for (size_t page = 0; page < pages; page++) {
        size_t start = page * page_size;
        size_t count = length - start < page_size ? length - start : page_size;
        out[page] = cuffd_res_checksum(bytes + start, count);
    }
    return pages;
}

pid_t cuffd_res_spawn_peer(void *address, size_t pages, int *command_fd, int *socket_fd) {
    pid_t pid = cuffd_test_clone_with_channels(command_fd, socket_fd);
    if (pid == 0) {
        size_t page_size = (size_t)sysconf(_SC_PAGESIZE);
        size_t length = pages * page_size;
        unsigned char *memory = mmap(address, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0);
        if (memory == MAP_FAILED) _exit(10);
        int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (uffd < 0) _exit(11);
        uint64_t api[3] = { 0xAA, 0, 0 };
        if (ioctl(uffd, 0xC018AA3F, api) != 0) _exit(12);
        uint64_t reg[4] = { (uint64_t)(uintptr_t)memory, length, 1 /* MISSING */, 0 };
        if (ioctl(uffd, 0xC020AA00, reg) != 0) _exit(13);
        uint64_t hello[2] = { (uint64_t)(uintptr_t)memory, 0 };
        if (cuffd_test_send_descriptor(4, hello, sizeof hello, uffd) != 0) _exit(14);
        for (;;) {
            uint32_t command;
            if (read(3, &command, sizeof command) != (ssize_t)sizeof command) _exit(15);
            if (command == UINT32_MAX) _exit(0);
            size_t page = command & 0x7fffffffU;
            if (page >= pages) _exit(16);
            unsigned char answer = 1;
            if (command & 0x80000000U) {
                if (madvise(memory + page * page_size, page_size, MADV_DONTNEED) != 0) _exit(17);
            } else {
                answer = ((volatile unsigned char *)memory)[page * page_size + 7];  // may fault: served by the test
            }
            if (write(4, &answer, 1) != 1) _exit(18);
        }
    }
    return pid;
}
