// CUserfaultfdTestSupport: test-only C helpers for the things Swift cannot do safely or at all.
//
// - A SIGBUS probe: a read that turns the SIGBUS of a poisoned page into a return value (sigsetjmp/siglongjmp with a
//   thread-local jump buffer), so a test can assert the signal without dying.
// - A forked child that touches registered memory: fork() must not take glibc's malloc locks here (the forking thread
//   sleeps in the kernel until the FORK event is read, and the reader allocates), and the child may only run
//   async-signal-safe code, so both live in C.
// - Wrappers for variadic or macro-only APIs (mremap, wait status macros) and volatile single-byte accesses that the
//   optimizer may not remove or merge.

#ifndef CUSERFAULTFD_TEST_SUPPORT_H
#define CUSERFAULTFD_TEST_SUPPORT_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

/// Reads one byte at `addr`. If the read raises SIGBUS, returns SIGBUS (and leaves *out untouched); otherwise stores the
/// byte in *out and returns 0. Safe to call from any thread, concurrently. Other SIGBUS signals are passed on to the
/// handler that was installed before.
int cuffd_test_probe_read(const volatile void *addr, unsigned char *out);

/// The si_code of the last SIGBUS caught by cuffd_test_probe_read on the calling thread (0 if none).
int cuffd_test_last_probe_code(void);

/// The kernel's BUS_ADRERR, for comparing with cuffd_test_last_probe_code().
int cuffd_test_bus_adrerr(void);

/// Anonymous-inode descriptors that are not userfaultfds, for the /proc-less userfaultfd check: an epoll instance
/// (its ioctls answer EINVAL, like a userfaultfd's to a bad argument) and an eventfd. -1 with errno on failure.
int cuffd_test_epoll_create(void);
int cuffd_test_eventfd(void);

/// A volatile one-byte read (blocks in the kernel while the page is missing in a registered range).
unsigned char cuffd_test_read_byte(const volatile void *addr);

/// A volatile one-byte write.
void cuffd_test_write_byte(volatile void *addr, unsigned char value);

/// Reads one byte without ThreadSanitizer instrumentation: for memory a blocked writer (a write-protect fault) may be
/// about to store to, where the test checks that the store has not landed.
unsigned char cuffd_test_peek_byte(const volatile void *addr);

/// gettid(2) of the calling thread.
int cuffd_test_gettid(void);

/// Forks the process with a raw clone(SIGCHLD) (no atfork handlers, no malloc locks). The child closes every descriptor
/// above stderr (so it keeps no other userfaultfd of the test process alive), arms alarm(alarm_seconds)
/// as a last-resort bound, reads the byte at `addr` (which may fault into the child's userfaultfd) and _exit()s with 0 when
/// it equals `expected`, 3 otherwise. Returns the child's pid in the parent, or -1 with errno set.
///
/// With UFFD_FEATURE_EVENT_FORK, this call does not return until the FORK event has been read: call it from a thread
/// that nothing the reader needs depends on.
pid_t cuffd_test_fork_toucher(const volatile void *addr, unsigned char expected, unsigned int alarm_seconds);

/// Forks with a raw clone(SIGCHLD) whose child exits at once with status 0, running nothing but the exit system call
/// (no sanitizer runtime, no interceptor: safe under ThreadSanitizer, whatever the other threads held). Returns the
/// child's pid, or -1 with errno set. With UFFD_FEATURE_EVENT_FORK it returns once the FORK event has been read.
pid_t cuffd_test_fork_exiting(void);

/// In a forked child: unblocks SIGALRM and restores its default action, so that alarm() ends the child (the mask is
/// inherited from the forking thread, which may block it). Async-signal-safe.
void cuffd_test_unblock_alarm(void);

/// waitpid(pid, &status, nohang ? WNOHANG : 0). Returns waitpid's result; *status receives the raw status.
pid_t cuffd_test_waitpid(pid_t pid, int *status, int nohang);

/// The exit code for a status from waitpid when the child exited normally, or -(signal number) when a signal killed it.
int cuffd_test_decode_status(int status);

/// mremap(old, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, new_address). Returns the new address or MAP_FAILED.
void *cuffd_test_mremap_fixed(void *old_address, size_t length, void *new_address);

/// memfd_create(name, MFD_CLOEXEC) then ftruncate(size). Returns the descriptor or -1 with errno set.
int cuffd_test_memfd(const char *name, size_t size);

#include "resolution_support.h"
#include "tracking_support.h"
#include "stress_support.h"

#endif
