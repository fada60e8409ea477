/* Thin system call shims for the sockworker cffi module. No policy lives
 * here: the callers decide flags, paths and ordering. */

#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/sched.h>
#include <sched.h>
#include <signal.h>
#include <string.h>
#include <sys/mount.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "sockworker.h"

int sw_unshare(int flags) { return unshare(flags); }

int sw_setns(int fd, int nstype) { return setns(fd, nstype); }

int sw_mount(const char *source, const char *target, const char *fstype,
             unsigned long flags, const char *data)
{
    return mount(source, target, fstype, flags, data);
}

int sw_umount2(const char *target, int flags)
{
    return umount2(target, flags);
}

int sw_pivot_root(const char *new_root, const char *put_old)
{
    return (int)syscall(SYS_pivot_root, new_root, put_old);
}

/* clone3 without a new stack: like fork, the child returns here with 0.
 * The caller must be single-threaded, because only the calling thread
 * exists in the child and no at-fork handlers run. A cgroup_fd below zero
 * means "stay in the parent's cgroup". */
long sw_clone3(unsigned long long flags, int cgroup_fd, int exit_signal)
{
    struct clone_args args;

    memset(&args, 0, sizeof(args));
    args.flags = flags;
    args.exit_signal = (unsigned long long)exit_signal;
    if (cgroup_fd >= 0) {
        args.flags |= CLONE_INTO_CGROUP;
        args.cgroup = (unsigned long long)cgroup_fd;
    }
    return syscall(SYS_clone3, &args, sizeof(args));
}

/* Probe with invalid arguments: ENOSYS means no clone3 at all, EINVAL
 * means the call exists (the NULL argument is rejected before any work). */
int sw_clone3_supported(void)
{
    long rc = syscall(SYS_clone3, NULL, 0);

    return !(rc < 0 && errno == ENOSYS);
}

/* The new mount API: a superblock configured key by key and turned into
 * a mount that belongs to no namespace until someone attaches it, so the
 * worker can build a root filesystem and hand it to another namespace.
 * All fds are close-on-exec. */
int sw_fsopen(const char *fstype) { return fsopen(fstype, FSOPEN_CLOEXEC); }

int sw_fsconfig_string(int fs_fd, const char *key, const char *value)
{
    return fsconfig(fs_fd, FSCONFIG_SET_STRING, key, value, 0);
}

int sw_fsconfig_create(int fs_fd)
{
    return fsconfig(fs_fd, FSCONFIG_CMD_CREATE, NULL, NULL, 0);
}

int sw_fsmount(int fs_fd, unsigned int attr_flags)
{
    return fsmount(fs_fd, FSMOUNT_CLOEXEC, attr_flags);
}

int sw_move_mount_fd(int mount_fd, const char *target)
{
    return move_mount(mount_fd, "", AT_FDCWD, target,
                      MOVE_MOUNT_F_EMPTY_PATH);
}
