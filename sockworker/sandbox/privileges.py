"""Privilege steps for a container's init, just before it execs.

Order matters: the bounding set can only be emptied while CAP_SETPCAP is
still held, and the kernel clears the parent-death signal whenever the
effective user changes, so that signal is set after the user switch.
"""

import os
import signal

import prctl

NOBODY = 65534


def last_capability():
    with open("/proc/sys/kernel/cap_last_cap") as f:
        return int(f.read())


def drop_bounding_set():
    """Empty the bounding set so no later exec can regain a capability.

    Every number up to the kernel's last one is dropped, not only the ones
    this prctl binding has names for.
    """
    for cap in range(last_capability() + 1):
        prctl.capbset_drop(cap)


def become_user(uid=NOBODY, gid=NOBODY):
    """Switch to an unprivileged user; the kernel then clears the
    permitted and effective sets (inheritable is cleared here first)."""
    prctl.cap_inheritable.limit()
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)


def lock_privileges():
    """No exec may gain privileges, and the sandbox dies with its
    parent."""
    prctl.set_no_new_privs(1)
    prctl.set_pdeathsig(signal.SIGKILL)
