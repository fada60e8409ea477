"""The SOCK container: a sandbox built directly from namespaces, an overlay
root filesystem and cgroups, running the guest handler server.

Creating one reads as the steps below. The worker forks a first child that
joins the sandbox's v1 cgroups, unshares the mount, IPC, UTS (and network)
namespaces and mounts the root filesystem there. That child then calls
clone3 with CLONE_NEWPID | CLONE_PARENT, so the container's init is PID 1
of a new PID namespace, is the worker's own child (no intermediate process
stays behind), and starts directly in its v2 cgroup (CLONE_INTO_CGROUP).
The init mounts /proc, pivots into the root, drops privileges and execs the
image's Python on the guest server, whose listening socket the worker bound
beforehand, so the worker can connect at once.

Errors cross the forks explicitly: a child writes the failing step and
errno to a close-on-exec pipe and ends in os._exit; the worker raises
SandboxError naming the step, the sandbox and the errno.
"""

import errno
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from dataclasses import dataclass, field

from sockworker import errors
from sockworker.guest import protocol
from sockworker.sandbox import mounts, namespaces, native, privileges
from sockworker.sandbox.cgroups import Limits

log = logging.getLogger(__name__)

GUEST_SERVER = "/opt/sockworker/guest/server.py"
LISTEN_FD = 3

# States of a container's life; destroy() is valid from all of them.
NEW, RUNNING, PAUSED, DESTROYED = "new", "running", "paused", "destroyed"


class SandboxError(Exception):
    """Creating or driving a sandbox failed; the message names the step,
    the sandbox and the cause."""


@dataclass(frozen=True)
class ContainerSpec:
    """What a container is made of.

    layers: host directories stacked read-only under the root, topmost
    first (the lambda's code layer, the guest runtime layer, the base
    image); each is a tree seen from the container's /.
    """

    layers: tuple
    limits: Limits
    network: str = "none"
    scratch_bytes: int = 64 << 20
    env: dict = field(default_factory=dict)
    python: str = "/usr/bin/python3"
    code_dir: str = "/handler"
    hostname: str = "sandbox"


def new_sandbox_id():
    return "sb-" + secrets.token_hex(6)


class SandboxPaths:
    """Where a sandbox keeps its host-side files: <sandboxes_dir>/<id>/.

    The names are fixed so a restarted worker can find and remove what a
    killed one left behind.
    """

    def __init__(self, sandboxes_dir, sandbox_id):
        self.dir = os.path.join(sandboxes_dir, sandbox_id)
        self.root = os.path.join(self.dir, "root")
        self.scratch = os.path.join(self.dir, "scratch")
        self.socket = os.path.join(self.dir, "sock")
        self.log = os.path.join(self.dir, "log")

    def layer_link(self, index):
        return f"l{index}"


class Container:
    """A SOCK sandbox.

    Guarantees: after create() returns, the guest server is running in the
    container and a connection to it is open. destroy() is idempotent and
    safe from any state, including a create() that failed half way; it
    kills every process of the sandbox, reaps its init, removes its cgroups
    and its directory. Using a destroyed container raises SandboxError.
    Not thread-safe: one request at a time (the manager serialises).
    """

    def __init__(self, sandbox_id, spec, cgroup, sandboxes_dir):
        self.id = sandbox_id
        self.spec = spec
        self.cgroup = cgroup
        self.paths = SandboxPaths(sandboxes_dir, sandbox_id)
        self.pid = None
        self.state = NEW
        self.conn = None
        self.exit_status = None

    def __repr__(self):
        return f"<Container {self.id} pid={self.pid} {self.state}>"

    def create(self):
        try:
            self.prepare_directory()
            self.cgroup.create(self.spec.limits)
            listener = self.bind_socket()
            try:
                self.pid = self.spawn(listener)
            finally:
                listener.close()
            self.state = RUNNING
            self.connect()
        except BaseException:
            self.destroy()
            raise
        log.info("sandbox %s created, pid %d", self.id, self.pid)

    def prepare_directory(self):
        paths = self.paths
        os.makedirs(paths.dir, mode=0o700)
        os.mkdir(paths.root)
        os.mkdir(paths.scratch)
        for index, layer in enumerate(self.spec.layers):
            os.symlink(layer, os.path.join(paths.dir, paths.layer_link(index)))

    def bind_socket(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.paths.socket)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            raise SandboxError(
                f"bind socket {self.paths.socket} of sandbox {self.id}: "
                f"{exc.strerror}"
            ) from exc
        return listener

    def spawn(self, listener):
        """Fork the setup child; returns the container init's pid."""
        log_fd = os.open(
            self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        cgroup_fd = self.open_cgroup_fd()
        report_r, report_w = os.pipe()
        try:
            child = os.fork()
            if child == 0:
                os.close(report_r)
                run_setup_child(
                    self, listener.fileno(), log_fd, cgroup_fd, report_w
                )
            os.close(report_w)
            report_w = -1
            report = read_report(report_r)
            reap_setup_child(child)
        finally:
            os.close(report_r)
            if report_w >= 0:
                os.close(report_w)
            os.close(log_fd)
            if cgroup_fd >= 0:
                os.close(cgroup_fd)
        return self.parse_report(report)

    def open_cgroup_fd(self):
        if not CLONE_INTO_CGROUP:
            return -1
        return self.cgroup.open_v2()

    def parse_report(self, report):
        pid = None
        failure = None
        for line in report.splitlines():
            kind, _, rest = line.partition(" ")
            if kind == "pid":
                pid = int(rest)
            elif kind == "error" and failure is None:
                failure = rest
        if pid is not None:
            self.pid = pid
        if failure is not None:
            step, _, cause = failure.partition("\t")
            raise SandboxError(f"create sandbox {self.id}: {step}: {cause}")
        if pid is None:
            raise SandboxError(
                f"create sandbox {self.id}: setup child ended without a report"
            )
        return pid

    def connect(self):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(self.paths.socket)
        except OSError as exc:
            conn.close()
            raise SandboxError(
                f"connect to sandbox {self.id} at {self.paths.socket}: "
                f"{exc.strerror}"
            ) from exc
        self.conn = conn

    def request(self, body, timeout):
        """Send one event and return (status, payload) of the reply.

        Raises HandlerTimeout when the handler outlives timeout seconds
        (the sandbox is destroyed: its state is unknown), SandboxDied when
        the sandbox ends before replying.
        """
        self.check_usable()
        if self.state == PAUSED:
            self.unpause()
        try:
            self.conn.settimeout(timeout)
            self.conn.sendall(protocol.encode_request(body))
            return protocol.recv_reply(self.conn)
        except TimeoutError:
            self.destroy()
            raise errors.HandlerTimeout(
                f"handler ran longer than {timeout:g} s; sandbox {self.id} "
                "was destroyed"
            ) from None
        except (OSError, protocol.ProtocolError) as exc:
            reason = self.death_reason()
            self.destroy()
            raise errors.SandboxDied(
                f"sandbox {self.id} died during the request: {reason}",
                reason=reason,
            ) from exc

    def death_reason(self):
        """Why the sandbox stopped answering, in words a caller can act
        on: out of memory, killed by a signal, exited."""
        if self.cgroup.oom_killed():
            return "out of memory"
        status = self.wait_exit(timeout=0.5)
        if status is None:
            return "stopped answering"
        if os.WIFSIGNALED(status):
            name = signal.Signals(os.WTERMSIG(status)).name
            return f"crashed (killed by {name})"
        return f"exited with status {os.WEXITSTATUS(status)}"

    def wait_exit(self, timeout):
        """The init's wait status once it has exited, else None."""
        if self.exit_status is not None:
            return self.exit_status
        deadline = time.monotonic() + timeout
        while True:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid:
                self.exit_status = status
                return status
            if time.monotonic() >= deadline:
                return None
            time.sleep(0.005)

    def pause(self):
        self.check_usable()
        if self.state == RUNNING:
            self.cgroup.freeze()
            self.state = PAUSED
            log.debug("sandbox %s paused", self.id)

    def unpause(self):
        self.check_usable()
        if self.state == PAUSED:
            self.cgroup.thaw()
            self.state = RUNNING
            log.debug("sandbox %s unpaused", self.id)

    def check_usable(self):
        if self.state == DESTROYED:
            raise SandboxError(f"sandbox {self.id} is destroyed")
        if self.state == NEW:
            raise SandboxError(f"sandbox {self.id} is not created")

    def alive(self):
        return self.state in (RUNNING, PAUSED) and self.wait_exit(0) is None

    def destroy(self):
        if self.state == DESTROYED:
            return
        previous, self.state = self.state, DESTROYED
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        try:
            self.cgroup.destroy()
        finally:
            self.reap()
            remove_tree(self.paths.dir)
        if previous != NEW:
            log.info("sandbox %s destroyed, pid %s", self.id, self.pid)

    def reap(self):
        """Collect the init's exit status; the cgroup kill has ended it."""
        if self.pid is None or self.exit_status is not None:
            return
        try:
            _, self.exit_status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def remove_tree(path):
    try:
        shutil.rmtree(path)
    except FileNotFoundError:
        pass


CLONE_INTO_CGROUP = native.clone3_supported()


def read_report(fd):
    chunks = []
    while True:
        chunk = os.read(fd, 4096)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


def reap_setup_child(pid):
    _, status = os.waitpid(pid, 0)
    return status


# ---------------------------------------------------------------------
# Child side. Everything below runs in forked processes, never returns
# and never logs (the logging lock may have been held by another thread at
# fork time).


class Step:
    """Runs child steps and reports the first failure to the worker."""

    def __init__(self, report_fd):
        self.report_fd = report_fd

    def __call__(self, name, function, *args):
        try:
            return function(*args)
        except OSError as exc:
            code = errno.errorcode.get(exc.errno, str(exc.errno))
            self.fail(name, f"{code}: {exc}")
        except Exception as exc:
            self.fail(name, f"{type(exc).__name__}: {exc}")

    def fail(self, name, cause):
        message = f"error {name}\t{cause}\n".encode(errors="replace")
        try:
            os.write(self.report_fd, message)
        finally:
            os._exit(127)


def run_setup_child(container, listen_fd, log_fd, cgroup_fd, report_fd):
    """First child: cgroups, namespaces and mounts, then the init."""
    status = 127
    try:
        step = Step(report_fd)
        spec = container.spec
        paths = container.paths
        # With a v2 fd, clone3 places the init in the v2 cgroup; only the
        # v1 hierarchies (hybrid layout) need a cgroup.procs write.
        if cgroup_fd >= 0:
            joins = container.cgroup.v1_procs_files()
        else:
            joins = container.cgroup.procs_files()
        for procs in joins:
            step(f"join cgroup {procs}", write_file, procs, "0")
        flags = namespaces.unshare_flags(spec.network)
        step("unshare namespaces", native.unshare, flags)
        step("make mounts private", mounts.make_mounts_private)
        step("chdir to sandbox directory", os.chdir, paths.dir)
        step(
            f"mount scratch tmpfs on {paths.scratch}",
            mounts.mount_scratch,
            "scratch",
            spec.scratch_bytes,
        )
        lowers = [paths.layer_link(i) for i in range(len(spec.layers))]
        step(
            f"mount overlay on {paths.root}",
            mounts.mount_overlay,
            "root",
            lowers,
            "scratch",
        )
        step("mount /dev", mounts.mount_dev, "root")
        if spec.network == "none":
            step("bring up loopback", namespaces.bring_up_loopback)
        step("set hostname", namespaces.set_hostname, spec.hostname)
        pid = step(
            "clone3 into a new PID namespace",
            native.clone3,
            native.CLONE_NEWPID | native.CLONE_PARENT,
            cgroup_fd,
        )
        if pid == 0:
            run_init(container, listen_fd, log_fd, step)
        os.write(report_fd, f"pid {pid}\n".encode())
        status = 0
    finally:
        os._exit(status)


def run_init(container, listen_fd, log_fd, step):
    """The container's PID 1: /proc, the root switch, privileges, exec."""
    spec = container.spec
    try:
        step("mount /proc", mounts.mount_proc, "root")
        step("pivot_root into the overlay", mounts.enter_root, "root")
        step("set up stdio", set_up_stdio, listen_fd, log_fd, step)
        step("drop bounding set", privileges.drop_bounding_set)
        step("become nobody", privileges.become_user)
        step("lock privileges", privileges.lock_privileges)
        argv = [
            spec.python,
            "-I",
            "-S",
            GUEST_SERVER,
            "--code",
            spec.code_dir,
            "--listen-fd",
            str(LISTEN_FD),
        ]
        step(
            f"exec {spec.python}", os.execve, spec.python, argv, dict(spec.env)
        )
    finally:
        os._exit(127)


def set_up_stdio(listen_fd, log_fd, step):
    """fd 0 /dev/null, 1 and 2 the sandbox log, 3 the listening socket,
    and nothing else open except the report pipe (close-on-exec)."""
    # Lift both above 3 first so that dup2 into 1..3 cannot clobber one.
    listen_high = os.dup(listen_fd)
    log_high = os.dup(log_fd)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(log_high, 1)
    os.dup2(log_high, 2)
    os.dup2(listen_high, LISTEN_FD)
    keep = {0, 1, 2, LISTEN_FD, step.report_fd}
    for fd in list_fds():
        if fd not in keep:
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno != errno.EBADF:
                    raise


def list_fds():
    return [int(name) for name in os.listdir("/proc/self/fd")]


def write_file(path, text):
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
