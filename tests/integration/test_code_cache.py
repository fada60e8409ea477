"""The code cache: unpacked lambda code in a tmpfs that only the worker
process sees, and what happens when it fills up."""

import os

import pytest

from tests.integration.conftest import mounts_under, wait_until

pytestmark = pytest.mark.integration

KIB = 1024

# A handler that reads a data file shipped beside it, so that the file's
# size counts in the code cache.
READS_BLOB = """
import os

def f(event):
    return os.path.getsize(os.path.join(os.path.dirname(__file__), "blob"))
"""


def add_with_blob(registry, name, size):
    registry.add(name, READS_BLOB)
    with open(os.path.join(str(registry), name, "blob"), "wb") as f:
        f.write(os.urandom(size))


def no_instances(worker):
    return lambda: worker.get("/status").json()["instances"] == 0


def mount_table(pid):
    """(mount point, filesystem type) of each mount pid sees."""
    with open(f"/proc/{pid}/mountinfo") as f:
        rows = [line.split(" - ") for line in f]
    return [(left.split()[4], right.split()[0]) for left, right in rows]


@pytest.mark.parametrize("import_cache", [True, False])
def test_code_is_in_a_tmpfs_only_the_worker_sees(
    start_worker, registry, import_cache
):
    # Forked sandboxes get their root from the worker's namespace, fresh
    # ones from a copy of it: both see the code.
    registry.add("echo", "def f(event):\n    return event\n")
    worker = start_worker(import_cache=import_cache)
    assert worker.run("echo", {"a": 1}).json() == {"a": 1}

    cache = os.path.join(worker.state_dir, "lambdas")
    pid = worker.gunicorn_worker()
    assert (cache, "tmpfs") in mount_table(pid)
    assert not mounts_under(cache)
    assert os.listdir(f"/proc/{pid}/root{cache}") == ["echo"]
    assert os.listdir(cache) == []


def test_code_on_disk_when_the_cache_is_off(start_worker, registry):
    registry.add("echo", "def f(event):\n    return event\n")
    worker = start_worker(code_cache_mb=0)
    assert worker.run("echo", [1]).json() == [1]

    cache = os.path.join(worker.state_dir, "lambdas")
    assert all(point != cache for point, _ in mount_table(worker.pid))
    assert all(
        point != cache for point, _ in mount_table(worker.gunicorn_worker())
    )
    assert os.listdir(cache) == ["echo"]


def test_full_cache_makes_room_then_refuses_with_507(start_worker, registry):
    # 1 MiB holds one lambda with a 600 KiB blob, not two.
    add_with_blob(registry, "first", 600 * KIB)
    add_with_blob(registry, "second", 600 * KIB)
    add_with_blob(registry, "too-big", 1200 * KIB)
    registry.add("small", "def f(event):\n    return 'small'\n")
    worker = start_worker(code_cache_mb=1, keep_warm_seconds=0.3)
    cache = f"/proc/{worker.gunicorn_worker()}/root{worker.state_dir}/lambdas"

    assert worker.run("first").json() == 600 * KIB
    assert wait_until(no_instances(worker), 10)
    # first's code is still cached (its current version), with no
    # instance using it: the full cache drops it for second.
    assert os.listdir(cache) == ["first"]
    assert worker.run("second").json() == 600 * KIB
    assert os.listdir(cache) == ["second"]

    reply = worker.run("too-big")
    assert reply.status == 507, reply
    body = reply.json()
    assert body["error"] == "code_cache_full"
    assert "too-big" in body["message"] and "full" in body["message"]

    assert worker.run("small").json() == "small"
    # second's warm instance holds its code: no room for first yet.
    assert worker.run("first").status == 507
    assert wait_until(no_instances(worker), 10)
    assert worker.run("first").json() == 600 * KIB
