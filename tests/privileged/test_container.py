"""SOCK containers on the real kernel: isolation, limits, lifecycle and
leaks. Every test runs under the leak check of tests/conftest.py."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from sockworker import errors
from sockworker.guest import protocol
from sockworker.sandbox.backend import SockBackend
from sockworker.sandbox.cgroups import Limits
from sockworker.sandbox.container import SandboxError

pytestmark = pytest.mark.privileged

PROBE = """
import os, socket

def environ():
    # Python's start-up sets LC_CTYPE=C.UTF-8 itself when the locale is
    # C (PEP 538): that one is the interpreter's, not the worker's.
    seen = dict(os.environ)
    if seen.get("LC_CTYPE") == "C.UTF-8":
        del seen["LC_CTYPE"]
    return seen

def f(event):
    def attempt(action):
        try:
            action()
            return "ok"
        except OSError as exc:
            return type(exc).__name__

    def write_base():
        with open("/usr/lib/os-release", "a") as f:
            f.write("x")

    def write_tmp():
        with open("/tmp/probe", "w") as f:
            f.write("x")

    with open("/proc/self/status") as f:
        caps = {
            line.split(":")[0]: line.split()[1]
            for line in f if line.startswith("Cap")
        }
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split() for line in f]
    return {
        "pid": os.getpid(),
        "uid": os.getuid(),
        "hostname": socket.gethostname(),
        "procs": sorted(int(p) for p in os.listdir("/proc") if p.isdigit()),
        "mount_points": [m[4] for m in mounts],
        "mount_lines": [" ".join(m) for m in mounts],
        "write_base": attempt(write_base),
        "write_tmp": attempt(write_tmp),
        "caps": caps,
        "interfaces": [name for _, name in socket.if_nameindex()],
        "environ": environ(),
        "event": event,
    }
"""


def make_lambda(tmp_path, name, source):
    layer = tmp_path / "lambdas" / name
    (layer / "handler").mkdir(parents=True)
    (layer / "handler" / "f.py").write_text(textwrap.dedent(source))
    return str(layer)


@pytest.fixture(params=["fresh", "forked"])
def backend(request, tmp_path, base_image, leak_check):
    """A started backend whose sandboxes start fresh or are forked from
    zygotes (the import cache): every test here runs against both."""
    state = tmp_path / "state"
    state.mkdir()
    backend = SockBackend(
        str(state),
        base_image,
        Limits(memory_bytes=64 << 20, pids=32),
        import_cache=request.param == "forked",
    )
    backend.start()
    created = []
    original = backend.create

    def create(code_root, env=None):
        container = original(code_root, env)
        created.append(container)
        return container

    backend.create = create
    yield backend
    for container in created:
        container.destroy()
    backend.close()


def call(container, event, timeout=10):
    status, payload = container.request(json.dumps(event).encode(), timeout)
    return status, json.loads(payload)


def test_isolation_seen_from_inside(tmp_path, backend, base_image):
    container = backend.create(make_lambda(tmp_path, "probe", PROBE))

    status, seen = call(container, {"nested": {"a": [1, 2, None]}})

    assert status == protocol.REPLY_OK, seen
    assert seen["event"] == {"nested": {"a": [1, 2, None]}}
    assert seen["pid"] == 1
    assert seen["procs"] == [1]
    assert seen["uid"] == 65534
    assert seen["hostname"] != socket.gethostname()
    # A forked sandbox's /dev lives in its root's writable layer.
    assert sorted(seen["mount_points"]) in (
        ["/", "/dev", "/proc"],
        ["/", "/proc"],
    )
    host_paths = [str(tmp_path), base_image, os.getcwd(), "/var/lib/"]
    for line in seen["mount_lines"]:
        for path in host_paths:
            assert path not in line, f"host path {path} in {line}"
    assert seen["write_base"] == "PermissionError"
    assert seen["write_tmp"] == "ok"
    assert set(seen["caps"].values()) == {"0000000000000000"}
    assert len(seen["caps"]) == 5
    assert seen["interfaces"] == ["lo"]
    assert seen["environ"] == {}


def test_declared_environment_only(tmp_path, backend):
    container = backend.create(
        make_lambda(tmp_path, "probe", PROBE), env={"GREETING": "hi"}
    )
    _, seen = call(container, {})
    assert seen["environ"] == {"GREETING": "hi"}


def test_host_network_mode(tmp_path, backend):
    backend.network = "host"
    container = backend.create(make_lambda(tmp_path, "probe", PROBE))
    _, seen = call(container, {})
    host = sorted(name for _, name in socket.if_nameindex())
    assert sorted(seen["interfaces"]) == host


def test_handler_exception_is_structured(tmp_path, backend):
    container = backend.create(
        make_lambda(
            tmp_path,
            "boom",
            """
        def f(event):
            raise ValueError("bad " + event["what"])
    """,
        )
    )
    status, reply = call(container, {"what": "input"})
    assert status == protocol.REPLY_ERROR
    assert reply["error"] == "handler_error"
    assert "ValueError: bad input" in reply["message"]
    assert 'raise ValueError("bad " + event["what"])' in reply["traceback"]
    # The sandbox keeps serving after a handler error.
    status, _ = call(container, {"what": "again"})
    assert status == protocol.REPLY_ERROR


def test_handler_output_goes_to_log(tmp_path, backend):
    container = backend.create(
        make_lambda(
            tmp_path,
            "chatty",
            """
        import sys
        def f(event):
            print("to stdout", event)
            print("to stderr", file=sys.stderr)
            return "done"
    """,
        )
    )
    status, reply = call(container, {"n": 1})
    assert (status, reply) == (protocol.REPLY_OK, "done")
    with open(container.paths.log) as f:
        logged = f.read()
    assert "to stdout {'n': 1}" in logged
    assert "to stderr" in logged


def test_memory_limit_kills_and_reports_oom(tmp_path, backend):
    container = backend.create(
        make_lambda(
            tmp_path,
            "hog",
            """
        def f(event):
            chunks = []
            for _ in range(200):
                chunks.append(bytearray(1 << 20))
            return len(chunks)
    """,
        )
    )
    with pytest.raises(errors.SandboxDied) as caught:
        call(container, {})
    assert caught.value.details["reason"] == "out of memory"
    # The host and the backend carry on: a new sandbox works.
    other = backend.create(make_lambda(tmp_path, "probe", PROBE))
    assert call(other, {})[0] == protocol.REPLY_OK


def test_fork_bomb_stops_at_pids_limit(tmp_path, backend):
    container = backend.create(
        make_lambda(
            tmp_path,
            "bomb",
            """
        import os, time
        def f(event):
            children, refused = [], 0
            for _ in range(200):
                try:
                    pid = os.fork()
                except BlockingIOError:
                    refused += 1
                    continue
                if pid == 0:
                    time.sleep(30)
                    os._exit(0)
                children.append(pid)
            return {"children": len(children), "refused": refused}
    """,
        )
    )
    status, reply = call(container, {}, timeout=30)
    assert status == protocol.REPLY_OK
    assert reply["children"] < 32
    assert reply["refused"] > 0
    assert len(container.cgroup.pids()) <= 32
    container.destroy()
    assert os.path.exists(f"/proc/{os.getpid()}")


def test_timeout_destroys_sandbox(tmp_path, backend):
    container = backend.create(
        make_lambda(
            tmp_path,
            "slow",
            """
        import time
        def f(event):
            time.sleep(60)
    """,
        )
    )
    with pytest.raises(errors.HandlerTimeout):
        call(container, {}, timeout=0.5)
    assert container.state == "destroyed"
    with pytest.raises(SandboxError):
        call(container, {})


def test_pause_freezes_and_request_unpauses(tmp_path, backend):
    container = backend.create(make_lambda(tmp_path, "probe", PROBE))
    container.pause()
    assert wait_until_frozen(container)
    assert call(container, {"after": "pause"})[1]["event"] == {
        "after": "pause"
    }
    assert container.state == "running"


def wait_until_frozen(container, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if frozen(container):
            return True
        time.sleep(0.01)
    return False


def frozen(container):
    for path in container.cgroup.dirs():
        events = os.path.join(path, "cgroup.events")
        if os.path.exists(events):
            with open(events) as f:
                return "frozen 1" in f.read()
    return False


def test_destroy_is_idempotent_from_any_state(tmp_path, backend):
    container = backend.create(make_lambda(tmp_path, "probe", PROBE))
    container.destroy()
    container.destroy()
    assert not os.path.exists(container.paths.dir)
    with pytest.raises(SandboxError):
        container.pause()


def test_failed_create_leaves_nothing(tmp_path, backend):
    with pytest.raises(SandboxError) as caught:
        backend.create(str(tmp_path / "does-not-exist"))
    assert "mount overlay" in str(caught.value)
    backend.close()
    assert os.listdir(backend.sandboxes_dir) == []
    assert backend.tree.leftover_ids() == []


def test_two_hundred_containers_leave_nothing(tmp_path, backend):
    code = make_lambda(
        tmp_path,
        "echo",
        """
        def f(event):
            return event
    """,
    )
    for i in range(200):
        container = backend.create(code)
        assert call(container, {"i": i}) == (protocol.REPLY_OK, {"i": i})
        container.destroy()
    backend.close()
    assert os.listdir(backend.sandboxes_dir) == []
    assert backend.tree.leftover_ids() == []


HOLDER = """
import sys, time
from sockworker.sandbox.backend import SockBackend
from sockworker.sandbox.cgroups import Limits

state, image, code = sys.argv[1:4]
backend = SockBackend(state, image, Limits(memory_bytes=64 << 20, pids=32))
backend.start()
containers = [backend.create(code) for _ in range(3)]
print(" ".join(str(c.pid) for c in containers), flush=True)
time.sleep(600)
"""


def test_sweep_after_sigkill(tmp_path, base_image, leak_check):
    state = tmp_path / "state"
    state.mkdir()
    code = make_lambda(tmp_path, "echo", "def f(event):\n    return 1\n")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state), base_image, code],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        pids = [int(p) for p in holder.stdout.readline().split()]
        assert len(pids) == 3
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()

    backend = SockBackend(
        str(state), base_image, Limits(memory_bytes=64 << 20, pids=32)
    )
    # The three started sandboxes have both a cgroup and a directory; one
    # the holder's spawner was preparing when it was killed may have
    # only its directory so far.
    cgroups = set(backend.tree.leftover_ids())
    dirs = set(os.listdir(state / "sandboxes"))
    assert len(cgroups & dirs) >= 3
    assert len(cgroups ^ dirs) <= 1
    swept = backend.sweep()
    assert set(swept) == cgroups | dirs
    assert all_gone(pids)
    assert os.listdir(state / "sandboxes") == []
    assert backend.tree.leftover_ids() == []
    backend.close()


def all_gone(pids, timeout=2.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{pid}") for pid in pids):
            return True
        time.sleep(0.02)
    return False
