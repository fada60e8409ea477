"""Privileged tests of sockworker.sandbox.cgroups on the host's real cgroups.

Each test makes its own tree, named with the test process's pid, and its
teardown checks that no directory of that tree is left in any hierarchy,
that every process it spawned is reaped, and that no fd leaked (and runs
under the shared leak_check of tests/conftest.py). Tree names start with
"swtest-", not "sockworker", so that leak checks of other tests running at
the same time do not count them.
"""

import errno
import itertools
import os
import select
import subprocess
import time

import pytest

from sockworker.sandbox.cgroups import (
    CgroupLayout,
    CgroupTree,
    Limits,
    weight_to_shares,
)

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

PYTHON = "/usr/bin/python3"
MiB = 1 << 20
_serial = itertools.count()

# Each helper process blocks on its first stdin line, so that the test can
# add it to the sandbox before it does anything that the limits govern.
TICKER = """
import sys, time
sys.stdin.readline()
while True:
    print("tick", flush=True)
    time.sleep(0.02)
"""
ALLOCATE = """
import sys
sys.stdin.readline()
block = b"x" * ({mib} << 20)
print("allocated", flush=True)
sys.stdin.readline()
"""
FORKER = """
import os, sys, time
sys.stdin.readline()
made, failed = 0, []
for _ in range(50):
    try:
        pid = os.fork()
    except OSError as e:
        failed.append(e.errno)
        continue
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    made += 1
print(made, len(failed), sorted(set(failed)), flush=True)
time.sleep(60)
"""
# Forks without pause, so that kill() races with new processes.
FORK_LOOP = """
import os, sys, time
sys.stdin.readline()
while True:
    try:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
    except OSError:
        time.sleep(0.001)
"""


def _fds():
    return sorted(os.listdir("/proc/self/fd"))


def tree_dirs_left(layout, name):
    """Directories of tree `name` (or its v2 supervisor leaf) that exist in
    any hierarchy."""
    left = []
    for hierarchy in layout.hierarchies():
        for leaf in (name, name + ".supervisor"):
            path = os.path.join(hierarchy.start, leaf)
            if os.path.exists(path):
                left.append(path)
    return left


@pytest.fixture(scope="module")
def layout():
    return CgroupLayout.detect()


@pytest.fixture
def v1_layout(tmp_path):
    """The host's layout as if it had no cgroup2 mount: the fallbacks to the
    v1 freezer and to killing pid by pid, on the real kernel."""
    with open("/proc/self/mountinfo") as f:
        lines = [line for line in f if " - cgroup2 " not in line]
    mountinfo = tmp_path / "mountinfo-without-cgroup2"
    mountinfo.write_text("".join(lines))
    found = CgroupLayout.detect(mountinfo=str(mountinfo))
    if found.mode != "hybrid":
        pytest.skip("the host has no v1 hierarchies to fall back to")
    assert found.v2 is None
    return found


class Spawner:
    """Starts helper processes and reaps every one at teardown."""

    def __init__(self):
        self.procs = []

    def __call__(self, source):
        proc = subprocess.Popen(
            [PYTHON, "-c", source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        self.procs.append(proc)
        return proc

    def close(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            proc.wait(timeout=10)
            for pipe in (proc.stdin, proc.stdout, proc.stderr):
                pipe.close()


def go(proc):
    proc.stdin.write(b"go\n")
    proc.stdin.flush()


def read_line(proc, timeout=5.0):
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        raise AssertionError(f"pid {proc.pid}: no output in {timeout} s")
    return proc.stdout.readline().decode()


def drain(proc):
    """Bytes that are readable from proc's stdout right now."""
    data = b""
    while select.select([proc.stdout], [], [], 0)[0]:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        data += chunk
    return data


def _make_tree(layout):
    name = f"swtest-{os.getpid()}-{next(_serial)}"
    tree = CgroupTree(layout, name)
    tree.create()
    return tree


def _teardown(tree, spawn, fds_before):
    # The tree first: a process frozen by a failed test dies of SIGKILL
    # only once its cgroup is thawed, which destroy does.
    try:
        tree.destroy()
    finally:
        spawn.close()
    assert tree_dirs_left(tree.layout, tree.name) == []
    assert _fds() == fds_before


@pytest.fixture
def env(layout, leak_check):
    fds_before = _fds()
    spawn = Spawner()
    tree = _make_tree(layout)
    yield tree, spawn
    _teardown(tree, spawn, fds_before)


@pytest.fixture
def v1_env(v1_layout, leak_check):
    fds_before = _fds()
    spawn = Spawner()
    tree = _make_tree(v1_layout)
    yield tree, spawn
    _teardown(tree, spawn, fds_before)


def read(path):
    with open(path) as f:
        return f.read().strip()


def test_layout_matches_the_mounts(layout):
    with open("/proc/self/mountinfo") as f:
        fields = [line.split(" - ", 1)[1].split() for line in f]
    v1_memory = any(
        f[0] == "cgroup" and "memory" in f[2].split(",") for f in fields
    )
    assert layout.mode == ("hybrid" if v1_memory else "v2")
    for controller in ("memory", "pids"):
        hierarchy = layout.hierarchy(controller)
        assert hierarchy.version == (1 if v1_memory else 2)
        assert os.path.isdir(hierarchy.start)


def test_limits_read_back_from_kernel(env, layout):
    tree, _ = env
    sandbox = tree.sandbox("limits")

    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10, cpu_weight=50))

    for hierarchy, path in zip(
        layout.hierarchies(), sandbox.dirs(), strict=True
    ):
        assert path == os.path.join(hierarchy.start, tree.name, "limits")
        assert os.path.isdir(path)

    def cgroup_of(controller):
        start = layout.hierarchy(controller).start
        return os.path.join(start, tree.name, "limits")

    memory, pids, cpu = map(cgroup_of, ("memory", "pids", "cpu"))
    if layout.mode == "hybrid":
        assert read(f"{memory}/memory.limit_in_bytes") == str(64 * MiB)
        memsw = f"{memory}/memory.memsw.limit_in_bytes"
        if os.path.exists(memsw):
            assert read(memsw) == str(64 * MiB)
        assert read(f"{memory}/memory.swappiness") == "0"
        assert read(f"{cpu}/cpu.shares") == str(weight_to_shares(50))
    else:
        assert read(f"{memory}/memory.max") == str(64 * MiB)
        assert read(f"{cpu}/cpu.weight") == "50"
    assert read(f"{pids}/pids.max") == "10"
    assert sandbox.oom_killed() is False


def test_add_places_process_in_every_hierarchy(env, layout):
    tree, spawn = env
    sandbox = tree.sandbox("add")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    proc = spawn(TICKER)

    sandbox.add(proc.pid)

    assert sandbox.pids() == [proc.pid]
    for procs_file in sandbox.procs_files():
        assert read(procs_file) == str(proc.pid)
    with open(f"/proc/{proc.pid}/cgroup") as f:
        membership = f.read().splitlines()
    for hierarchy, path in zip(
        layout.hierarchies(), sandbox.dirs(), strict=True
    ):
        relative = "/" + os.path.relpath(path, hierarchy.mount_point)
        assert [m for m in membership if m.endswith(":" + relative)]
    fd = sandbox.open_v2()
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(sandbox.dirs()[-1]))
    finally:
        os.close(fd)


def _assert_freeze_stops_and_thaw_resumes(sandbox, proc, frozen_file):
    sandbox.add(proc.pid)
    go(proc)
    assert read_line(proc) == "tick\n"

    sandbox.freeze()
    assert frozen_file()
    drain(proc)
    time.sleep(0.3)
    assert drain(proc) == b""

    sandbox.thaw()
    assert not frozen_file()
    assert read_line(proc) == "tick\n"


def test_freeze_stops_process_and_thaw_resumes_it(env):
    tree, spawn = env
    sandbox = tree.sandbox("freeze")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    events = os.path.join(sandbox.dirs()[-1], "cgroup.events")

    _assert_freeze_stops_and_thaw_resumes(
        sandbox, spawn(TICKER), lambda: "frozen 1" in read(events)
    )


def test_v1_freezer_fallback(v1_env, v1_layout):
    tree, spawn = v1_env
    sandbox = tree.sandbox("freeze1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    state = os.path.join(
        v1_layout.hierarchy("freezer").start, tree.name, "freeze1"
    )

    _assert_freeze_stops_and_thaw_resumes(
        sandbox,
        spawn(TICKER),
        lambda: read(f"{state}/freezer.state") == "FROZEN",
    )


def test_allocation_past_limit_is_oom_killed(env):
    tree, spawn = env
    greedy = tree.sandbox("greedy")
    greedy.create(Limits(memory_bytes=64 * MiB, pids=10))
    modest = tree.sandbox("modest")
    modest.create(Limits(memory_bytes=64 * MiB, pids=10))
    big = spawn(ALLOCATE.format(mib=200))
    small = spawn(ALLOCATE.format(mib=16))
    greedy.add(big.pid)
    modest.add(small.pid)

    go(big)
    go(small)

    assert big.wait(timeout=30) == -9
    assert greedy.oom_killed() is True
    assert read_line(small) == "allocated\n"
    assert modest.oom_killed() is False
    assert modest.memory_usage() >= 16 * MiB


def test_pids_max_stops_a_fork_bomb(env):
    tree, spawn = env
    sandbox = tree.sandbox("forks")
    sandbox.create(Limits(memory_bytes=256 * MiB, pids=10))
    proc = spawn(FORKER)
    sandbox.add(proc.pid)

    go(proc)
    made, failed, errnos = read_line(proc, timeout=10).split(" ", 2)

    # The forker itself counts: 9 children fit under pids.max=10.
    assert (int(made), int(failed)) == (9, 41)
    assert errnos.strip() == f"[{errno.EAGAIN}]"
    assert len(sandbox.pids()) == 10
    pids_dir = os.path.join(
        tree.layout.hierarchy("pids").start, tree.name, "forks"
    )
    assert read(f"{pids_dir}/pids.current") == "10"
    assert "max 41" in read(f"{pids_dir}/pids.events")
    # The host can still fork.
    assert subprocess.run(["/bin/true"]).returncode == 0

    sandbox.kill()

    assert sandbox.pids() == []
    assert proc.wait(timeout=5) == -9


def test_kill_empties_a_sandbox_that_keeps_forking(env):
    tree, spawn = env
    sandbox = tree.sandbox("kill")
    sandbox.create(Limits(memory_bytes=256 * MiB, pids=64))
    proc = spawn(FORK_LOOP)
    sandbox.add(proc.pid)
    go(proc)
    deadline = time.monotonic() + 5
    while len(sandbox.pids()) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(sandbox.pids()) >= 20

    sandbox.kill()

    assert sandbox.pids() == []
    assert proc.wait(timeout=5) == -9


def test_v1_kill_fallback_empties_every_hierarchy(v1_env):
    tree, spawn = v1_env
    sandbox = tree.sandbox("kill1")
    sandbox.create(Limits(memory_bytes=256 * MiB, pids=64))
    proc = spawn(FORK_LOOP)
    sandbox.add(proc.pid)
    go(proc)
    deadline = time.monotonic() + 5
    while len(sandbox.pids()) < 20 and time.monotonic() < deadline:
        time.sleep(0.01)

    sandbox.kill()

    assert sandbox.pids() == []
    assert proc.wait(timeout=5) == -9
    freezer = os.path.join(
        tree.layout.hierarchy("freezer").start, tree.name, "kill1"
    )
    assert read(f"{freezer}/freezer.state") == "THAWED"


def test_destroy_removes_every_directory_and_is_idempotent(env):
    tree, spawn = env
    sandbox = tree.sandbox("gone")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    proc = spawn(TICKER)
    sandbox.add(proc.pid)
    go(proc)

    sandbox.destroy()

    assert proc.wait(timeout=5) == -9
    assert not any(os.path.exists(d) for d in sandbox.dirs())
    sandbox.destroy()
    tree.destroy()
    assert tree_dirs_left(tree.layout, tree.name) == []
    tree.destroy()


def test_destroy_half_created_sandbox(env):
    tree, _ = env
    sandbox = tree.sandbox("half")
    os.mkdir(sandbox.dirs()[0])
    os.mkdir(sandbox.dirs()[-1])

    sandbox.destroy()

    assert not any(os.path.exists(d) for d in sandbox.dirs())


def test_sweep_after_simulated_crash(env, layout):
    tree, spawn = env
    crashed = CgroupTree(layout, tree.name)
    busy = crashed.sandbox("busy")
    busy.create(Limits(memory_bytes=64 * MiB, pids=10))
    crashed.sandbox("idle").create(Limits(memory_bytes=64 * MiB, pids=10))
    proc = spawn(TICKER)
    busy.add(proc.pid)
    go(proc)
    del crashed, busy

    restarted = CgroupTree(layout, tree.name)
    assert tree.name in CgroupTree.find_trees(layout, "swtest-")
    assert restarted.leftover_ids() == ["busy", "idle"]
    assert restarted.sweep() == ["busy", "idle"]

    assert proc.wait(timeout=5) == -9
    assert restarted.leftover_ids() == []
    for hierarchy in layout.hierarchies():
        tree_dir = os.path.join(hierarchy.start, tree.name)
        assert [e for e in os.scandir(tree_dir) if e.is_dir()] == []
