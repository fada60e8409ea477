"""The zygote: a fork server that runs inside its own container.

Started by the worker as the image's `python3 -I -S zygote.py`, as root of
its own user namespace (so its capabilities reach no further than that
namespace), with a connected control socket as fd 3. It imports its
packages once, freezes the garbage collector and then forks on request.

A fork has two phases, so that the slow part happens before a request
needs it and so that the zygote never holds a lambda's data:

1. "fork" (from the worker over the control socket, with a channel
   socket and the new sandbox's cgroup fds): the zygote forks a child,
   which joins the cgroups, enters new mount, IPC, UTS and network
   namespaces and clones the sandbox's init with clone3 in a new PID
   namespace. The child stays the init's parent, to report how it ends;
   the init makes its /proc mount, says "ready" on the channel and waits.
2. "go" (from the worker over the channel, straight to the init, with
   the sandbox's root mount, listening socket and log): the init
   attaches the root and its /proc, pivots into the root, drops every
   privilege and serves the handler from memory it shares with the
   zygote; or, for a child zygote, imports more packages and serves
   forks itself.

Standard library only; the system calls the os module lacks go through
ctypes. On the channel the worker reads "ready", then "started" (or an
"error" line naming the failed step), and at the end "exit <status>".
"""

import ctypes
import fcntl
import gc
import json
import os
import platform
import signal
import socket
import struct
import sys

if __package__:
    from . import server
else:
    # -I leaves the script's own directory off sys.path.
    sys.path.insert(0, __file__.rpartition("/")[0])
    import server

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWNET = 0x40000000
CLONE_NEWPID = 0x20000000
CLONE_PARENT = 0x00008000
CLONE_INTO_CGROUP = 0x200000000

MS_NOSUID = 2
MS_NODEV = 4
MS_NOEXEC = 8
MS_REC = 0x4000
MS_PRIVATE = 1 << 18
MNT_DETACH = 2
MOVE_MOUNT_F_EMPTY_PATH = 4
FSOPEN_CLOEXEC = 1
FSMOUNT_CLOEXEC = 1
FSCONFIG_CMD_CREATE = 6
MOUNT_ATTR_NOSUID = 2
MOUNT_ATTR_NODEV = 4
MOUNT_ATTR_NOEXEC = 8
AT_FDCWD = -100

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38

# Generic system call numbers, where os lacks a wrapper and glibc 2.36 has
# none either.
# Numbers from 424 on are the same on every architecture.
NEW_SYSCALLS = {"move_mount": 429, "fsopen": 430, "fsconfig": 431}
NEW_SYSCALLS.update(fsmount=432, clone3=435)
SYSCALLS = {
    "x86_64": {"pivot_root": 155, **NEW_SYSCALLS},
    "aarch64": {"pivot_root": 41, **NEW_SYSCALLS},
}

MOUNT_POINT = "/opt/sockworker/mnt"
NOBODY = 65534
LISTEN_FD = 3
CONTROL_FD = 3
PACKAGES_DIR = "/opt/sockworker/packages"
# A stand-in lambda in the guest layer (see rehearse).
REHEARSAL_DIR = "/opt/sockworker/rehearsal"

libc = ctypes.CDLL(None, use_errno=True)
numbers = SYSCALLS[platform.machine()]


class ChildFailed(Exception):
    """A step of a forked child failed; says which."""


def check(result, what):
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def unshare(flags):
    check(libc.unshare(ctypes.c_int(flags)), "unshare")


def mount(source, target, fstype, flags, data=None):
    check(
        libc.mount(
            source and source.encode(),
            target.encode(),
            fstype and fstype.encode(),
            ctypes.c_ulong(flags),
            data and data.encode(),
        ),
        f"mount {fstype or source} on {target}",
    )


def umount2(target, flags):
    check(libc.umount2(target.encode(), flags), f"umount {target}")


def pivot_root(new_root, put_old):
    check(
        libc.syscall(
            numbers["pivot_root"], new_root.encode(), put_old.encode()
        ),
        "pivot_root",
    )


def move_mount(mount_fd, target):
    check(
        libc.syscall(
            numbers["move_mount"],
            mount_fd,
            b"",
            AT_FDCWD,
            target.encode(),
            MOVE_MOUNT_F_EMPTY_PATH,
        ),
        f"move_mount to {target}",
    )


class CloneArgs(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_uint64)
        for name in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


def clone3(flags, cgroup_fd):
    """Like fork, without at-fork handlers: the caller is single-threaded
    (a child of the single-threaded zygote)."""
    args = CloneArgs()
    args.flags = flags
    # Without an exit signal the child is a "clone child" that a plain
    # waitpid never reports.
    args.exit_signal = signal.SIGCHLD
    if cgroup_fd >= 0:
        args.flags |= CLONE_INTO_CGROUP
        args.cgroup = cgroup_fd
    return check(
        libc.syscall(
            numbers["clone3"], ctypes.byref(args), ctypes.sizeof(args)
        ),
        "clone3",
    )


def prctl(option, value):
    check(
        libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}"
    )


# -- the fork server ----------------------------------------------------


def empty_bounding_set():
    """No descendant may ever exec its way to a capability. The zygote
    keeps the capabilities it holds (it never execs again); emptying the
    set here, once, spares every sandbox start the work.

    PERF: 41 prctl calls through ctypes cost a sandbox start 0.2 ms.
    """
    with open("/proc/sys/kernel/cap_last_cap") as f:
        last = int(f.read())
    for cap in range(last + 1):
        prctl(PR_CAPBSET_DROP, cap)


def serve_forks(control, packages):
    """Answer fork requests until the worker closes the control socket."""
    empty_bounding_set()
    import_packages(packages)
    # Forked children share the zygote's pages; a collection in one would
    # touch (and so copy) every object, and in the zygote it would only
    # move the imported modules around.
    gc.freeze()
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    while True:
        reap_children()
        try:
            message, fds, _, _ = socket.recv_fds(control, 4096, 16)
        except InterruptedError:
            continue
        if not message:
            return
        request = json.loads(message)
        fork_child(control, request, fds)


def import_packages(packages):
    sys.path.insert(0, PACKAGES_DIR)
    for name in packages:
        __import__(name)


def reap_children():
    """Children and, through CLONE_PARENT, sandbox inits are ours to
    reap; the worker learns of their end from their cgroups."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def fork_child(control, request, fds):
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        control.close()
        run_child(request, fds)
    for fd in fds:
        os.close(fd)


# -- the forked child ---------------------------------------------------


def run_child(request, fds):
    """Phase one: join the cgroups, enter the namespaces and clone the
    init, which waits for go; then stay its parent. Never returns."""
    channel = socket.socket(fileno=fds[0])
    step = "start"
    try:
        v2_fd = fds[1] if request["v2"] else -1
        v1_fds = fds[2:] if request["v2"] else fds[1:]
        step = "close inherited fds"
        close_fds_except({0, 1, 2, *fds})
        step = "set parent-death signal"
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        step = "join cgroups"
        for fd in v1_fds:
            os.write(fd, b"0")
            os.close(fd)
        step = "enter namespaces"
        enter_namespaces(request)
        step = "clone3 into a new PID namespace"
        # PERF: the init is cloned here, ahead of demand: copying the
        # interpreter's page tables is the dearest step of a start.
        ctypes.pythonapi.PyOS_BeforeFork()
        try:
            pid = clone3(CLONE_NEWPID, v2_fd)
        except BaseException:
            ctypes.pythonapi.PyOS_AfterFork_Parent()
            raise
        if pid == 0:
            # What os.fork does for a child: reset the interpreter's
            # thread state, reseed random, run at-fork hooks.
            ctypes.pythonapi.PyOS_AfterFork_Child()
            if v2_fd >= 0:
                os.close(v2_fd)
            run_init(channel)
        ctypes.pythonapi.PyOS_AfterFork_Parent()
        step = "wait for the init"
        report_exit(channel, pid)
    except BaseException as exc:
        report_failure(channel, step, exc)


def report_exit(channel, pid):
    """Stay the init's parent and tell the worker how it ended: the init
    is not the worker's child, so only its parent can know."""
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    try:
        channel.sendall(f"exit {status}\n".encode())
    finally:
        os._exit(0)


def enter_namespaces(request):
    flags = CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS
    if request["network"] == "none":
        flags |= CLONE_NEWNET
    unshare(flags)
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    if request["network"] == "none":
        server_bring_up_loopback()
    socket.sethostname(request["hostname"])


def server_bring_up_loopback():
    ifreq = struct.Struct("16sH22x")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        flags = ifreq.unpack(fcntl.ioctl(sock, 0x8913, ifreq.pack(b"lo", 0)))[
            1
        ]
        fcntl.ioctl(sock, 0x8914, ifreq.pack(b"lo", flags | 1))


def report_failure(channel, step, exc):
    """Tell the worker on the channel if it is still open, and the log
    (the zygote's, or the sandbox's once stdio is set up) in any case."""
    import traceback

    print(f"zygote child: {step} failed", file=sys.stderr)
    traceback.print_exc()
    sys.stderr.flush()
    try:
        channel.sendall(
            f"error {step}\t{type(exc).__name__}: {exc}\n".encode(
                errors="replace"
            )
        )
    finally:
        os._exit(127)


# -- the sandbox's init -------------------------------------------------


def run_init(channel):
    """PID 1 of the new sandbox (or child zygote): a /proc mount made
    ahead, then on go the root, the pivot and the handler."""
    step = "set parent-death signal"
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        step = "make /proc"
        proc_fd = make_proc_mount()
        step = "empty the environment"
        # Ahead of demand too: the sandbox gets only what the lambda
        # declares, which go brings.
        os.environ.clear()
        step = "rehearse"
        rehearse()
        channel.sendall(b"ready\n")
        step = "wait for go"
        message, go_fds, _, _ = socket.recv_fds(channel, 65536, 8)
        if not message:
            os._exit(0)
        go = json.loads(message)
        root_fd, work_fd, log_fd = go_fds
        step = "attach root"
        move_mount(root_fd, MOUNT_POINT)
        os.close(root_fd)
        move_mount(proc_fd, MOUNT_POINT + "/proc")
        os.close(proc_fd)
        step = "pivot_root into the sandbox root"
        os.chdir(MOUNT_POINT)
        pivot_root(".", ".")
        umount2(".", MNT_DETACH)
        os.chdir("/")
        step = "set up stdio"
        set_up_stdio(work_fd, log_fd, channel.fileno())
        os.environ.update(go["env"])
        if go["mode"] == "zygote":
            step = "become a zygote"
            control = socket.socket(fileno=CONTROL_FD)
            channel.sendall(b"started\n")
            channel.close()
            serve_forks(control, go["packages"])
            os._exit(0)
        step = "drop privileges"
        drop_privileges()
        channel.sendall(b"started\n")
        channel.close()
        listener = socket.socket(fileno=LISTEN_FD)
        handler = server.Handler(go["code_dir"])
        server.serve(listener, handler)
    except BaseException as exc:
        report_failure(channel, step, exc)
    os._exit(0)


def rehearse():
    """Run a start's own steps once, on the guest layer's stand-in
    lambda, before the real one arrives.

    PERF: every page of the zygote's memory that a start writes to is
    copied on its first write, at some 5 us a fault on this machine and a
    few hundred faults a start. Writing to them here, ahead of demand,
    takes those copies off the request's path: the import system's
    caches, the allocator's pools, the codec's and the server's state.
    What the rehearsal leaves in sys.path and sys.modules is undone.
    """
    saved_path = list(sys.path)
    json.loads(json.dumps({"mode": "sandbox", "env": {}, "code_dir": ""}))
    client, server_end = socket.socketpair()
    try:
        handler = server.Handler(REHEARSAL_DIR)
        client.sendall(server.protocol.encode_request(b'{"rehearsal": 1}'))
        client.shutdown(socket.SHUT_WR)
        server.serve_connection(server_end, handler)
        server.protocol.recv_reply(client)
    finally:
        client.close()
        server_end.close()
        sys.modules.pop("f", None)
        sys.path_importer_cache.pop(REHEARSAL_DIR, None)
        sys.path[:] = saved_path


def make_proc_mount():
    """A detached proc mount of this PID namespace, for the sandbox's
    /proc once its root is attached."""
    fs_fd = check(
        libc.syscall(numbers["fsopen"], b"proc", FSOPEN_CLOEXEC), "fsopen proc"
    )
    try:
        check(
            libc.syscall(
                numbers["fsconfig"], fs_fd, FSCONFIG_CMD_CREATE, None, None, 0
            ),
            "fsconfig proc",
        )
        return check(
            libc.syscall(
                numbers["fsmount"],
                fs_fd,
                FSMOUNT_CLOEXEC,
                MOUNT_ATTR_NOSUID | MOUNT_ATTR_NODEV | MOUNT_ATTR_NOEXEC,
            ),
            "fsmount proc",
        )
    finally:
        os.close(fs_fd)


def set_up_stdio(work_fd, log_fd, channel_fd):
    """fd 0 /dev/null (the zygote's), 1 and 2 the sandbox log, 3 the
    listening socket (or a child zygote's control socket).

    PERF: no listing of /proc/self/fd: the forked child closed all it
    inherited, so the fds open here are exactly these and the channel.
    """
    if channel_fd <= LISTEN_FD:
        raise ChildFailed(f"channel on fd {channel_fd}, not above stdio")
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    if work_fd != LISTEN_FD:
        # Replaces log_fd if that was on LISTEN_FD: 1 and 2 hold it now.
        os.dup2(work_fd, LISTEN_FD)
        os.close(work_fd)
    if log_fd not in (1, 2, LISTEN_FD):
        os.close(log_fd)


def drop_privileges():
    """Become nobody, forbid gaining privileges and die with the zygote:
    the same state a fresh sandbox execs in. (The bounding set is empty
    already: the zygote emptied it for all its children.)"""
    os.setgroups([])
    os.setresgid(NOBODY, NOBODY, NOBODY)
    os.setresuid(NOBODY, NOBODY, NOBODY)
    # The user switch cleared "dumpable", which hides /proc/self from the
    # process itself; a fresh sandbox gets it back from exec.
    prctl(PR_SET_DUMPABLE, 1)
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def close_fds_except(keep):
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd not in keep:
            try:
                os.close(fd)
            except OSError:
                pass


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    packages = [name for name in argv if name]
    control = socket.socket(fileno=CONTROL_FD)
    serve_forks(control, packages)


if __name__ == "__main__":
    main()
