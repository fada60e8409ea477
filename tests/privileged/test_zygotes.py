"""The import cache on the real kernel: sandboxes forked from zygotes that
imported numpy, zygotes that die, and many cold starts without leaks.
(The isolation checks of test_container.py run against forked sandboxes
too: its backend fixture is parametrised.)"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from sockworker import errors
from sockworker.guest import protocol
from sockworker.packages import PackageStore, install_backend_factory
from sockworker.sandbox.backend import SockBackend
from sockworker.sandbox.cgroups import Limits

pytestmark = pytest.mark.privileged

NUMPY_PROBE = """
import sys
import numpy

def f(event):
    return {
        "version": numpy.__version__,
        "sum": int(numpy.arange(event["n"]).sum()),
        "preloaded": "numpy" in sys.modules,
        "file": numpy.__file__,
    }
"""

ECHO = "def f(event):\n    return event\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory, base_image):
    """A package store shared by the module: numpy installs once."""
    state = tmp_path_factory.mktemp("pkgstate")
    store = PackageStore(
        str(state / "packages"),
        install_backend_factory(str(state / "installs"), base_image),
    )
    yield store
    store.sweep()


@pytest.fixture
def backend(tmp_path, base_image, leak_check):
    state = tmp_path / "state"
    state.mkdir()
    backend = SockBackend(
        str(state),
        base_image,
        Limits(memory_bytes=256 << 20, pids=64),
        import_cache=True,
    )
    backend.start()
    yield backend
    backend.close()


def make_lambda(tmp_path, name, source):
    layer = tmp_path / "lambdas" / name
    (layer / "handler").mkdir(parents=True)
    (layer / "handler" / "f.py").write_text(textwrap.dedent(source))
    return str(layer)


def call(sandbox, event):
    status, payload = sandbox.request(json.dumps(event).encode(), 30)
    return status, json.loads(payload)


def layers(packages):
    return [package.layer for package in packages]


def test_numpy_lambda_answers_from_a_numpy_zygote(tmp_path, backend, store):
    numpy = layers(store.resolve(("numpy==1.26.4",)))
    code = make_lambda(tmp_path, "np", NUMPY_PROBE)

    first = backend.create(code, packages=numpy)
    second = backend.create(code, packages=numpy)
    try:
        for sandbox in (first, second):
            status, seen = call(sandbox, {"n": 10})
            assert status == protocol.REPLY_OK, seen
            assert seen["sum"] == 45
            assert seen["version"] == "1.26.4"
            assert seen["file"].startswith("/opt/sockworker/packages/")
    finally:
        first.destroy()
        second.destroy()
    zygotes = backend.zygotes.zygotes
    assert set(zygotes) == {frozenset(), frozenset(numpy)}
    numpy_zygote = zygotes[frozenset(numpy)]
    assert numpy_zygote.parent is zygotes[frozenset()]
    assert "numpy" in numpy_zygote.import_names
    assert first.zygote is numpy_zygote


def test_two_numpy_versions_each_see_their_own(tmp_path, backend, store):
    code = make_lambda(tmp_path, "np", NUMPY_PROBE)
    seen = {}
    for version in ("1.26.4", "1.25.2"):
        packages = layers(store.resolve((f"numpy=={version}",)))
        sandbox = backend.create(code, packages=packages)
        try:
            status, reply = call(sandbox, {"n": 4})
        finally:
            sandbox.destroy()
        assert status == protocol.REPLY_OK, reply
        seen[version] = reply["version"]
    assert seen == {"1.26.4": "1.26.4", "1.25.2": "1.25.2"}
    assert len(backend.zygotes.zygotes) == 3


def test_killed_zygote_is_replaced_and_no_request_is_lost(tmp_path, backend):
    code = make_lambda(tmp_path, "echo", ECHO)
    answers = []
    for round_ in range(3):
        sandbox = backend.create(code)
        try:
            answers.append(call(sandbox, {"round": round_})[1])
        finally:
            sandbox.destroy()
        root = backend.zygotes.zygotes[frozenset()]
        for pid in root.cgroup.pids():
            os.kill(pid, signal.SIGKILL)
        wait_until(lambda root=root: not root.alive())
    assert answers == [{"round": 0}, {"round": 1}, {"round": 2}]


def test_start_failing_in_the_init_fails_the_first_request(tmp_path, backend):
    # The first request goes out before the init has entered its root;
    # an init whose start fails must fail it with the step, not hang it.
    code = make_lambda(tmp_path, "echo", ECHO)
    sandbox = backend.create(code, {"BAD=NAME": "x"})
    try:
        with pytest.raises(errors.SandboxDied) as caught:
            call(sandbox, {"n": 1})
    finally:
        sandbox.destroy()
    reason = caught.value.details["reason"]
    assert reason.startswith("start failed: "), reason
    assert "environment variable" in reason, reason

    sandbox = backend.create(code)
    try:
        assert call(sandbox, {"n": 2}) == (protocol.REPLY_OK, {"n": 2})
        assert sandbox.alive()
    finally:
        sandbox.destroy()


def test_thousand_cold_starts_leave_nothing(tmp_path, backend):
    code = make_lambda(tmp_path, "echo", ECHO)
    before = set(os.listdir("/proc/self/fd"))
    for i in range(1000):
        sandbox = backend.create(code)
        try:
            assert call(sandbox, {"i": i}) == (protocol.REPLY_OK, {"i": i})
        finally:
            sandbox.destroy()
    backend.close()
    assert set(os.listdir("/proc/self/fd")) <= before
    assert os.listdir(backend.sandboxes_dir) == []
    assert backend.tree.leftover_ids() == []


HOLDER = """
import sys, time
from sockworker.sandbox.backend import SockBackend
from sockworker.sandbox.cgroups import Limits

state, image, code = sys.argv[1:4]
backend = SockBackend(
    state, image, Limits(memory_bytes=64 << 20, pids=32), import_cache=True
)
backend.start()
sandboxes = [backend.create(code) for _ in range(3)]
print("ready", flush=True)
time.sleep(600)
"""


def test_sweep_after_sigkill_with_zygotes(tmp_path, base_image, leak_check):
    state = tmp_path / "state"
    state.mkdir()
    code = make_lambda(tmp_path, "echo", ECHO)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(state), base_image, code],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "ready"
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        holder.stdout.close()

    backend = SockBackend(
        str(state), base_image, Limits(memory_bytes=64 << 20, pids=32)
    )
    leftovers = set(backend.tree.leftover_ids())
    assert any(name.startswith("zy-") for name in leftovers)
    assert len([n for n in leftovers if n.startswith("sb-")]) >= 3
    # A sandbox being prepared at the kill may have a directory and no
    # cgroup yet: the sweep takes it too.
    dirs = set(os.listdir(state / "sandboxes"))
    assert len(dirs - leftovers) <= 1
    assert set(backend.sweep()) == leftovers | dirs
    assert os.listdir(state / "sandboxes") == []
    assert backend.tree.leftover_ids() == []
    backend.close()


def wait_until(predicate, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError("condition not met in time")
