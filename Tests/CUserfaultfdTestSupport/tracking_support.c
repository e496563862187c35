// Test-only helpers for the dirty-tracking tests (Tests/UserfaultfdTests/Tracking): a child process whose memory is
// tracked from the test process through the child's own userfaultfd.
#define _GNU_SOURCE
#include "CUserfaultfdTestSupport.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

struct tracked_child_hello {
    uint64_t address;
    int32_t uffd;
    int32_t status;
};

static void child_fail(int reply, int status) {
    struct tracked_child_hello hello = { 0, -1, status };
    (void)!write(reply, &hello, sizeof hello);
    _exit(status);
}

int cuffd_test_send_descriptor(int socket, const void *payload, size_t length, int descriptor) {
    union {
        char bytes[CMSG_SPACE(sizeof(int))];
        struct cmsghdr align;
    } control;
    memset(&control, 0, sizeof control);
    struct iovec iov = { .iov_base = (void *)payload, .iov_len = length };
    struct msghdr message = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control.bytes,
                              .msg_controllen = sizeof control.bytes };
    struct cmsghdr *header = CMSG_FIRSTHDR(&message);
    header->cmsg_level = SOL_SOCKET;
    header->cmsg_type = SCM_RIGHTS;
    header->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(header), &descriptor, sizeof(int));
    return sendmsg(socket, &message, 0) == (ssize_t)length ? 0 : -1;
}

pid_t cuffd_test_clone_with_channels(int *command_fd, int *reply_fd) {
    int commands[2], replies[2];
    if (pipe2(commands, O_CLOEXEC) != 0) return -1;
    if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, replies) != 0) {
        close(commands[0]);
        close(commands[1]);
        return -1;
    }
    // A raw clone, as for cuffd_test_fork_toucher: the child runs only system calls.
    long pid = syscall(SYS_clone, (unsigned long)SIGCHLD, 0UL, 0UL, 0UL, 0UL);
    if (pid == 0) {
        // Keep only stdio and the two channel ends (as 3 and 4): no other userfaultfd of the test process stays
        // alive here.
        dup2(commands[0], 3);
        dup2(replies[1], 4);
        syscall(SYS_close_range, 5U, ~0U, 0U);
        // The forking thread's signal mask is inherited, and runtime threads block most signals (SIGALRM among
        // them): unblock SIGALRM so that the alarm really ends a child stuck on a fault nobody serves.
        cuffd_test_unblock_alarm();
        alarm(30);
        return 0;
    }
    int saved = errno;
    close(commands[0]);
    close(replies[1]);
    if (pid < 0) {
        close(commands[1]);
        close(replies[0]);
        errno = saved;
        return -1;
    }
    *command_fd = commands[1];
    *reply_fd = replies[0];
    return (pid_t)pid;
}

pid_t cuffd_test_spawn_tracked_child(size_t pages, uint64_t features, int hand_over, int *command_fd, int *reply_fd) {
    pid_t pid = cuffd_test_clone_with_channels(command_fd, reply_fd);
    if (pid == 0) {
        size_t page_size = (size_t)sysconf(_SC_PAGESIZE);
        size_t length = pages * page_size;
        void *memory = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (memory == MAP_FAILED) child_fail(4, 10);
        int uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
        if (uffd < 0) child_fail(4, 11);
        uint64_t api[3] = { 0xAA, features, 0 };
        if (ioctl(uffd, 0xC018AA3F, api) != 0) child_fail(4, 12);
        uint64_t reg[4] = { (uint64_t)(uintptr_t)memory, length, 2 /* WP */, 0 };
        if (ioctl(uffd, 0xC020AA00, reg) != 0) child_fail(4, 13);
        struct tracked_child_hello hello = { (uint64_t)(uintptr_t)memory, uffd, 0 };
        if (hand_over) {
            if (cuffd_test_send_descriptor(4, &hello, sizeof hello, uffd) != 0) _exit(14);
        } else if (write(4, &hello, sizeof hello) != (ssize_t)sizeof hello) {
            _exit(14);
        }
        for (;;) {
            uint32_t page;
            ssize_t got = read(3, &page, sizeof page);
            if (got != (ssize_t)sizeof page) _exit(15);
            if (page == UINT32_MAX) _exit(0);
            if (page >= pages) _exit(16);
            // The write may raise a write-protect fault that the test process resolves.
            ((volatile unsigned char *)memory)[page * page_size + 7] = (unsigned char)(page + 1);
            unsigned char ack = 1;
            if (write(4, &ack, 1) != 1) _exit(17);
        }
    }
    return pid;
}

int cuffd_test_read_child_hello(int reply_fd, uint64_t *address, int *uffd) {
    struct tracked_child_hello hello;
    if (read(reply_fd, &hello, sizeof hello) != (ssize_t)sizeof hello) return -1;
    *address = hello.address;
    *uffd = hello.uffd;
    return hello.status;
}

int cuffd_test_pidfd_getfd(pid_t pid, int fd) {
    int pidfd = (int)syscall(434 /* pidfd_open */, pid, 0);
    if (pidfd < 0) return -1;
    int copy = (int)syscall(438 /* pidfd_getfd */, pidfd, fd, 0);
    int saved = errno;
    close(pidfd);
    errno = saved;
    return copy;
}
