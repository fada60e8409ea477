"""Mount steps that build a container's root filesystem.

These run in the child, inside its own mount namespace, after the mounts
were made private: nothing mounted here propagates to the host, and all of
it vanishes with the namespace when the sandbox's last process exits.
Overlay options use paths relative to the working directory (the worker's
state directory) so that the container's mount table shows no host path.
"""

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
    for name, major, minor in DEVICES:
        os.mknod(
            os.path.join(dev, name),
            0o666 | stat.S_IFCHR,
            os.makedev(major, minor),
        )
        # mknod applies the umask; the nodes must be usable by anyone.
        os.chmod(os.path.join(dev, name), 0o666)
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
