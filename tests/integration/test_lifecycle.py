"""A worker's life as the machine sees it: after SIGTERM or SIGINT no
mount, cgroup, sandbox directory or process of it remains; after a crash
(SIGKILL) the leftovers are real, and the next worker on the same state
directory removes them before it serves."""

import concurrent.futures
import os
import signal
import time

import pytest

from tests.conftest import mount_points
from tests.integration.conftest import (
    ProcessRecord,
    sandbox_dirs,
    session_members,
    tree_cgroups,
    wait_until,
)

pytestmark = pytest.mark.integration

NAMES = ("alpha", "beta", "gamma")

NAMED = """
import os
import time

def f(event):
    time.sleep(event.get("seconds", 0))
    return {{"lambda": {name!r}, "pid": os.getpid(), "n": event.get("n")}}
"""


def add_lambdas(registry, names=NAMES):
    for name in names:
        registry.add(name, NAMED.format(name=name))


def warm_up(worker, names=NAMES):
    """One request per lambda, so each has a warm instance."""
    for n, name in enumerate(names):
        reply = worker.run(name, {"n": n})
        assert reply.status == 200, reply
        assert reply.json()["lambda"] == name


def sandbox_cgroups(state_dir):
    """The per-sandbox cgroup directories (in every hierarchy) of the
    tree of state_dir."""
    return [
        path
        for path in tree_cgroups(state_dir)
        if os.path.basename(path).startswith(("sb-", "zy-"))
    ]


def hierarchies(state_dir):
    """How many hierarchies hold the tree: each sandbox has one cgroup
    in each."""
    return len(
        [
            path
            for path in tree_cgroups(state_dir)
            if os.path.basename(path).startswith("sockworker-")
        ]
    )


def tree_is_whole(state_dir):
    """Whether every sandbox directory has its cgroup in every
    hierarchy, and nothing else is there."""
    dirs = sandbox_dirs(state_dir)
    cgroups = sandbox_cgroups(state_dir)
    return len(cgroups) == len(dirs) * hierarchies(state_dir) and {
        os.path.basename(path) for path in cgroups
    } == set(dirs)


def assert_nothing_left(worker, records, mounts_before):
    state_dir = worker.state_dir
    running = [record for record in records if record.running()]
    assert not running, f"processes still running: {running}"
    assert session_members(worker.pid) == []
    assert tree_cgroups(state_dir) == []
    assert sandbox_dirs(state_dir) == []
    assert mount_points() == mounts_before


def records_of(worker):
    """The gunicorn worker process and all its children: container inits
    and prepared sandboxes."""
    children = [ProcessRecord(pid) for pid in worker.sandbox_pids()]
    gunicorn = ProcessRecord(worker.gunicorn_worker())
    return gunicorn, children


def test_sigterm_leaves_no_mount_cgroup_or_process(start_worker, registry):
    add_lambdas(registry)
    mounts_before = mount_points()
    worker = start_worker()
    warm_up(worker)
    gunicorn, children = records_of(worker)
    assert len(worker.container_pids()) == len(NAMES), children
    assert all(record.running() for record in children)
    # Prepared sandboxes have directories and cgroups too, once the
    # spawner thread has finished the one it may be preparing now.
    assert wait_until(lambda: tree_is_whole(worker.state_dir), 10)
    assert len(sandbox_dirs(worker.state_dir)) >= len(NAMES)

    status = worker.stop(signal.SIGTERM)

    assert status == 0, worker.stderr_text()
    assert_nothing_left(worker, [gunicorn, *children], mounts_before)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_stop_signal_drains_in_flight_requests(start_worker, registry, signum):
    add_lambdas(registry)
    mounts_before = mount_points()
    worker = start_worker()
    warm_up(worker)
    gunicorn, children = records_of(worker)

    with concurrent.futures.ThreadPoolExecutor(len(NAMES)) as pool:
        in_flight = [
            pool.submit(worker.run, name, {"seconds": 1.5, "n": n})
            for n, name in enumerate(NAMES)
        ]
        time.sleep(0.5)
        worker.send(signum)
        replies = [future.result(timeout=30) for future in in_flight]
    status = worker.wait()

    for n, (name, reply) in enumerate(zip(NAMES, replies, strict=True)):
        assert reply.status == 200, reply
        assert reply.json()["lambda"] == name
        assert reply.json()["n"] == n
    assert status == 0, worker.stderr_text()
    assert_nothing_left(worker, [gunicorn, *children], mounts_before)


def crash(worker):
    """Kill the gunicorn master and its worker process with SIGKILL, the
    way a crash or the OOM killer would. The master is stopped first so
    that it cannot replace the worker process in between, and the worker
    process dies before it can notice its parent is gone and clean up."""
    gunicorn = worker.gunicorn_worker()
    os.kill(worker.pid, signal.SIGSTOP)
    os.kill(gunicorn, signal.SIGKILL)
    os.kill(worker.pid, signal.SIGKILL)
    assert worker.wait(10) == -signal.SIGKILL
    return ProcessRecord(gunicorn)


def test_crash_leftovers_are_swept_by_next_worker(start_worker, registry):
    add_lambdas(registry)
    first = start_worker()
    warm_up(first)
    assert len(first.container_pids()) == len(NAMES)
    children = [ProcessRecord(pid) for pid in first.sandbox_pids()]

    gunicorn = crash(first)

    assert wait_until(lambda: not gunicorn.running(), 10)
    # Sandboxes die with the process that made them (parent-death
    # signal); their cgroups and directories stay behind.
    assert wait_until(
        lambda: not any(record.running() for record in children), 10
    ), children
    old_cgroups = sandbox_cgroups(first.state_dir)
    old_dirs = sandbox_dirs(first.state_dir)
    assert len(old_dirs) >= len(NAMES)
    # The kill may have caught the spawner thread preparing a sandbox:
    # its directory made, its cgroups not yet in every hierarchy.
    each = hierarchies(first.state_dir)
    assert (len(old_dirs) - 1) * each <= len(old_cgroups)
    assert len(old_cgroups) <= len(old_dirs) * each

    second = start_worker()

    # start_worker returned after GET /status answered, so the app is
    # loaded and the sweep is done.
    assert [path for path in old_cgroups if os.path.exists(path)] == []
    assert set(old_dirs).isdisjoint(sandbox_dirs(second.state_dir))
    assert session_members(first.pid) == []
    for n, name in enumerate(NAMES):
        reply = second.run(name, {"n": n})
        assert reply.status == 200, reply
        assert reply.json()["lambda"] == name
        assert reply.headers["x-sockworker-cold"] == "true"
    assert second.stop() == 0
    assert tree_cgroups(second.state_dir) == []
    assert sandbox_dirs(second.state_dir) == []


def test_restart_after_clean_stop_serves(start_worker, registry):
    """A clean stop leaves a state directory the next worker starts
    from without sweeping anything, with the code cache reused."""
    add_lambdas(registry, NAMES[:1])
    first = start_worker()
    warm_up(first, NAMES[:1])
    assert first.stop() == 0

    second = start_worker()

    warm_up(second, NAMES[:1])
    with open(second.config["log_output"]) as log:
        assert "swept leftovers" not in log.read()
