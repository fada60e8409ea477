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

import contextlib
import errno
import fcntl
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import struct
import time
from dataclasses import dataclass
from typing import NamedTuple

import prctl

from sockworker import errors
from sockworker.guest import protocol
from sockworker.sandbox import mounts, namespaces, native, privileges
from sockworker.sandbox.cgroups import Limits

log = logging.getLogger(__name__)

GUEST_SERVER = "/opt/sockworker/guest/server.py"
SOCKET_NAME = "sock"
LISTEN_FD = 3

# States of a container's life; destroy() is valid from all of them.
NEW, PREPARED = "new", "prepared"
RUNNING, PAUSED, DESTROYED = "running", "paused", "destroyed"


class SandboxError(errors.WorkerError):
    """Creating or driving a sandbox failed; the message names the step,
    the sandbox and the cause."""

    status = 500
    kind = "sandbox_failed"


@dataclass(frozen=True)
class ContainerSpec:
    """How containers of one backend are made; the layers and environment
    of a particular lambda are given to Container.start()."""

    limits: Limits
    network: str = "none"
    scratch_bytes: int = 64 << 20
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
        self.socket = os.path.join(self.dir, SOCKET_NAME)
        self.log = os.path.join(self.dir, "log")

    def layer_link(self, index):
        return f"l{index}"

    @contextlib.contextmanager
    def short_socket_path(self):
        """The socket's path by way of a directory fd, for bind and
        connect: a Unix socket address holds at most 107 bytes, which a
        deep state directory would exceed."""
        dir_fd = os.open(self.dir, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            yield f"/proc/self/fd/{dir_fd}/{SOCKET_NAME}"
        finally:
            os.close(dir_fd)


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
        self.setup_pid = None
        self.timeout = None
        self.go_fd = -1
        self.report_fd = -1

    def __repr__(self):
        return f"<Container {self.id} pid={self.pid} {self.state}>"

    def create(self, layers, env=None):
        """prepare() then start(): a container ready to serve."""
        self.prepare()
        self.start(layers, env)

    def prepare(self):
        """Everything that does not depend on the lambda: directory,
        cgroups, sockets, and a setup child that has joined the cgroups,
        entered new namespaces and mounted the scratch space, waiting.

        PERF: joining a v1 cgroup can wait for an RCU grace period (10 ms
        and more when the machine was idle), so the backend prepares
        sandboxes ahead of demand and only start() is on the request path.
        """
        try:
            self.prepare_directory()
            self.cgroup.create(self.spec.limits)
            self.spawn_setup_child()
        except BaseException:
            self.destroy()
            raise
        self.state = PREPARED

    def start(self, layers, env=None):
        """Stack layers (topmost first) as the root and run the guest
        server with environment env; returns once connected."""
        if self.state != PREPARED:
            raise SandboxError(f"start sandbox {self.id}: it is {self.state}")
        try:
            self.link_layers(layers)
            self.send_go(len(layers), env or {})
            self.pid = self.parse_report(self.collect_report())
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

    def link_layers(self, layers):
        for index, layer in enumerate(layers):
            link = os.path.join(self.paths.dir, self.paths.layer_link(index))
            os.symlink(layer, link)

    def bind_socket(self):
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with self.paths.short_socket_path() as path:
                listener.bind(path)
            listener.listen(16)
        except OSError as exc:
            listener.close()
            raise SandboxError(
                f"bind socket {self.paths.socket} of sandbox {self.id}: "
                f"{exc.strerror or exc}"
            ) from exc
        return listener

    def spawn_setup_child(self):
        """Fork the setup child. It keeps the read end of the go pipe and
        the write end of the report pipe; the worker keeps the others."""
        listener = self.bind_socket()
        log_fd = os.open(
            self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
        )
        cgroup_fd = -1
        go_r = go_w = report_r = report_w = -1
        try:
            cgroup_fd = self.open_cgroup_fd()
            go_r, go_w = os.pipe()
            report_r, report_w = os.pipe()
            child = os.fork()
            if child == 0:
                run_setup_child(
                    self,
                    SetupFds(
                        listener.fileno(), log_fd, cgroup_fd, go_r, report_w
                    ),
                )
            self.setup_pid = child
            self.go_fd, go_w = go_w, -1
            self.report_fd, report_r = report_r, -1
        finally:
            for fd in (go_r, go_w, report_r, report_w, log_fd, cgroup_fd):
                if fd >= 0:
                    os.close(fd)
            listener.close()

    def send_go(self, layer_count, env):
        message = json.dumps({"layers": layer_count, "env": env}) + "\n"
        try:
            os.write(self.go_fd, message.encode())
        except BrokenPipeError:
            # The setup child is gone; its report says why.
            pass
        finally:
            os.close(self.go_fd)
            self.go_fd = -1

    def collect_report(self):
        try:
            report = read_report(self.report_fd)
        finally:
            os.close(self.report_fd)
            self.report_fd = -1
        self.reap_setup_child()
        return report

    def reap_setup_child(self):
        if self.setup_pid is None:
            return
        try:
            os.waitpid(self.setup_pid, 0)
        except ChildProcessError:
            pass
        self.setup_pid = None

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
            with self.paths.short_socket_path() as path:
                conn.connect(path)
        except OSError as exc:
            conn.close()
            raise SandboxError(
                f"connect to sandbox {self.id} at {self.paths.socket}: "
                f"{exc.strerror or exc}"
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
            self.set_timeout(timeout)
            self.conn.sendall(protocol.encode_request(body))
            return protocol.recv_reply(self.conn)
        except (TimeoutError, BlockingIOError):
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

    def set_timeout(self, timeout):
        """Bound each send and receive by timeout seconds.

        PERF: kernel timeouts (SO_RCVTIMEO) on a blocking socket cost no
        extra system call per receive, where Python's own timeouts poll
        before every recv; an expired one fails with EAGAIN.
        """
        if timeout == self.timeout:
            return
        seconds = int(timeout)
        value = struct.pack("ll", seconds, int((timeout - seconds) * 1e6))
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
        self.conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
        self.timeout = timeout

    def death_reason(self):
        """Why the sandbox stopped answering, in words a caller can act
        on: out of memory, killed by a signal, exited."""
        if self.cgroup.oom_killed():
            return "out of memory"
        status = self.wait_exit(timeout=0.5)
        if status is None:
            return "stopped answering"
        return describe_wait_status(status)

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
        if self.state in (NEW, PREPARED):
            raise SandboxError(f"sandbox {self.id} is not started")

    def alive(self):
        return self.state in (RUNNING, PAUSED) and self.wait_exit(0) is None

    def destroy(self):
        if self.state == DESTROYED:
            return
        previous, self.state = self.state, DESTROYED
        if self.conn is not None:
            self.conn.close()
            self.conn = None
        for fd in (self.go_fd, self.report_fd):
            if fd >= 0:
                os.close(fd)
        self.go_fd = self.report_fd = -1
        try:
            self.cgroup.destroy()
        finally:
            # Closing the go pipe ended a waiting setup child; the cgroup
            # kill ended the rest.
            self.reap_setup_child()
            self.reap()
            remove_tree(self.paths.dir)
        if previous not in (NEW, PREPARED):
            log.info("sandbox %s destroyed, pid %s", self.id, self.pid)

    def reap(self):
        """Collect the init's exit status; the cgroup kill has ended it."""
        if self.pid is None or self.exit_status is not None:
            return
        try:
            _, self.exit_status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            pass


def describe_wait_status(status):
    """A wait status in words: "exited with status N" or "crashed (killed
    by SIGNAME)"."""
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return f"crashed (killed by {name})"
    return f"exited with status {os.WEXITSTATUS(status)}"


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


class SetupFds(NamedTuple):
    """The setup child's fds: what the init inherits (listen, log), the
    v2 cgroup for clone3 (or -1), and the two pipes to the worker."""

    listen: int
    log: int
    cgroup: int
    go: int
    report: int


def run_setup_child(container, fds):
    """First child: cgroups, namespaces and scratch space now; the root
    and the init once the worker says go."""
    status = 127
    try:
        step = Step(fds.report)
        step("close inherited fds", close_fds_except, set(fds) | {0, 1, 2})
        step("set parent-death signal", prctl.set_pdeathsig, signal.SIGKILL)
        join_cgroups(container.cgroup, fds.cgroup, step)
        enter_namespaces(container, step)
        go = step("wait for go", read_go, fds.go)
        if go is None:
            return
        mount_root(container, go["layers"], step)
        pid = step(
            "clone3 into a new PID namespace",
            native.clone3,
            native.CLONE_NEWPID | native.CLONE_PARENT,
            fds.cgroup,
        )
        if pid == 0:
            run_init(container, fds, go["env"], step)
        os.write(fds.report, f"pid {pid}\n".encode())
        status = 0
    finally:
        os._exit(status)


def join_cgroups(cgroup, cgroup_fd, step):
    # With a v2 fd, clone3 places the init in the v2 cgroup; only the v1
    # hierarchies (hybrid layout) need a cgroup.procs write.
    if cgroup_fd >= 0:
        joins = cgroup.v1_procs_files()
    else:
        joins = cgroup.procs_files()
    for procs in joins:
        step(f"join cgroup {procs}", write_file, procs, "0")


def enter_namespaces(container, step):
    spec = container.spec
    flags = namespaces.unshare_flags(spec.network)
    step("unshare namespaces", native.unshare, flags)
    step("make mounts private", mounts.make_mounts_private)
    step("chdir to sandbox directory", os.chdir, container.paths.dir)
    step(
        f"mount scratch tmpfs on {container.paths.scratch}",
        mounts.mount_scratch,
        "scratch",
        spec.scratch_bytes,
    )
    if spec.network == "none":
        step("bring up loopback", namespaces.bring_up_loopback)
    step("set hostname", namespaces.set_hostname, spec.hostname)


def read_go(fd):
    """The worker's go message (one line), or None if it closed the pipe
    instead because the prepared sandbox is being destroyed."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = os.read(fd, 65536)
        if not chunk:
            return None
        data += chunk
    return json.loads(data)


def mount_root(container, layer_count, step):
    paths = container.paths
    lowers = [paths.layer_link(i) for i in range(layer_count)]
    step(
        f"mount overlay on {paths.root}",
        mounts.mount_overlay,
        "root",
        lowers,
        "scratch",
    )
    step("mount /dev", mounts.mount_dev, "root")


def run_init(container, fds, env, step):
    """The container's PID 1: /proc, the root switch, privileges, exec."""
    spec = container.spec
    try:
        step("mount /proc", mounts.mount_proc, "root")
        step("pivot_root into the overlay", mounts.enter_root, "root")
        step("set up stdio", set_up_stdio, fds.listen, fds.log, step)
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
        step(f"exec {spec.python}", os.execve, spec.python, argv, env)
    finally:
        os._exit(127)


def set_up_stdio(listen_fd, log_fd, step):
    """fd 0 /dev/null, 1 and 2 the sandbox log, 3 the listening socket,
    and nothing else open except the report pipe (close-on-exec)."""
    # Lift both to 10 and up first: a dup2 into 0..3 must neither clobber
    # one nor be a same-fd no-op, which would keep close-on-exec set.
    listen_high = fcntl.fcntl(listen_fd, fcntl.F_DUPFD_CLOEXEC, 10)
    log_high = fcntl.fcntl(log_fd, fcntl.F_DUPFD_CLOEXEC, 10)
    null = os.open("/dev/null", os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(log_high, 1)
    os.dup2(log_high, 2)
    os.dup2(listen_high, LISTEN_FD)
    close_fds_except({0, 1, 2, LISTEN_FD, step.report_fd})


def close_fds_except(keep):
    """Close every fd not in keep: a forked child holds copies of all the
    worker's fds (other sandboxes' pipes and connections among them),
    which would keep those open past their owners' close."""
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
