"""Python wrappers over the cffi module built from native/.

Each wrapper turns a failed call into OSError(errno, strerror, path), so a
caller's message names the resource; the caller adds the operation.
"""

import os

from sockworker._native import ffi, lib

CLONE_NEWNS = lib.CLONE_NEWNS
CLONE_NEWPID = lib.CLONE_NEWPID
CLONE_NEWIPC = lib.CLONE_NEWIPC
CLONE_NEWUTS = lib.CLONE_NEWUTS
CLONE_NEWNET = lib.CLONE_NEWNET
CLONE_NEWCGROUP = lib.CLONE_NEWCGROUP
CLONE_PARENT = lib.CLONE_PARENT

MS_RDONLY = lib.MS_RDONLY
MS_NOSUID = lib.MS_NOSUID
MS_NODEV = lib.MS_NODEV
MS_NOEXEC = lib.MS_NOEXEC
MS_BIND = lib.MS_BIND
MS_REC = lib.MS_REC
MS_PRIVATE = lib.MS_PRIVATE
MS_SLAVE = lib.MS_SLAVE
MS_REMOUNT = lib.MS_REMOUNT
MNT_DETACH = lib.MNT_DETACH
MOUNT_ATTR_NOSUID = lib.MOUNT_ATTR_NOSUID
MOUNT_ATTR_NODEV = lib.MOUNT_ATTR_NODEV
MOUNT_ATTR_NOEXEC = lib.MOUNT_ATTR_NOEXEC


def _raise_errno(path=None):
    err = ffi.errno
    raise OSError(err, os.strerror(err), path)


def _cstr(value):
    if value is None:
        return ffi.NULL
    return os.fsencode(value)


def unshare(flags):
    """Move the calling process into new namespaces (unshare(2))."""
    if lib.sw_unshare(flags) < 0:
        _raise_errno()


def setns(fd, nstype=0):
    """Join the namespace that fd refers to (setns(2))."""
    if lib.sw_setns(fd, nstype) < 0:
        _raise_errno()


def mount(source, target, fstype=None, flags=0, data=None):
    """mount(2); the error names the target."""
    rc = lib.sw_mount(
        _cstr(source), _cstr(target), _cstr(fstype), flags, _cstr(data)
    )
    if rc < 0:
        _raise_errno(target)


def umount2(target, flags=0):
    """umount2(2); the error names the target."""
    if lib.sw_umount2(_cstr(target), flags) < 0:
        _raise_errno(target)


def pivot_root(new_root, put_old):
    """pivot_root(2); the error names the new root."""
    if lib.sw_pivot_root(_cstr(new_root), _cstr(put_old)) < 0:
        _raise_errno(new_root)


def clone3(flags, cgroup_fd=-1, exit_signal=0):
    """clone3(2) without a new stack; returns 0 in the child, like fork.

    Only a single-threaded caller may use it: no at-fork handlers run, so
    locks held by other threads would stay held in the child forever. With
    cgroup_fd >= 0 the child starts in that cgroup (CLONE_INTO_CGROUP),
    which skips the cgroup.procs write and its RCU grace period.
    """
    pid = lib.sw_clone3(flags, cgroup_fd, exit_signal)
    if pid < 0:
        _raise_errno()
    return pid


def clone3_supported():
    """True when the kernel has clone3 (5.3 and later)."""
    return bool(lib.sw_clone3_supported())


def fsmount(fstype, options, attr_flags=0):
    """A new, detached mount of fstype configured with options (pairs of
    key and string value): an fd that attaches nowhere until a process
    moves it into its namespace (move_mount). The error names the
    filesystem type and the option being set."""
    fs_fd = lib.sw_fsopen(fstype.encode())
    if fs_fd < 0:
        _raise_errno(fstype)
    try:
        for key, value in options:
            if lib.sw_fsconfig_string(fs_fd, key.encode(), _cstr(value)) < 0:
                _raise_errno(f"{fstype} option {key}")
        if lib.sw_fsconfig_create(fs_fd) < 0:
            _raise_errno(fstype)
        mount_fd = lib.sw_fsmount(fs_fd, attr_flags)
        if mount_fd < 0:
            _raise_errno(fstype)
        return mount_fd
    finally:
        os.close(fs_fd)


def move_mount(mount_fd, target):
    """Attach the detached mount mount_fd at target (move_mount(2))."""
    if lib.sw_move_mount_fd(mount_fd, _cstr(target)) < 0:
        _raise_errno(target)
