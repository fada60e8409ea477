"""A real worker over real HTTP: fixtures that start `bin/worker` as a
subprocess on a free loopback port, fill a registry folder with lambdas,
and check on teardown that the worker left nothing running.

Every worker a test starts gets its own state directory under the test's
tmp_path (so its own cgroup tree) and shares the base image directory, so
the image is built at most once per session. The teardown stops each
worker with SIGTERM and then fails the test if a process of the worker's
session, a cgroup of its tree or a sandbox directory is still there. When
a test fails, its report carries the worker's output and log.
"""

import http.client
import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import textwrap
import threading
import time

import pytest

from sockworker.sandbox.backend import tree_name
from tests.conftest import IMAGES_DIR, mount_points, sockworker_cgroups

TOP = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
WORKER = os.path.join(TOP, "bin", "worker")

READY_SECONDS = 60.0
STOP_SECONDS = 60.0
# After the worker's master exits, its containers must already be gone;
# this only covers the kernel finishing off killed processes.
GONE_SECONDS = 10.0
LOG_TAIL_BYTES = 20000
NOBODY = 65534

_WORKERS = pytest.StashKey[list]()


# ---------------------------------------------------------------------
# Processes, found through /proc.


def proc_stat(pid):
    """(state, ppid, session, start time) of pid, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces and parentheses: split after the
    # last ")".
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[3]), int(fields[19])


def children_of(pid):
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)],
        capture_output=True,
        text=True,
    ).stdout.split()
    return sorted(int(p) for p in out)


def session_members(sid):
    """Live (not zombie) processes of session sid. The worker is started
    in a new session and nothing in it calls setsid, so this is the
    worker, its gunicorn worker process and every container process,
    whoever their parent is now."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        stat = proc_stat(int(name))
        if stat is not None and stat[2] == sid and stat[0] != "Z":
            found.append(int(name))
    return sorted(found)


def in_own_pid_ns(pid):
    """Whether pid is the init of a PID namespace below ours (its NSpid
    line ends in 1)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except FileNotFoundError:
        pass
    return False


class ProcessRecord:
    """A pid and its start time, so a reused pid is not mistaken for the
    process that was recorded."""

    def __init__(self, pid):
        self.pid = pid
        stat = proc_stat(pid)
        self.start = stat[3] if stat else None

    def running(self):
        stat = proc_stat(self.pid)
        return stat is not None and stat[3] == self.start and stat[0] != "Z"

    def __repr__(self):
        return f"pid {self.pid}"


def wait_until(predicate, seconds, interval=0.05):
    """Poll predicate until it is true or seconds have passed; returns
    its last value."""
    deadline = time.monotonic() + seconds
    while True:
        value = predicate()
        if value or time.monotonic() >= deadline:
            return value
        time.sleep(interval)


# ---------------------------------------------------------------------
# Leftovers of a worker on a state directory.


def tree_cgroups(state_dir):
    """Cgroup directories of the worker tree that belongs to state_dir,
    in every hierarchy: the tree's top and everything below it. Going by
    the tree name keeps other tests' cgroups (which may exist at the same
    time) out of the picture."""
    tree = tree_name(state_dir)
    found = []
    for top in sockworker_cgroups():
        if os.path.basename(top) != tree:
            continue
        for path, _, _ in os.walk(top):
            found.append(path)
    return sorted(found)


def tree_pids(state_dir):
    """Every process in a sandbox or zygote cgroup of state_dir's tree."""
    pids = set()
    for path in tree_cgroups(state_dir):
        procs = os.path.join(path, "cgroup.procs")
        if os.path.basename(path).startswith(("sb-", "zy-")):
            try:
                with open(procs) as f:
                    pids.update(int(line) for line in f if line.strip())
            except FileNotFoundError:
                pass
    return pids


def real_uid(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    return int(line.split()[1])
    except FileNotFoundError:
        pass
    return None


def in_sandbox_cgroup(pid):
    """Whether pid is in a sandbox's cgroup (not a zygote's)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return "/sb-" in f.read()
    except FileNotFoundError:
        return False


def sandbox_dirs(state_dir):
    try:
        return sorted(os.listdir(os.path.join(state_dir, "sandboxes")))
    except FileNotFoundError:
        return []


def mounts_under(*prefixes):
    return [
        point
        for point in mount_points()
        if any(point.startswith(prefix) for prefix in prefixes)
    ]


def remove_cgroups(paths):
    """Last-resort cleanup of cgroups a failed worker left: kill what is
    in them, then remove them, deepest first."""
    for path in sorted(paths, key=lambda p: p.count("/"), reverse=True):
        for pid in read_pids(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda path=path: not read_pids(path), 5)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            print(f"cleanup: rmdir {path}: {exc}", file=sys.stderr)


def read_pids(path):
    try:
        with open(os.path.join(path, "cgroup.procs")) as f:
            return [int(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


# ---------------------------------------------------------------------
# HTTP.


class Reply:
    """One HTTP response: status, headers (lower-case names), body."""

    def __init__(self, status, headers, data):
        self.status = status
        self.headers = headers
        self.data = data

    def json(self):
        return json.loads(self.data)

    def __repr__(self):
        return f"<Reply {self.status} {self.data[:300]!r}>"


def http_request(port, method, path, body=None, headers=None, timeout=30):
    """One request on a fresh connection to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        data = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return Reply(resp.status, headers, data)
    finally:
        conn.close()


def free_port():
    """A TCP port nobody listens on now (the kernel picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------
# The worker.


class Worker:
    """One `bin/worker` subprocess and its config.

    start() returns once the worker printed its listening line and
    answered GET /status, so requests made afterwards reach a loaded
    app. The worker runs in its own session, which is how teardown finds
    every process it made.
    """

    def __init__(self, directory, config):
        self.dir = directory
        self.config = config
        self.config_path = os.path.join(directory, "config.json")
        self.proc = None
        self.stdout = []
        self.stderr = []
        self.listening = threading.Event()
        self.readers = []

    @property
    def port(self):
        return self.config["worker_port"]

    @property
    def pid(self):
        return self.proc.pid

    @property
    def state_dir(self):
        return self.config["state_dir"]

    def start(self):
        return self.launch().start_waiting()

    def start_waiting(self):
        self.wait_listening()
        self.wait_serving()
        return self

    def launch(self):
        """Start the process without waiting for anything."""
        with open(self.config_path, "w") as f:
            json.dump(self.config, f, indent=1)
        self.proc = subprocess.Popen(
            [sys.executable, WORKER, "--config", self.config_path],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        self.readers = [
            self.read_stream(self.proc.stdout, self.stdout, "stdout"),
            self.read_stream(self.proc.stderr, self.stderr, "stderr"),
        ]
        return self

    def read_stream(self, stream, lines, name):
        def read():
            for raw in stream:
                line = raw.decode(errors="replace").rstrip("\n")
                lines.append(line)
                if "sockworker listening on http://" in line:
                    self.listening.set()

        thread = threading.Thread(
            target=read, name=f"worker-{name}", daemon=True
        )
        thread.start()
        return thread

    def wait_listening(self):
        deadline = time.monotonic() + READY_SECONDS
        while not self.listening.wait(0.1):
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with status {self.proc.returncode} "
                    f"before listening; stderr: {self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker printed no listening line in {READY_SECONDS:g} s"
                )

    def wait_serving(self):
        """The listening line comes from gunicorn's master before the
        app is loaded in the worker process; /status answers after."""
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                reply = self.get("/status", timeout=5)
                if reply.status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"worker exited with status {self.proc.returncode} "
                    f"after listening; stderr: {self.stderr_text()}"
                )
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"worker did not answer GET /status in {READY_SECONDS:g} s"
                )
            time.sleep(0.05)

    # -- HTTP ------------------------------------------------------------

    def request(self, method, path, body=None, headers=None, timeout=30):
        return http_request(self.port, method, path, body, headers, timeout)

    def get(self, path, timeout=30):
        return self.request("GET", path, timeout=timeout)

    def run(self, name, event=None, timeout=30, route="run"):
        """POST event (JSON-encoded unless bytes) to /<route>/<name>."""
        if event is None:
            body = b""
        elif isinstance(event, bytes):
            body = event
        else:
            body = json.dumps(event).encode()
        headers = {"Content-Type": "application/json"}
        return self.request("POST", f"/{route}/{name}", body, headers, timeout)

    # -- processes -------------------------------------------------------

    def gunicorn_worker(self):
        """The pid of the gunicorn worker process that owns the sandboxes
        (the master's only child)."""
        children = children_of(self.pid)
        assert len(children) == 1, f"master children: {children}"
        return children[0]

    def sandbox_pids(self):
        """Every child of the gunicorn worker process (fresh container
        inits, made with CLONE_PARENT, and setup children of prepared
        sandboxes) and every process in the worker's sandbox and zygote
        cgroups (sandboxes forked from zygotes are not its children)."""
        children = set(children_of(self.gunicorn_worker()))
        return sorted(children | tree_pids(self.state_dir))

    def container_pids(self):
        """The inits of started sandboxes only: PID 1 of a PID namespace
        of their own, in a sandbox's cgroup (zygotes are inits too, in
        their own), running as nobody (the init of a sandbox forked ahead
        of demand is still root of its zygote's user namespace)."""
        return [
            pid
            for pid in self.sandbox_pids()
            if in_own_pid_ns(pid)
            and in_sandbox_cgroup(pid)
            and real_uid(pid) == NOBODY
        ]

    def session(self):
        return session_members(self.pid)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def send(self, signum):
        self.proc.send_signal(signum)

    def wait(self, timeout=STOP_SECONDS):
        """Wait for the master to exit; returns its status. The readers
        end when the pipes close, which may be later if a process of the
        worker kept them open."""
        status = self.proc.wait(timeout)
        for reader in self.readers:
            reader.join(2)
        return status

    def stop(self, signum=signal.SIGTERM):
        self.send(signum)
        return self.wait()

    # -- output ----------------------------------------------------------

    def stderr_text(self):
        return "\n".join(self.stderr)

    def log_text(self):
        try:
            with open(self.config["log_output"], "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - LOG_TAIL_BYTES))
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return "(no log file)"

    def report(self):
        status = None if self.proc is None else self.proc.poll()
        return (
            f"config: {json.dumps(self.config)}\n"
            f"exit status: {status}\n"
            f"--- stdout\n" + "\n".join(self.stdout) + "\n"
            f"--- stderr\n{self.stderr_text()}\n"
            f"--- log (tail)\n{self.log_text()}"
        )


def default_config(tmp_path, registry_dir, index):
    return {
        "sandbox": "sock",
        "worker_host": "127.0.0.1",
        "worker_port": free_port(),
        "state_dir": str(tmp_path / "state"),
        "images_dir": IMAGES_DIR,
        "log_output": str(tmp_path / f"worker-{index}.log"),
        "registry": registry_dir,
        "timeout_seconds": 5,
        "memory_mb": 64,
        "keep_warm_seconds": 60,
    }


def stop_and_check(worker):
    """Stop worker if it runs; return the leftovers its session left."""
    problems = []
    if worker.proc is None:
        return problems
    sid = worker.pid
    if worker.running():
        worker.send(signal.SIGTERM)
        try:
            worker.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            problems.append(
                f"worker {sid} still running {STOP_SECONDS:g} s after SIGTERM"
            )
    left = wait_until(lambda: not session_members(sid), GONE_SECONDS)
    if not left:
        pids = session_members(sid)
        problems.append(f"processes of worker {sid} left running: {pids}")
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    worker.proc.wait(5)
    for stream in (worker.proc.stdout, worker.proc.stderr):
        stream.close()
    return problems


# ---------------------------------------------------------------------
# Fixtures.


class LambdaRegistry:
    """A registry folder that tests fill with lambdas, in the three forms
    the registry reads: a folder with f.py, <name>.py, <name>.tar.gz."""

    def __init__(self, path):
        self.path = path
        os.makedirs(path, exist_ok=True)

    def __str__(self):
        return str(self.path)

    def add(self, name, source, form="folder"):
        source = textwrap.dedent(source).lstrip("\n")
        if form == "folder":
            folder = os.path.join(self.path, name)
            os.makedirs(folder, exist_ok=True)
            self.write(os.path.join(folder, "f.py"), source)
        elif form == "file":
            self.write(os.path.join(self.path, f"{name}.py"), source)
        elif form == "tarball":
            self.write_tarball(
                os.path.join(self.path, f"{name}.tar.gz"), source
            )
        else:
            raise ValueError(f"unknown lambda form {form!r}")

    @staticmethod
    def write(path, text):
        # Write and rename, so a running worker never reads half a file.
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, path)

    @staticmethod
    def write_tarball(path, source):
        data = source.encode()
        info = tarfile.TarInfo("f.py")
        info.size = len(data)
        info.mode = 0o644
        info.mtime = int(time.time())
        with tarfile.open(path, "w:gz") as tar:
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def registry(tmp_path):
    return LambdaRegistry(str(tmp_path / "registry"))


@pytest.fixture
def start_worker(request, tmp_path, registry, base_image):
    """start_worker(**config) -> a serving Worker.

    Config fields given override the test defaults (state_dir under
    tmp_path, the shared images_dir, a free port, the `registry`
    fixture's folder, timeout_seconds 5, memory_mb 64). On teardown every
    worker is stopped and the test fails if a process, cgroup, sandbox
    directory or mount of it remains.
    """
    workers = []
    request.node.stash[_WORKERS] = workers
    mounts_before = set(mount_points())

    def launch(**overrides):
        config = default_config(tmp_path, str(registry), len(workers))
        config.update(overrides)
        worker = Worker(str(tmp_path), config)
        workers.append(worker)
        return worker.launch()

    def start(**overrides):
        return launch(**overrides).start_waiting()

    # For tests that expect a worker may refuse to start.
    start.launch = launch
    yield start

    problems = []
    for worker in workers:
        problems += stop_and_check(worker)
    for state_dir in sorted({w.state_dir for w in workers}):
        cgroups = tree_cgroups(state_dir)
        if cgroups:
            problems.append(f"cgroups left: {cgroups}")
            remove_cgroups(cgroups)
        dirs = sandbox_dirs(state_dir)
        if dirs:
            problems.append(f"sandbox directories left in {state_dir}")
    # Containers mount only inside their own mount namespaces; anything
    # new here under the test's paths or the images is the worker's.
    new_mounts = sorted(set(mount_points()) - mounts_before)
    ours = [m for m in new_mounts if m.startswith((str(tmp_path), IMAGES_DIR))]
    if ours:
        problems.append(f"mounts left: {ours}")
    if problems:
        pytest.fail("worker left behind: " + "; ".join(problems))


@pytest.fixture
def worker(start_worker):
    """A worker with the test defaults."""
    return start_worker()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Attach each worker's output and log to a failed test's report."""
    outcome = yield
    report = outcome.get_result()
    if not report.failed:
        return
    for index, worker in enumerate(item.stash.get(_WORKERS, [])):
        report.sections.append((f"worker {index}", worker.report()))
