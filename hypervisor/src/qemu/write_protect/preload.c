/*
 * Loaded into QEMU with LD_PRELOAD by remus-wan (see mod.rs): creates a
 * userfaultfd for QEMU's own address space and leaves it at the fd number
 * named by REMUS_WAN_UFFD_FD, where remus-wan takes a copy with
 * pidfd_getfd(2). A userfaultfd always belongs to the address space of the
 * process that created it, so this one line has to run inside QEMU; all
 * the rest (registering guest RAM, write-protecting it, scanning it) is
 * done by remus-wan through the fd.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

__attribute__((constructor)) static void remus_wan_userfaultfd(void)
{
    const char *want = getenv("REMUS_WAN_UFFD_FD");
    int target = want ? atoi(want) : -1;
    if (target < 3)
        return;
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        /* QEMU's log: remus-wan finds no fd and points there. */
        fprintf(stderr, "remus-wan: userfaultfd(2) failed: %s\n", strerror(errno));
    } else if (fd != target) {
        if (dup3(fd, target, O_CLOEXEC) < 0)
            fprintf(stderr, "remus-wan: dup3 of the userfaultfd failed: %s\n", strerror(errno));
        close(fd);
    }
    /* Nothing QEMU starts inherits the preload. */
    unsetenv("REMUS_WAN_UFFD_FD");
    unsetenv("LD_PRELOAD");
}
