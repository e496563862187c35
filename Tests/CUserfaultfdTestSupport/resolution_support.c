// Test-only helpers for the resolution tests; see resolution_support.h.
#include "resolution_support.h"


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
