"""Zygotes seen from the worker: creating one, asking it to fork.

A zygote is a container whose init is the guest fork server
(sockworker/guest/zygote.py), root of its own user namespace so that the
capabilities it needs to give children new namespaces reach nothing
outside it. The root zygote is made here from nothing; every other zygote
is forked from its parent, like a sandbox, then imports more packages.

The worker builds each root filesystem itself as a detached mount
(mounts.build_detached_root) and passes the fd: an overlay mounted inside
the zygote's user namespace could not use the host's directories as
lower layers.
"""

import json
import logging
import os
import secrets
import signal
import socket
import threading

from sockworker.sandbox import mounts, namespaces, native
from sockworker.sandbox.container import (
    SandboxError,
    SandboxPaths,
    Step,
    close_fds_except,
    read_report,
    set_up_stdio,
    write_file,
)

log = logging.getLogger(__name__)

ZYGOTE_SERVER = "/opt/sockworker/guest/zygote.py"
# The host uid that root inside a zygote's user namespace maps to; nobody
# inside maps to nobody outside. Neither owns anything of the host's.
ZYGOTE_HOST_UID = 65533
NOBODY = 65534
CLONE_NEWUSER = 0x10000000


def id_map():
    return f"0 {ZYGOTE_HOST_UID} 1\n{NOBODY} {NOBODY} 1\n"


class Zygote:
    """A running zygote: the control socket, its cgroup and directory.

    Guarantees: fork requests are serialised on the control socket;
    destroy() kills the zygote and, with it, every sandbox and zygote
    forked from it (they live in PID namespaces nested in its own).
    """

    def __init__(self, zygote_id, packages, cgroup, sandboxes_dir, parent):
        self.id = zygote_id
        self.packages = packages
        self.cgroup = cgroup
        self.paths = SandboxPaths(sandboxes_dir, zygote_id)
        self.parent = parent
        self.control = None
        self.lock = threading.Lock()
        self.destroyed = False
        self.import_names = ()
        # The init's pid when it is the worker's own child (the root
        # zygote, made with CLONE_PARENT); None for forked zygotes, which
        # their parent zygote reaps.
        self.pid = None

    def __repr__(self):
        return f"<Zygote {self.id} {sorted(self.packages)}>"

    def alive(self):
        """The zygote never writes on its control socket, so anything
        readable there is the end of file its death left.

        PERF: a peek, not a read of cgroup files: asked on every cold
        start.
        """
        if self.destroyed or self.control is None:
            return False
        try:
            self.control.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def request_fork(self, channel_fd, cgroup, network, hostname):
        """Ask the zygote to fork a child for the sandbox whose cgroup is
        given; the child talks to the worker on channel_fd from then on."""
        # clone3's CLONE_INTO_CGROUP checks the caller's credentials, which
        # inside the zygote's user namespace own no cgroup; a cgroup.procs
        # fd opened here carries the worker's, so the child joins through
        # those (ahead of demand, so the RCU wait is off the request path).
        fds = [channel_fd]
        try:
            for path in cgroup.procs_files():
                fds.append(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            message = json.dumps(
                {"v2": False, "network": network, "hostname": hostname}
            ).encode()
            with self.lock:
                if self.destroyed:
                    raise SandboxError(f"zygote {self.id} is destroyed")
                socket.send_fds(self.control, [message], fds)
        except OSError as exc:
            raise SandboxError(
                f"fork request to zygote {self.id}: {exc.strerror or exc}"
            ) from exc
        finally:
            for fd in fds[1:]:
                os.close(fd)

    def destroy(self):
        if self.destroyed:
            return
        self.destroyed = True
        if self.control is not None:
            self.control.close()
        try:
            self.cgroup.destroy()
        finally:
            self.reap()
            remove_tree(self.paths.dir)
        log.info("zygote %s destroyed", self.id)

    def reap(self):
        if self.pid is None:
            return
        try:
            os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass
        self.pid = None


def remove_tree(path):
    import shutil

    shutil.rmtree(path, ignore_errors=True)


def new_zygote_id():
    return "zy-" + secrets.token_hex(6)


def create_root_zygote(zygote, layers, limits, scratch_bytes, network):
    """Start `zygote` from nothing: a container whose init execs the
    guest fork server as root of a new user namespace."""
    paths = zygote.paths
    os.makedirs(paths.dir, mode=0o700)
    zygote.cgroup.create(limits)
    root_fd = mounts.build_detached_root(layers, scratch_bytes)
    host_end, zygote_end = socket.socketpair(
        socket.AF_UNIX, socket.SOCK_STREAM
    )
    log_fd = os.open(paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    # The zygote joins every cgroup by a write while still real root, for
    # the reason request_fork gives; a zygote is made rarely.
    v2_fd = -1
    go_r, go_w = os.pipe()
    report_r, report_w = os.pipe()
    try:
        child = os.fork()
        if child == 0:
            host_end.close()
            run_zygote_setup(
                zygote,
                network,
                dict(
                    root=root_fd,
                    control=zygote_end.fileno(),
                    log=log_fd,
                    cgroup=v2_fd,
                    go=go_r,
                    report=report_w,
                ),
            )
        for fd in (go_r, report_w, root_fd, log_fd):
            os.close(fd)
        go_r = report_w = root_fd = log_fd = -1
        zygote_end.close()
        map_user_namespace(child, report_r)
        os.write(go_w, b"go\n")
        os.close(go_w)
        go_w = -1
        report = read_report(report_r)
        os.waitpid(child, 0)
    finally:
        for fd in (go_r, go_w, report_r, report_w, root_fd, log_fd, v2_fd):
            if fd >= 0:
                os.close(fd)
    zygote.pid = check_report(zygote.id, report)
    zygote.control = host_end
    log.info(
        "zygote %s created (packages: %s)",
        zygote.id,
        ", ".join(sorted(zygote.packages)) or "none",
    )


def map_user_namespace(child, report_fd):
    """Wait for the child to enter its user namespace, then map it."""
    line = b""
    while not line.endswith(b"\n"):
        chunk = os.read(report_fd, 1)
        if not chunk:
            raise SandboxError(
                "create zygote: setup child ended before its user "
                f"namespace was made: {line.decode(errors='replace')}"
            )
        line += chunk
    if not line.startswith(b"userns"):
        raise SandboxError(f"create zygote: {line.decode().strip()}")
    for name in ("uid_map", "gid_map"):
        write_file(f"/proc/{child}/{name}", id_map())


def check_report(zygote_id, report):
    """The zygote init's pid from the setup child's report, or the
    failure the report names."""
    pid = None
    for line in report.splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "error":
            step, _, cause = rest.partition("\t")
            raise SandboxError(f"create zygote {zygote_id}: {step}: {cause}")
        if kind == "pid":
            pid = int(rest)
    if pid is None:
        raise SandboxError(
            f"create zygote {zygote_id}: setup child ended without a report"
        )
    return pid


def run_zygote_setup(zygote, network, fds):
    """Setup child: cgroups, user namespace, namespaces, root; then the
    zygote's init. Never returns."""
    status = 127
    try:
        step = Step(fds["report"])
        keep = {0, 1, 2, *(fd for fd in fds.values() if fd >= 0)}
        step("close inherited fds", close_fds_except, keep)
        step("set parent-death signal", set_pdeathsig)
        joins = (
            zygote.cgroup.v1_procs_files()
            if fds["cgroup"] >= 0
            else zygote.cgroup.procs_files()
        )
        for procs in joins:
            step(f"join cgroup {procs}", write_file, procs, "0")
        step("unshare user namespace", native.unshare, CLONE_NEWUSER)
        os.write(fds["report"], b"userns\n")
        step("wait for the id maps", wait_for_go, fds["go"])
        step("become root of the user namespace", become_namespace_root)
        # The mount namespace is made after the user namespace so that
        # the zygote owns it and may mount in it and in its children's.
        flags = namespaces.unshare_flags(network)
        step("unshare namespaces", native.unshare, flags)
        step("make mounts private", mounts.make_mounts_private)
        if network == "none":
            step("bring up loopback", namespaces.bring_up_loopback)
        step("set hostname", namespaces.set_hostname, zygote.id)
        # Stacked on "/": any attached place will do, the init pivots into
        # it through the fd, and "/" needs no search permission on host
        # directories that root of the user namespace lacks.
        step("attach root", native.move_mount, fds["root"], "/")
        pid = step(
            "clone3 into a new PID namespace",
            native.clone3,
            native.CLONE_NEWPID | native.CLONE_PARENT,
            fds["cgroup"],
        )
        if pid == 0:
            run_zygote_init(zygote, fds, step)
        os.write(fds["report"], f"pid {pid}\n".encode())
        status = 0
    finally:
        os._exit(status)


def wait_for_go(fd):
    if not os.read(fd, 16):
        raise SandboxError("the worker gave up on this zygote")


def become_namespace_root():
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)


def set_pdeathsig():
    import prctl

    prctl.set_pdeathsig(signal.SIGKILL)


def run_zygote_init(zygote, fds, step):
    """The zygote's PID 1: /proc, the root switch, then exec the fork
    server as root of the user namespace (its capabilities end there)."""
    try:
        step("enter the root", os.fchdir, fds["root"])
        step("mount /proc", mounts.mount_proc, ".")
        step("pivot_root into the zygote root", mounts.enter_root, ".")
        step("set up stdio", set_up_stdio, fds["control"], fds["log"], step)
        step("set parent-death signal", set_pdeathsig)
        python = "/usr/bin/python3"
        argv = [python, "-I", "-S", ZYGOTE_SERVER, *zygote.import_names]
        step(f"exec {python}", os.execve, python, argv, {})
    finally:
        os._exit(127)
