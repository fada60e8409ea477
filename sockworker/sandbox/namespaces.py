"""Namespace steps for a container: which to unshare, and what a fresh
network namespace needs before it is useful."""

import fcntl
import socket
import struct

from sockworker.sandbox import native

# Mount, IPC and UTS are unshared by the first child; the PID namespace is
# made by clone3 so that the container's init is its first process.
BASE_FLAGS = native.CLONE_NEWNS | native.CLONE_NEWIPC | native.CLONE_NEWUTS

NETWORK_MODES = ("none", "host")

SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x1
_IFREQ = struct.Struct("16sH22x")


def unshare_flags(network):
    """Flags to unshare for a network mode: "none" gets a namespace of
    its own with only loopback, "host" shares the worker's."""
    if network not in NETWORK_MODES:
        raise ValueError(
            f"network mode {network!r}: expected one of {NETWORK_MODES}"
        )
    if network == "host":
        return BASE_FLAGS
    return BASE_FLAGS | native.CLONE_NEWNET


def bring_up_loopback():
    """Set lo up in the caller's network namespace (it starts down).

    A plain ioctl: pyroute2 would cost an import of tens of milliseconds
    in a process that lives for one container start.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = _IFREQ.pack(b"lo", 0)
        flags = _IFREQ.unpack(fcntl.ioctl(sock, SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, _IFREQ.pack(b"lo", flags | IFF_UP))


def set_hostname(name):
    socket.sethostname(name)
