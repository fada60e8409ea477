"""The import cache: a tree of zygotes keyed by package sets, and the
sandboxes forked from them.

The root zygote has imported no packages. A lambda whose packages are P
gets its sandbox from the zygote for exactly P, made on first use by
forking the deepest existing zygote whose packages are a subset of P and
importing the rest. Each zygote keeps one child forked ahead of demand
(cgroups joined, namespaces entered), so a cold start pays for the root
filesystem, one clone3 and the handler's import, not for a cgroup move's
RCU grace period.

A zygote that died is replaced on next use; one that has not forked for
`keep_seconds` is destroyed. Everything lives under the backend's
sandboxes directory and cgroup tree, so the backend's sweep covers it.
"""

import glob
import json
import logging
import os
import socket
import threading
import time

from sockworker.sandbox import mounts
from sockworker.sandbox.container import (
    PREPARED,
    RUNNING,
    Container,
    SandboxError,
    describe_wait_status,
    new_sandbox_id,
)
from sockworker.zygote.zygote import (
    Zygote,
    create_root_zygote,
    new_zygote_id,
)

log = logging.getLogger(__name__)


class ForkedSandbox(Container):
    """A sandbox forked from a zygote; the same interface and the same
    isolation as a Container, but its init is the zygote's child, so
    liveness and death come from its cgroup, not from waitpid."""

    def __init__(self, sandbox_id, spec, cgroup, sandboxes_dir, zygote):
        super().__init__(sandbox_id, spec, cgroup, sandboxes_dir)
        self.zygote = zygote
        self.channel = None
        self.scratch_fd = -1
        self.listener = None
        self.log_fd = -1
        # The init's "started" is read after the first reply, not waited
        # for (see start).
        self.unconfirmed = False

    def prepare(self):
        """Cgroups, socket, log and a forked child of the zygote,
        waiting."""
        try:
            self.prepare_directory()
            self.cgroup.create(self.spec.limits)
            self.listener = self.bind_socket()
            self.log_fd = os.open(
                self.paths.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600
            )
            self.scratch_fd = mounts.make_detached_scratch(
                self.spec.scratch_bytes
            )
            self.channel, child_end = socket.socketpair()
            try:
                self.zygote.request_fork(
                    child_end.fileno(),
                    self.cgroup,
                    self.spec.network,
                    self.spec.hostname,
                )
            finally:
                child_end.close()
        except BaseException:
            self.destroy()
            raise
        self.state = PREPARED

    def start(self, layers, env=None, mode="sandbox", extra=None):
        if self.state != PREPARED:
            raise SandboxError(f"start sandbox {self.id}: it is {self.state}")
        try:
            self.await_ready()
            self.send_go(layers, env or {}, mode, extra or {})
            if mode == "sandbox":
                self.connect()
                self.unconfirmed = True
            else:
                self.await_started()
            self.state = RUNNING
        except BaseException:
            self.destroy()
            raise
        log.info("sandbox %s forked from zygote %s", self.id, self.zygote.id)

    def request(self, body, timeout):
        """As for a Container. The first request goes out while the init
        is still entering its root: the worker bound the listening socket,
        so the connection waits in its backlog, and a start that fails
        ends the init, which closes the socket and fails the request with
        the step that failed as its reason.

        PERF: not waiting for "started" spares a cold start a round trip
        between the worker and the init, two wake-ups of an idle CPU.
        """
        reply = super().request(body, timeout)
        if self.unconfirmed:
            # The init said "started" before it served, so the line is
            # there now; reading it keeps alive()'s peek meaningful.
            self.await_started()
            self.unconfirmed = False
        return reply

    def await_ready(self):
        line = read_line(self.channel)
        if line != "ready":
            raise SandboxError(
                f"fork sandbox {self.id} from zygote {self.zygote.id}: "
                f"{describe_failure(line)}"
            )

    def send_go(self, layers, env, mode, extra):
        # PERF: the scratch fd stays open until destroy(): dropping the last
        # reference to a detached mount unmounts it, which waits for an
        # RCU grace period; the overlay holds the tmpfs either way.
        try:
            root_fd = mounts.mount_detached_overlay(layers, self.scratch_fd)
        except OSError as exc:
            raise SandboxError(
                f"mount overlay root of sandbox {self.id}: {exc}"
            ) from exc
        work = extra.pop("work_socket", None) or self.listener
        try:
            message = json.dumps(
                {"mode": mode, "env": env, "code_dir": "/handler", **extra}
            ).encode()
            socket.send_fds(
                self.channel,
                [message],
                [root_fd, work.fileno(), self.log_fd],
            )
        finally:
            os.close(root_fd)
            if work is not self.listener:
                work.close()  # a child zygote's end of its control socket
            self.close_host_ends()

    def await_started(self):
        """The init says "started" once it serves; anything else on the
        channel first is a failure report."""
        line = read_line(self.channel)
        if line != "started":
            raise SandboxError(
                f"fork sandbox {self.id} from zygote {self.zygote.id}: "
                f"{describe_failure(line)}"
            )

    def alive(self):
        """Running until the init's parent has reported its end.

        PERF: a poll of the channel, not a read of cgroup files: the
        manager asks after every request.
        """
        if self.state not in (RUNNING, "paused") or self.channel is None:
            return False
        try:
            self.channel.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    def death_reason(self):
        """Why the sandbox stopped answering, in the same words as for a
        fresh container: the init's parent reports its wait status, or
        the init a step of its start that failed."""
        if self.cgroup.oom_killed():
            return "out of memory"
        if self.unconfirmed:
            line = self.line_from_channel(timeout=0.5)
            if line is not None and line != "started":
                return f"start failed: {describe_failure(line)}"
        status = self.exit_status_from_channel(timeout=0.5)
        if status is None:
            return "stopped answering"
        return describe_wait_status(status)

    def exit_status_from_channel(self, timeout):
        line = self.line_from_channel(timeout)
        if line is None:
            return None
        kind, _, value = line.partition(" ")
        return int(value) if kind == "exit" and value.isdigit() else None

    def line_from_channel(self, timeout):
        if self.channel is None:
            return None
        self.channel.settimeout(timeout)
        try:
            return read_line(self.channel)
        except (TimeoutError, OSError):
            return None

    def close_host_ends(self):
        """The listener and log belong to the init once sent."""
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        if self.log_fd >= 0:
            os.close(self.log_fd)
            self.log_fd = -1

    def close_scratch(self):
        if self.scratch_fd >= 0:
            os.close(self.scratch_fd)
            self.scratch_fd = -1

    def destroy(self):
        if self.channel is not None:
            self.channel.close()
            self.channel = None
        self.close_host_ends()
        self.close_scratch()
        super().destroy()


def read_line(sock):
    """One line from sock, and nothing of the next: each line on the
    channel is a message of its own."""
    data = b""
    while True:
        chunk = sock.recv(4096, socket.MSG_PEEK)
        if not chunk:
            break
        end = chunk.find(b"\n")
        data += sock.recv(len(chunk) if end < 0 else end + 1)
        if end >= 0:
            break
    return data.decode(errors="replace").strip()


def read_all(sock):
    chunks = []
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return b"".join(chunks).decode(errors="replace")
        chunks.append(chunk)


def describe_failure(line):
    if not line:
        return "the zygote's child ended without a word"
    kind, _, rest = line.partition(" ")
    if kind == "error":
        step, _, cause = rest.partition("\t")
        return f"{step}: {cause}"
    return line


def import_names(layer):
    """Top-level modules of the package in layer, from its dist-info."""
    pattern = os.path.join(
        layer, "opt", "sockworker", "packages", "*.dist-info", "top_level.txt"
    )
    names = []
    for path in glob.glob(pattern):
        with open(path) as f:
            names.extend(line.strip() for line in f if line.strip())
    if not names:
        dist = glob.glob(
            os.path.join(layer, "opt", "sockworker", "packages", "*.dist-info")
        )
        for path in dist:
            names.append(os.path.basename(path).split("-")[0].lower())
    return [name for name in names if name.isidentifier()]


class ZygoteCache:
    """The zygote tree of one backend. Thread-safe.

    Guarantees: create() returns a running sandbox forked from the zygote
    for exactly the given packages, replacing dead zygotes on the way;
    close() destroys every zygote and prepared child.
    """

    def __init__(self, backend, keep_seconds=300.0):
        self.backend = backend
        self.keep_seconds = keep_seconds
        self.zygotes = {}
        self.prepared = {}
        self.last_used = {}
        self.lock = threading.Lock()
        self.closed = False
        # Set when no root zygote can be made on this host (no user
        # namespaces, say): the backend then starts sandboxes fresh.
        self.broken = False

    def create(self, code_root, env, packages):
        """A sandbox for code_root with package layers `packages`."""
        key = frozenset(packages)
        for attempt in (1, 2):
            zygote = self.zygote_for(key)
            try:
                sandbox = self.take_prepared(zygote) or self.fork(zygote)
                self.backend.wanted.set()
                layers = (
                    code_root,
                    *packages,
                    self.backend.guest_layer,
                    self.backend.image_path,
                )
                sandbox.start(layers, env)
                return sandbox
            except SandboxError:
                if attempt == 2 or zygote.alive():
                    raise
                log.warning("zygote %s died; replacing it", zygote.id)
                self.forget(zygote)

    def zygote_for(self, key):
        with self.lock:
            zygote = self.zygotes.get(key)
            if zygote is not None and zygote.alive():
                self.last_used[key] = time.monotonic()
                return zygote
            if zygote is not None:
                self.forget_locked(zygote)
            zygote = self.make_zygote(key)
            self.zygotes[key] = zygote
            self.last_used[key] = time.monotonic()
            return zygote

    def make_zygote(self, key):
        """The zygote for key: the root from nothing, others forked from
        the deepest live zygote whose packages key includes."""
        backend = self.backend
        zygote_id = new_zygote_id()
        parent = self.parent_for(key)
        zygote = Zygote(
            zygote_id,
            key,
            backend.tree.sandbox(zygote_id),
            backend.sandboxes_dir,
            parent,
        )
        names = []
        for layer in sorted(key):
            names.extend(import_names(layer))
        zygote.import_names = tuple(names)
        layers = (*sorted(key), backend.guest_layer, backend.image_path)
        if parent is None:
            try:
                create_root_zygote(
                    zygote,
                    layers,
                    backend.zygote_limits,
                    backend.spec.scratch_bytes,
                    backend.spec.network,
                )
            except BaseException as exc:
                zygote.destroy()
                if isinstance(exc, SandboxError):
                    log.error(
                        "import cache off: cannot make the root zygote "
                        "(%s); sandboxes start fresh from now on",
                        exc,
                    )
                    self.broken = True
                raise
        else:
            self.fork_zygote(parent, zygote, layers)
        return zygote

    def parent_for(self, key):
        if not key:
            return None
        best = None
        for other_key, zygote in self.zygotes.items():
            if other_key < key and zygote.alive():
                if best is None or len(other_key) > len(best[0]):
                    best = (other_key, zygote)
        if best is not None:
            return best[1]
        root = self.zygotes.get(frozenset())
        if root is None or not root.alive():
            root = self.make_zygote(frozenset())
            self.zygotes[frozenset()] = root
            self.last_used[frozenset()] = time.monotonic()
        return root

    def fork_zygote(self, parent, zygote, layers):
        """Fork `zygote` from parent: a child that keeps its privileges
        and imports zygote's extra packages."""
        child = ForkedSandbox(
            zygote.id,
            self.backend.zygote_spec,
            zygote.cgroup,
            self.backend.sandboxes_dir,
            parent,
        )
        child.prepare()
        host_end, zygote_end = socket.socketpair()
        try:
            child.start(
                layers,
                {},
                mode="zygote",
                extra={
                    "work_socket": zygote_end,
                    "packages": list(zygote.import_names),
                },
            )
        except BaseException:
            host_end.close()
            raise
        zygote.control = host_end
        # The zygote is now the child's init; its directory and cgroup
        # belong to the Zygote object, only the scratch fd is the child's.
        child.close_scratch()
        child.state = "handed over"
        log.info(
            "zygote %s forked from %s (packages: %s)",
            zygote.id,
            parent.id,
            ", ".join(zygote.import_names) or "none",
        )

    def fork(self, zygote):
        sandbox_id = new_sandbox_id()
        sandbox = ForkedSandbox(
            sandbox_id,
            self.backend.spec,
            self.backend.tree.sandbox(sandbox_id),
            self.backend.sandboxes_dir,
            zygote,
        )
        sandbox.prepare()
        return sandbox

    def take_prepared(self, zygote):
        with self.lock:
            sandbox = self.prepared.pop(zygote.id, None)
        if sandbox is not None and sandbox.spec != self.backend.spec:
            sandbox.destroy()
            return None
        return sandbox

    def keep_prepared(self):
        """Called by the backend's spawner thread: one forked child
        waiting per live zygote."""
        with self.lock:
            wanted = [
                z
                for z in self.zygotes.values()
                if z.alive() and z.id not in self.prepared
            ]
        for zygote in wanted:
            try:
                sandbox = self.fork(zygote)
            except SandboxError:
                log.exception("preparing a child of zygote %s", zygote.id)
                continue
            with self.lock:
                if self.closed or zygote.id in self.prepared:
                    sandbox.destroy()
                else:
                    self.prepared[zygote.id] = sandbox

    def expire(self):
        """Destroy zygotes that have not forked for keep_seconds."""
        now = time.monotonic()
        with self.lock:
            idle = [
                self.zygotes[key]
                for key, used in self.last_used.items()
                if key in self.zygotes and now - used >= self.keep_seconds
            ]
        for zygote in idle:
            self.forget(zygote)

    def forget(self, zygote):
        with self.lock:
            self.forget_locked(zygote)

    def forget_locked(self, zygote):
        """Destroy zygote and, since they die with it, its descendants."""
        doomed = [zygote] + [
            z for z in self.zygotes.values() if descends_from(z, zygote)
        ]
        for victim in doomed:
            self.zygotes.pop(victim.packages, None)
            self.last_used.pop(victim.packages, None)
            prepared = self.prepared.pop(victim.id, None)
            if prepared is not None:
                prepared.destroy()
            victim.destroy()

    def memory_limit_total(self):
        with self.lock:
            return len(self.zygotes) * self.backend.zygote_limits.memory_bytes

    def reset(self):
        """Destroy every zygote; the next create() starts a new tree."""
        self.close()
        with self.lock:
            self.closed = False

    def close(self):
        with self.lock:
            self.closed = True
            zygotes = list(self.zygotes.values())
            prepared = list(self.prepared.values())
            self.zygotes.clear()
            self.prepared.clear()
        for sandbox in prepared:
            sandbox.destroy()
        for zygote in zygotes:
            zygote.destroy()


def descends_from(zygote, ancestor):
    parent = zygote.parent
    while parent is not None:
        if parent is ancestor:
            return True
        parent = parent.parent
    return False
