"""Mount steps that build a container's root filesystem, and the worker's
private tmpfs for unpacked code.

The container steps run in the child, inside its own mount namespace,
after the mounts were made private: nothing mounted there propagates to
the host, and all of it vanishes with the namespace when the sandbox's last
process exits.
Overlay options use paths relative to the working directory (the worker's
state directory) so that the container's mount table shows no host path.
"""

import errno
import os
import stat

from sockworker.sandbox import native

# Device nodes of a minimal /dev: name, major, minor.
DEVICES = (
    ("null", 1, 3),
    ("zero", 1, 5),
    ("full", 1, 7),
    ("random", 1, 8),
    ("urandom", 1, 9),
)

DEV_LINKS = (
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
)

NOSUID_NODEV = native.MS_NOSUID | native.MS_NODEV


def make_mounts_private():
    """Stop mount events propagating between this namespace and the
    host's, in both directions."""
    native.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)


def mount_private_tmpfs(path, size_bytes):
    """Move the calling process into a mount namespace of its own and
    mount a tmpfs of size_bytes at path there.

    Only this process and the children it forks from now on see the
    tmpfs, and it vanishes with the last of them: a worker killed with
    SIGKILL leaves no mount on the host. Mounts made on the host later
    still appear here (slave propagation). The caller must be
    single-threaded, since unshare moves only the calling thread.
    """
    threads = len(os.listdir("/proc/self/task"))
    if threads != 1:
        raise OSError(
            errno.EINVAL,
            f"the process has {threads} threads; a private mount namespace "
            "needs one",
            path,
        )
    native.unshare(native.CLONE_NEWNS)
    native.mount(None, "/", None, native.MS_REC | native.MS_SLAVE)
    native.mount(
        "tmpfs", path, "tmpfs", NOSUID_NODEV, f"size={size_bytes},mode=0755"
    )


def mount_scratch(path, size_bytes):
    """A tmpfs for the overlay's upper and work directories."""
    native.mount(
        "tmpfs", path, "tmpfs", NOSUID_NODEV, f"size={size_bytes},mode=0755"
    )
    os.mkdir(os.path.join(path, "upper"), 0o755)
    os.mkdir(os.path.join(path, "work"), 0o755)


def mount_overlay(target, lower_layers, scratch):
    """Overlay at target: lower_layers (topmost first, relative to the
    working directory) under a writable upper in scratch."""
    options = ",".join(
        (
            "lowerdir=" + ":".join(lower_layers),
            f"upperdir={scratch}/upper",
            f"workdir={scratch}/work",
        )
    )
    native.mount("overlay", target, "overlay", NOSUID_NODEV, options)


def mount_dev(root):
    """A tmpfs /dev holding only the harmless character devices."""
    dev = os.path.join(root, "dev")
    native.mount(
        "tmpfs",
        dev,
        "tmpfs",
        native.MS_NOSUID | native.MS_NOEXEC,
        "size=64k,mode=0755",
    )
    populate_dev(dev)


def populate_dev(dev):
    for name, major, minor in DEVICES:
        path = os.path.join(dev, name)
        os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(major, minor))
        # mknod applies the umask; the nodes must be usable by anyone.
        os.chmod(path, 0o666)
    for name, target in DEV_LINKS:
        os.symlink(target, os.path.join(dev, name))
    os.mkdir(os.path.join(dev, "shm"), 0o1777)
    os.chmod(os.path.join(dev, "shm"), 0o1777)


def mount_proc(root):
    """A /proc of the caller's PID namespace: only its processes."""
    native.mount(
        "proc",
        os.path.join(root, "proc"),
        "proc",
        NOSUID_NODEV | native.MS_NOEXEC,
    )


def enter_root(root):
    """Make root the process's / and detach the host's tree entirely.

    pivot_root(".", ".") stacks the old root on top of the new one at the
    same place; unmounting "." then removes the old root, so no directory
    for it is needed inside the container.
    """
    os.chdir(root)
    native.pivot_root(".", ".")
    native.umount2(".", native.MNT_DETACH)
    os.chdir("/")


def build_detached_root(layers, scratch_bytes):
    """A complete root filesystem as a mount fd that belongs to no
    namespace: an overlay of layers (host paths, topmost first) over a
    size-limited tmpfs whose upper directory already holds the minimal
    /dev. A process in another namespace attaches it with move_mount.

    The worker builds it, as real root, because an overlay mounted inside
    a zygote's user namespace cannot use lower layers from the host's
    mounts.
    """
    scratch = make_detached_scratch(scratch_bytes)
    try:
        return mount_detached_overlay(layers, scratch)
    finally:
        os.close(scratch)


def make_detached_scratch(scratch_bytes):
    """The writable part of a detached root: a tmpfs holding the
    overlay's upper (with /dev in it) and work directories. It does not
    depend on the lambda, so it can be made ahead of a request."""
    scratch = native.fsmount(
        "tmpfs",
        [("size", str(scratch_bytes)), ("mode", "0755")],
        native.MOUNT_ATTR_NOSUID,
    )
    try:
        base = f"/proc/self/fd/{scratch}"
        os.mkdir(os.path.join(base, "upper"), 0o755)
        os.mkdir(os.path.join(base, "work"), 0o755)
        make_dev_nodes(os.path.join(base, "upper", "dev"))
    except BaseException:
        os.close(scratch)
        raise
    return scratch


def mount_detached_overlay(layers, scratch):
    """The overlay of layers over the scratch tmpfs (an fd from
    make_detached_scratch), detached. Lower layers are named by
    /proc/self/fd paths, so the container's mount table shows no host
    path."""
    layer_fds = []
    try:
        for layer in layers:
            layer_fds.append(
                os.open(layer, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
            )
        base = f"/proc/self/fd/{scratch}"
        return native.fsmount(
            "overlay",
            [
                (
                    "lowerdir",
                    ":".join(f"/proc/self/fd/{fd}" for fd in layer_fds),
                ),
                ("upperdir", os.path.join(base, "upper")),
                ("workdir", os.path.join(base, "work")),
            ],
            native.MOUNT_ATTR_NOSUID,
        )
    finally:
        for fd in layer_fds:
            os.close(fd)


def make_dev_nodes(dev):
    """The harmless character devices and the usual links, in dev."""
    os.mkdir(dev, 0o755)
    populate_dev(dev)
