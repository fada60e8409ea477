"""Shared fixtures: the base image, per-test state directories, and the
leak checks that every privileged test runs under."""

import os
import subprocess

import pytest

IMAGES_DIR = os.environ.get(
    "SOCKWORKER_IMAGES_DIR", "/var/lib/sockworker/images"
)


def is_root():
    return os.geteuid() == 0


def pytest_collection_modifyitems(config, items):
    if is_root():
        return
    skip = pytest.mark.skip(reason="needs root (namespaces, mounts, cgroups)")
    for item in items:
        if "privileged" in item.keywords or "integration" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def base_image():
    """Path of the base image root filesystem, built once if needed."""
    from sockworker.image import BaseImage

    return BaseImage(IMAGES_DIR).ensure(progress=False)


def mount_points():
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


def sockworker_cgroups():
    """Every sockworker cgroup directory of this test session.

    On a hybrid host the v1 memory hierarchy nests trees under the memory
    cgroup of the process that made them, so trees made by other sessions
    on the same machine (another test run, a benchmark) are told apart by
    it and left out; elsewhere every sockworker tree counts.
    """
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        for name in dirs:
            if name.startswith("sockworker"):
                found.append(os.path.join(top, name))
        # Sandbox cgroups sit two levels below a sockworker tree at most.
        if top.count("/") > 8:
            dirs[:] = []
    ours = own_tree_names()
    if ours is None:
        return sorted(found)
    return sorted(p for p in found if tree_name_of(p) in ours)


def own_tree_names():
    """Names of the sockworker trees under this process's v1 memory
    cgroup, or None when there is no v1 memory hierarchy."""
    with open("/proc/self/cgroup") as f:
        for line in f:
            _, controllers, path = line.rstrip("\n").split(":", 2)
            if "memory" in controllers.split(","):
                start = "/sys/fs/cgroup/memory" + path.rstrip("/")
                if not os.path.isdir(start):
                    return None
                return {
                    name
                    for name in os.listdir(start)
                    if name.startswith("sockworker")
                }
    return None


def tree_name_of(path):
    for part in path.split("/"):
        if part.startswith("sockworker"):
            return part
    return None


def child_processes():
    """Descendants of this test process (direct children are enough:
    container inits are our children through CLONE_PARENT)."""
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(os.getpid())],
        capture_output=True,
        text=True,
    ).stdout.split()
    return sorted(int(pid) for pid in out if int(pid) != 0)


def open_fds():
    return sorted(os.listdir("/proc/self/fd"))


class Snapshot:
    """What a test could leak: mounts, cgroups, child processes, fds."""

    def __init__(self):
        self.mounts = mount_points()
        self.cgroups = sockworker_cgroups()
        self.children = [p for p in child_processes()]
        self.fds = open_fds()

    def compare(self, later):
        leaks = {}
        for name in ("mounts", "cgroups", "children", "fds"):
            before, after = getattr(self, name), getattr(later, name)
            extra = sorted(set(after) - set(before))
            if extra:
                leaks[name] = extra
        return leaks


@pytest.fixture
def leak_check():
    """Fails the test if it left a mount, cgroup, child or fd behind."""
    before = Snapshot()
    yield before
    after = Snapshot()
    # The ps call above is itself a child while it runs; ignore pids that
    # no longer exist.
    after.children = [
        p for p in after.children if os.path.exists(f"/proc/{p}")
    ]
    leaks = before.compare(after)
    assert not leaks, f"test left behind: {leaks}"
