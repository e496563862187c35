// Test-only helpers; see CUserfaultfdTestSupport.h.
#define _GNU_SOURCE
#include "CUserfaultfdTestSupport.h"

#include <errno.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

// MARK: - SIGBUS probe

static __thread sigjmp_buf probe_env;
static __thread volatile sig_atomic_t probe_active;
static __thread volatile int probe_code;
static struct sigaction previous_bus_action;
static pthread_once_t probe_once = PTHREAD_ONCE_INIT;

static void probe_handler(int sig, siginfo_t *info, void *context) {
    if (probe_active) {
        probe_active = 0;
        probe_code = info ? info->si_code : 0;
        siglongjmp(probe_env, sig);
    }
    // Not ours: put the previous handler back and return; the faulting instruction runs again and gets it.
    (void)context;
    sigaction(sig, &previous_bus_action, NULL);
}

static void install_probe_handler(void) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_sigaction = probe_handler;
    // SA_NODEFER: we leave the handler with siglongjmp, so SIGBUS must not stay blocked (sigsetjmp(…, 1) also restores
    // the mask).
    action.sa_flags = SA_SIGINFO | SA_NODEFER;
    sigemptyset(&action.sa_mask);
    sigaction(SIGBUS, &action, &previous_bus_action);
}

int cuffd_test_probe_read(const volatile void *addr, unsigned char *out) {
    pthread_once(&probe_once, install_probe_handler);
    int sig = sigsetjmp(probe_env, 1);
    if (sig != 0) return sig;
    probe_code = 0;
    probe_active = 1;
    unsigned char value = *(const volatile unsigned char *)addr;
    probe_active = 0;
    *out = value;
    return 0;
}

int cuffd_test_last_probe_code(void) { return probe_code; }

int cuffd_test_bus_adrerr(void) { return BUS_ADRERR; }

// MARK: - Accesses

unsigned char cuffd_test_read_byte(const volatile void *addr) { return *(const volatile unsigned char *)addr; }

void cuffd_test_write_byte(volatile void *addr, unsigned char value) { *(volatile unsigned char *)addr = value; }

// Not instrumented by ThreadSanitizer: TSan records a store before it executes, so a store that is blocked in the
// kernel on a write-protect fault looks done to it, and a test checking that the write has NOT landed yet would be
// reported as racing with it.
__attribute__((no_sanitize("thread")))
unsigned char cuffd_test_peek_byte(const volatile void *addr) { return *(const volatile unsigned char *)addr; }

int cuffd_test_gettid(void) { return (int)syscall(SYS_gettid); }

// MARK: - Fork

void cuffd_test_unblock_alarm(void) {
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGALRM);
    sigprocmask(SIG_UNBLOCK, &set, NULL);
    signal(SIGALRM, SIG_DFL);
}

pid_t cuffd_test_fork_toucher(const volatile void *addr, unsigned char expected, unsigned int alarm_seconds) {
    // A raw clone: glibc's fork() takes the malloc arena locks around the system call, and with EVENT_FORK the system
    // call sleeps until the event is read by a thread that allocates. The child runs only async-signal-safe code.
    long pid = syscall(SYS_clone, (unsigned long)SIGCHLD, 0UL, 0UL, 0UL, 0UL);
    if (pid == 0) {
        // Drop every inherited descriptor but stdio: the child must not keep the test process's other userfaultfds
        // alive (closing the last descriptor is what wakes their blocked threads). Its own faults go to the child
        // userfaultfd, which the parent holds.
        syscall(SYS_close_range, 3U, ~0U, 0U);
        // The forking thread's signal mask is inherited, and runtime threads block most signals (SIGALRM among
        // them): unblock SIGALRM so that the alarm really ends a child stuck on a fault nobody serves.
        cuffd_test_unblock_alarm();
        alarm(alarm_seconds);
        unsigned char value = *(const volatile unsigned char *)addr;
        _exit(value == expected ? 0 : 3);
    }
    return (pid_t)pid;
}

__attribute__((no_sanitize("thread")))
pid_t cuffd_test_fork_exiting(void) {
    long pid = syscall(SYS_clone, (unsigned long)SIGCHLD, 0UL, 0UL, 0UL, 0UL);
    if (pid == 0) {
        syscall(SYS_exit_group, 0);
    }
    return (pid_t)pid;
}

pid_t cuffd_test_waitpid(pid_t pid, int *status, int nohang) {
    pid_t result;
    do {
        result = waitpid(pid, status, nohang ? WNOHANG : 0);
    } while (result < 0 && errno == EINTR);
    return result;
}

int cuffd_test_decode_status(int status) {
    if (WIFEXITED(status)) return WEXITSTATUS(status);
    if (WIFSIGNALED(status)) return -WTERMSIG(status);
    return -1000;
}

// MARK: - Memory

void *cuffd_test_mremap_fixed(void *old_address, size_t length, void *new_address) {
    return mremap(old_address, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, new_address);
}

int cuffd_test_memfd(const char *name, size_t size) {
    int fd = memfd_create(name, MFD_CLOEXEC);
    if (fd < 0) return -1;
    if (ftruncate(fd, (off_t)size) != 0) {
        int saved = errno;
        close(fd);
        errno = saved;
        return -1;
    }
    return fd;
}

// MARK: - Descriptors of other kinds

int cuffd_test_epoll_create(void) { return epoll_create1(EPOLL_CLOEXEC); }
int cuffd_test_eventfd(void) { return eventfd(0, EFD_CLOEXEC); }
