"""Unit tests of sockworker.sandbox.cgroups over a fake cgroupfs.

FakeKernel stands in for the kernel's side of cgroupfs on plain
directories: mkdir fills in control files, rmdir refuses a populated
cgroup and removes the control files, a write to cgroup.procs moves the pid
within its hierarchy, cgroup.kill empties a cgroup, and a v2
cgroup.subtree_control write obeys the no-internal-processes rule. Only the
module's os calls are replaced; its own logic runs as written. Fake pids
are above the kernel's largest pid_max, so they can never name a real
process.
"""

import errno
import os

import pytest

from sockworker.sandbox import cgroups
from sockworker.sandbox.cgroups import (
    CgroupError,
    CgroupLayout,
    CgroupTree,
    Limits,
    weight_to_shares,
)

PID_A = 5_000_001
PID_B = 5_000_002
MiB = 1 << 20

V2_FILES = {
    "cgroup.procs": "",
    "cgroup.subtree_control": "",
    "cgroup.events": "populated 0\nfrozen 0\n",
    "cgroup.freeze": "0\n",
    "cgroup.kill": "",
    "cgroup.type": "domain\n",
}
V2_CONTROLLER_FILES = {
    "memory": {
        "memory.max": "max\n",
        "memory.swap.max": "max\n",
        "memory.current": "0\n",
        "memory.events": "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n",
    },
    "pids": {"pids.max": "max\n"},
    "cpu": {"cpu.weight": "100\n"},
}
V1_FILES = {
    "memory": {
        "memory.limit_in_bytes": "9223372036854771712\n",
        "memory.memsw.limit_in_bytes": "9223372036854771712\n",
        "memory.swappiness": "60\n",
        "memory.usage_in_bytes": "0\n",
        "memory.oom_control": "oom_kill_disable 0\nunder_oom 0\noom_kill 0\n",
    },
    "pids": {"pids.max": "max\n"},
    "cpu": {"cpu.shares": "1024\n"},
    "freezer": {"freezer.state": "THAWED\n"},
    "systemd": {},
}


def _put(path, text):
    with open(path, "w") as f:
        f.write(text)


def _get(path):
    with open(path) as f:
        return f.read()


class FakeKernel:
    """The kernel's side of cgroupfs, on plain directories."""

    def __init__(self):
        self.roots = {}  # mount point -> "v2" or a v1 hierarchy kind
        self.fds = {}
        self.writes = []  # (path, value) in order
        self.rmdirs = []
        self.signalled = []
        self.v1_files = {k: dict(v) for k, v in V1_FILES.items()}

    # Hierarchies.

    def add_root(self, path, kind, controllers=""):
        os.makedirs(path)
        self.roots[path] = kind
        if kind == "v2":
            _put(os.path.join(path, "cgroup.procs"), "")
            _put(os.path.join(path, "cgroup.controllers"), controllers)
            _put(os.path.join(path, "cgroup.subtree_control"), "")
        else:
            self._fill_v1(path, kind)
        return path

    def root_of(self, path):
        for root, kind in self.roots.items():
            if path == root or path.startswith(root + "/"):
                return root, kind
        return None, None

    def _fill_v1(self, path, kind):
        _put(os.path.join(path, "cgroup.procs"), "")
        _put(os.path.join(path, "tasks"), "")
        for name, text in self.v1_files[kind].items():
            _put(os.path.join(path, name), text)

    def _fill_v2(self, path):
        parent = os.path.dirname(path)
        enabled = _get(os.path.join(parent, "cgroup.subtree_control"))
        _put(os.path.join(path, "cgroup.controllers"), enabled)
        for name, text in V2_FILES.items():
            _put(os.path.join(path, name), text)
        for controller in enabled.split():
            for name, text in V2_CONTROLLER_FILES.get(controller, {}).items():
                _put(os.path.join(path, name), text)

    # The os calls of the module.

    def mkdir(self, path, mode=0o777):
        os.mkdir(path, mode)
        root, kind = self.root_of(path)
        if kind == "v2":
            self._fill_v2(path)
        elif kind is not None:
            self._fill_v1(path, kind)

    def rmdir(self, path):
        root, _ = self.root_of(path)
        if root is None:
            return os.rmdir(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(errno.ENOENT, "No such file", path)
        if self.pids(path):
            raise OSError(errno.EBUSY, "Device or resource busy", path)
        self.rmdirs.append(path)
        for entry in os.scandir(path):
            if entry.is_file():
                os.unlink(entry.path)
        os.rmdir(path)

    def open(self, path, flags, mode=0o777):
        fd = os.open(path, flags, mode)
        self.fds[fd] = path
        return fd

    def close(self, fd):
        self.fds.pop(fd, None)
        os.close(fd)

    def write(self, fd, data):
        path = self.fds.get(fd)
        value = data.decode()
        if path is None or self.root_of(path)[0] is None:
            return os.write(fd, data)
        self.writes.append((path, value))
        name = os.path.basename(path)
        directory = os.path.dirname(path)
        handler = getattr(self, "_write_" + name.replace(".", "_"), None)
        if handler is None:
            # A cgroupfs write replaces the value whatever the offset.
            os.ftruncate(fd, 0)
            return os.write(fd, data)
        handler(directory, value)
        return len(data)

    # Emulated control files.

    def _write_cgroup_procs(self, directory, value):
        pid = int(value)
        root, _ = self.root_of(directory)
        for dirpath, _, _ in os.walk(root):
            self.set_pids(dirpath, [p for p in self.pids(dirpath) if p != pid])
        self.set_pids(directory, self.pids(directory) + [pid])

    def _write_cgroup_kill(self, directory, value):
        for dirpath, _, _ in os.walk(directory):
            for pid in self.pids(dirpath):
                self.end_process(pid)

    def _write_cgroup_freeze(self, directory, value):
        _put(os.path.join(directory, "cgroup.freeze"), value)
        populated = "1" if self.pids(directory) else "0"
        _put(
            os.path.join(directory, "cgroup.events"),
            f"populated {populated}\nfrozen {value}\n",
        )

    def _write_cgroup_subtree_control(self, directory, value):
        root, _ = self.root_of(directory)
        if directory != root and self.pids(directory):
            raise OSError(errno.EBUSY, "Device or resource busy")
        available = _get(os.path.join(directory, "cgroup.controllers")).split()
        path = os.path.join(directory, "cgroup.subtree_control")
        enabled = set(_get(path).split())
        for word in value.split():
            if word[1:] not in available:
                raise OSError(errno.ENOENT, "No such file or directory")
            if word[0] == "+":
                enabled.add(word[1:])
            else:
                enabled.discard(word[1:])
        _put(path, " ".join(sorted(enabled)))
        for entry in os.scandir(directory):
            if entry.is_dir():
                self._enable_in_child(entry.path, enabled)

    def _enable_in_child(self, child, enabled):
        _put(os.path.join(child, "cgroup.controllers"), " ".join(enabled))
        for controller in enabled:
            for name, text in V2_CONTROLLER_FILES.get(controller, {}).items():
                if not os.path.exists(os.path.join(child, name)):
                    _put(os.path.join(child, name), text)

    # Processes.

    def pids(self, directory):
        return [
            int(p)
            for p in _get(os.path.join(directory, "cgroup.procs")).split()
        ]

    def set_pids(self, directory, pids):
        text = "".join(f"{p}\n" for p in pids)
        _put(os.path.join(directory, "cgroup.procs"), text)
        events = os.path.join(directory, "cgroup.events")
        if os.path.exists(events):
            frozen = _get(events).split("frozen ")[1].strip()
            populated = "1" if pids else "0"
            _put(events, f"populated {populated}\nfrozen {frozen}\n")

    def end_process(self, pid):
        """The process exits: it leaves every cgroup of every hierarchy."""
        for root in self.roots:
            for dirpath, _, _ in os.walk(root):
                pids = self.pids(dirpath)
                if pid in pids:
                    self.set_pids(dirpath, [p for p in pids if p != pid])

    def kill_listed(self, list_pids):
        for pid in list_pids():
            self.signalled.append(pid)
            self.end_process(pid)

    def writes_to(self, name):
        return [
            (os.path.dirname(p), v)
            for p, v in self.writes
            if os.path.basename(p) == name
        ]


class _FakeOs:
    """os, with the calls that reach cgroupfs sent to the FakeKernel."""

    def __init__(self, kernel):
        self._kernel = kernel

    def __getattr__(self, name):
        return getattr(os, name)

    def mkdir(self, path, mode=0o777):
        self._kernel.mkdir(path, mode)

    def rmdir(self, path):
        self._kernel.rmdir(path)

    def open(self, path, flags, mode=0o777):
        return self._kernel.open(path, flags, mode)

    def write(self, fd, data):
        return self._kernel.write(fd, data)

    def close(self, fd):
        self._kernel.close(fd)


@pytest.fixture
def kernel(monkeypatch):
    fake = FakeKernel()
    monkeypatch.setattr(cgroups, "os", _FakeOs(fake))
    monkeypatch.setattr(cgroups, "_kill_listed", fake.kill_listed)
    return fake


def _mountinfo_line(number, root, point, fstype, options):
    escaped = point.replace(" ", "\\040")
    return (
        f"{number} 23 0:{number} {root} {escaped} rw,nosuid,nodev,noexec "
        f"shared:{number} - {fstype} {fstype} {options}\n"
    )


def _write_fixtures(tmp_path, mountinfo, proc_cgroup):
    mi = tmp_path / "proc-self-mountinfo"
    pc = tmp_path / "proc-self-cgroup"
    mi.write_text(
        "22 1 8:1 / / rw,relatime - ext4 /dev/sda1 rw\n"
        "23 22 0:21 / /sys rw,nosuid - sysfs sysfs rw\n" + mountinfo
    )
    pc.write_text(proc_cgroup)
    return str(mi), str(pc)


def make_v2(
    tmp_path,
    kernel,
    start="/user.slice/worker.service",
    controllers="cpuset cpu io memory hugetlb pids",
    delegated="cpu memory pids",
    start_pids=(PID_A, PID_B),
):
    """A pure v2 host: the worker in `start`, with `delegated` controllers
    reaching it."""
    root = kernel.add_root(str(tmp_path / "cgroup"), "v2", controllers)
    path = root
    for part in [p for p in start.split("/") if p]:
        _put(os.path.join(path, "cgroup.subtree_control"), delegated)
        path = os.path.join(path, part)
        kernel.mkdir(path)
    kernel.set_pids(path, list(start_pids))
    mountinfo = _mountinfo_line(30, "/", root, "cgroup2", "rw,nsdelegate")
    return _write_fixtures(tmp_path, mountinfo, f"0::{start}\n"), path


def make_hybrid(tmp_path, kernel, unified=True, memsw=True):
    """A hybrid host like this one: v1 memory (worker in /job), pids,
    co-mounted cpu,cpuacct, freezer, a named systemd hierarchy, and a
    cgroup2 mount without controllers."""
    if not memsw:
        del kernel.v1_files["memory"]["memory.memsw.limit_in_bytes"]
    base = tmp_path / "fs cgroup"
    mounts = [
        ("memory", "memory", "rw,memory", "4:memory:/job"),
        ("pids", "pids", "rw,pids", "8:pids:/"),
        ("cpu,cpuacct", "cpu", "rw,cpu,cpuacct", "2:cpu,cpuacct:/"),
        ("freezer", "freezer", "rw,freezer", "6:freezer:/"),
        ("systemd", "systemd", "rw,xattr,name=systemd", "1:name=systemd:/"),
    ]
    mountinfo = ""
    lines = []
    for number, (dirname, kind, options, line) in enumerate(mounts, 31):
        point = kernel.add_root(str(base / dirname), kind)
        mountinfo += _mountinfo_line(number, "/", point, "cgroup", options)
        lines.append(line)
    kernel.mkdir(str(base / "memory" / "job"))
    kernel.set_pids(str(base / "memory" / "job"), [PID_A])
    if unified:
        point = kernel.add_root(str(base / "unified"), "v2", "")
        mountinfo += _mountinfo_line(40, "/", point, "cgroup2", "rw")
        lines.append("0::/")
    text = "\n".join(lines) + "\n"
    return _write_fixtures(tmp_path, mountinfo, text), str(base)


# Detection.


def test_detect_v2_finds_start_cgroup(tmp_path, kernel):
    (mi, pc), start = make_v2(tmp_path, kernel)

    layout = CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    assert layout.mode == "v2"
    assert layout.v2.start == start
    assert layout.v1 == {}
    assert layout.hierarchies() == [layout.v2]
    for controller in ("memory", "pids", "cpu"):
        assert layout.hierarchy(controller) is layout.v2
    assert "v2" in layout.describe() and start in layout.describe()
    assert "\n" not in layout.describe()


def test_detect_hybrid_finds_each_controller(tmp_path, kernel):
    (mi, pc), base = make_hybrid(tmp_path, kernel)

    layout = CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    assert layout.mode == "hybrid"
    assert layout.hierarchy("memory").start == os.path.join(
        base, "memory", "job"
    )
    assert layout.hierarchy("pids").start == os.path.join(base, "pids")
    cpu = layout.hierarchy("cpu")
    assert cpu.start == os.path.join(base, "cpu,cpuacct")
    assert cpu.controllers == {"cpu", "cpuacct"}
    assert layout.hierarchy("freezer").start == os.path.join(base, "freezer")
    assert layout.v2.start == os.path.join(base, "unified")
    assert layout.v2.controllers == frozenset()
    # The named systemd hierarchy carries no controller of ours.
    starts = [h.start for h in layout.hierarchies()]
    assert not any("systemd" in s for s in starts)
    assert starts[-1] == layout.v2.start
    assert layout.describe().startswith("cgroup hybrid: memory v1 ")


def test_detect_hybrid_without_cgroup2_mount(tmp_path, kernel):
    (mi, pc), _ = make_hybrid(tmp_path, kernel, unified=False)

    layout = CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    assert layout.mode == "hybrid"
    assert layout.v2 is None
    assert "no cgroup2 mount" in layout.describe()


def test_detect_strips_mount_root_of_a_bind_mounted_cgroup(tmp_path, kernel):
    # A container without a cgroup namespace: its own cgroup is bind
    # mounted, so the mount root is a prefix of /proc/self/cgroup's path.
    root = kernel.add_root(str(tmp_path / "cg"), "v2", "memory pids")
    _put(os.path.join(root, "cgroup.subtree_control"), "memory pids")
    kernel.mkdir(os.path.join(root, "w"))
    mountinfo = _mountinfo_line(30, "/docker/abc", root, "cgroup2", "rw")
    mi, pc = _write_fixtures(tmp_path, mountinfo, "0::/docker/abc/w\n")

    layout = CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    assert layout.v2.start == os.path.join(root, "w")


def test_detect_ignores_a_mount_hidden_by_a_later_one(tmp_path, kernel):
    (mi, pc), base = make_hybrid(tmp_path, kernel)
    point = os.path.join(base, "unified").replace(" ", "\\040")
    with open(mi, "a") as f:
        f.write(f"99 23 0:99 / {point} rw - tmpfs tmpfs rw\n")

    layout = CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    assert layout.v2 is None


def test_detect_leaves_an_earlier_supervisor_leaf(tmp_path, kernel):
    (mi, pc), start = make_v2(tmp_path, kernel, start="/w")
    kernel.mkdir(os.path.join(start, "old.supervisor"))
    with open(pc, "w") as f:
        f.write("0::/w/old.supervisor\n")

    layout = CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    assert layout.v2.start == start


def test_detect_without_cgroup_mounts_names_both_files(tmp_path):
    mi, pc = _write_fixtures(tmp_path, "", "0::/\n")

    with pytest.raises(CgroupError) as caught:
        CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    assert mi in str(caught.value) and pc in str(caught.value)


def test_detect_v2_without_memory_names_cgroup_controllers(tmp_path, kernel):
    (mi, pc), start = make_v2(tmp_path, kernel, delegated="cpu pids")

    with pytest.raises(CgroupError, match="cgroup.controllers lists cpu pids"):
        CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)


def test_detect_rejects_missing_start_cgroup(tmp_path, kernel):
    (mi, pc), start = make_v2(tmp_path, kernel)
    with open(pc, "w") as f:
        f.write("0::/gone\n")

    with pytest.raises(CgroupError, match="gone is not a directory"):
        CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)


def test_detect_rejects_malformed_lines(tmp_path):
    mi, pc = _write_fixtures(tmp_path, "", "garbage\n")
    with pytest.raises(CgroupError, match=f"parse {pc} line 1"):
        CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)

    with open(mi, "a") as f:
        f.write("1 2 3\n")
    with pytest.raises(CgroupError, match=f"parse {mi} line 3"):
        CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc)


def test_detect_missing_file_names_it(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(CgroupError, match=f"read {missing}: No such file"):
        CgroupLayout.detect(mountinfo=missing)


# The v2 tree.


def _v2_layout(tmp_path, kernel, **kwargs):
    (mi, pc), start = make_v2(tmp_path, kernel, **kwargs)
    return CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc), start


def test_v2_create_moves_start_processes_then_enables(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "sockworker-1a2b3c4d")

    tree.create()

    supervisor = os.path.join(start, "sockworker-1a2b3c4d.supervisor")
    assert kernel.pids(start) == []
    assert sorted(kernel.pids(supervisor)) == [PID_A, PID_B]
    tree_dir = os.path.join(start, "sockworker-1a2b3c4d")
    assert kernel.writes_to("cgroup.subtree_control") == [
        (start, "+memory +pids +cpu"),
        (tree_dir, "+memory +pids +cpu"),
    ]
    # Every move comes before the first subtree_control write.
    names = [os.path.basename(p) for p, _ in kernel.writes]
    assert names.index("cgroup.subtree_control") > max(
        i for i, n in enumerate(names) if n == "cgroup.procs"
    )
    assert _get(os.path.join(tree_dir, "cgroup.subtree_control")) == (
        "cpu memory pids"
    )


def test_v2_create_is_idempotent(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "sockworker-1")
    tree.create()
    kernel.writes.clear()

    tree.create()

    assert kernel.writes == []


def test_v2_enables_only_available_controllers(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel, delegated="memory pids")
    tree = CgroupTree(layout, "t")

    tree.create()
    tree.sandbox("s1").create(Limits(memory_bytes=64 * MiB, pids=8))

    assert kernel.writes_to("cgroup.subtree_control") == [
        (start, "+memory +pids"),
        (os.path.join(start, "t"), "+memory +pids"),
    ]
    assert kernel.writes_to("cpu.weight") == []
    assert "cpu" not in layout.describe()


def test_v2_root_start_is_not_emptied(tmp_path, kernel):
    # The root cgroup is exempt from the no-internal-processes rule, and
    # emptying it would move every process of the host.
    layout, root = _v2_layout(tmp_path, kernel, start="/")
    tree = CgroupTree(layout, "t")

    tree.create()

    assert sorted(kernel.pids(root)) == [PID_A, PID_B]
    assert not os.path.exists(os.path.join(root, "t.supervisor"))
    assert kernel.writes_to("cgroup.subtree_control")[0] == (
        root,
        "+memory +pids +cpu",
    )


def test_v2_sandbox_limits_and_files(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")

    sandbox.create(Limits(memory_bytes=256 * MiB, pids=32, cpu_weight=250))

    path = os.path.join(start, "t", "s1")
    assert sandbox.dirs() == [path]
    assert _get(os.path.join(path, "memory.max")) == str(256 * MiB)
    assert _get(os.path.join(path, "memory.swap.max")) == "0"
    assert _get(os.path.join(path, "pids.max")) == "32"
    assert _get(os.path.join(path, "cpu.weight")) == "250"
    assert sandbox.procs_files() == [os.path.join(path, "cgroup.procs")]
    assert sandbox.v1_procs_files() == []
    fd = sandbox.open_v2()
    try:
        assert os.path.samestat(os.fstat(fd), os.stat(path))
        assert not os.get_inheritable(fd)
    finally:
        os.close(fd)


def test_v2_without_swap_file_skips_it(tmp_path, kernel, monkeypatch):
    memory = dict(V2_CONTROLLER_FILES["memory"])
    del memory["memory.swap.max"]
    monkeypatch.setitem(V2_CONTROLLER_FILES, "memory", memory)
    layout, start = _v2_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()

    tree.sandbox("s1").create(Limits(memory_bytes=64 * MiB, pids=8))

    assert kernel.writes_to("memory.swap.max") == []
    assert not os.path.exists(
        os.path.join(start, "t", "s1", "memory.swap.max")
    )


def test_v2_add_pids_freeze_kill(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=8))

    sandbox.add(PID_A)
    assert sandbox.pids() == [PID_A]
    assert PID_A not in kernel.pids(os.path.join(start, "t.supervisor"))

    sandbox.freeze()
    events = _get(os.path.join(start, "t", "s1", "cgroup.events"))
    assert "frozen 1" in events
    sandbox.thaw()

    sandbox.kill()
    assert sandbox.pids() == []
    assert kernel.writes_to("cgroup.kill") == [
        (os.path.join(start, "t", "s1"), "1")
    ]


# The hybrid tree.


def _hybrid_layout(tmp_path, kernel, **kwargs):
    (mi, pc), base = make_hybrid(tmp_path, kernel, **kwargs)
    return CgroupLayout.detect(mountinfo=mi, proc_cgroup=pc), base


def test_hybrid_sandbox_nests_under_start_in_every_hierarchy(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "sockworker-9")

    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))

    expected = [
        os.path.join(base, "memory", "job", "sockworker-9", "s1"),
        os.path.join(base, "pids", "sockworker-9", "s1"),
        os.path.join(base, "cpu,cpuacct", "sockworker-9", "s1"),
        os.path.join(base, "freezer", "sockworker-9", "s1"),
        os.path.join(base, "unified", "sockworker-9", "s1"),
    ]
    assert sandbox.dirs() == expected
    assert all(os.path.isdir(d) for d in expected)
    procs = [os.path.join(d, "cgroup.procs") for d in expected]
    assert sandbox.procs_files() == procs
    assert sandbox.v1_procs_files() == procs[:4]
    # Hybrid never empties the start cgroup: v2 enables no controllers.
    assert kernel.writes_to("cgroup.subtree_control") == []
    assert kernel.pids(os.path.join(base, "memory", "job")) == [PID_A]


def test_hybrid_limits_written_to_v1_files(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()

    tree.sandbox("s1").create(
        Limits(memory_bytes=256 * MiB, pids=10, cpu_weight=50)
    )

    memory = os.path.join(base, "memory", "job", "t", "s1")
    assert kernel.writes_to("memory.limit_in_bytes") == [(memory, "268435456")]
    assert kernel.writes_to("memory.memsw.limit_in_bytes") == [
        (memory, "268435456")
    ]
    assert kernel.writes_to("memory.swappiness") == [(memory, "0")]
    assert kernel.writes_to("pids.max") == [
        (os.path.join(base, "pids", "t", "s1"), "10")
    ]
    assert kernel.writes_to("cpu.shares") == [
        (os.path.join(base, "cpu,cpuacct", "t", "s1"), "512")
    ]
    # memory+swap may not go below memory: the memory limit is set first.
    names = [os.path.basename(p) for p, _ in kernel.writes]
    assert names.index("memory.limit_in_bytes") < names.index(
        "memory.memsw.limit_in_bytes"
    )


def test_hybrid_without_swap_accounting_skips_memsw(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel, memsw=False)
    tree = CgroupTree(layout, "t")
    tree.create()

    tree.sandbox("s1").create(Limits(memory_bytes=64 * MiB, pids=10))

    assert kernel.writes_to("memory.memsw.limit_in_bytes") == []
    assert len(kernel.writes_to("memory.limit_in_bytes")) == 1


def test_hybrid_add_writes_pid_to_every_hierarchy(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))

    sandbox.add(PID_A)

    for directory in sandbox.dirs():
        assert kernel.pids(directory) == [PID_A]
    assert kernel.pids(os.path.join(base, "memory", "job")) == []
    assert sandbox.pids() == [PID_A]


def test_hybrid_kill_uses_v2_cgroup_kill(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    sandbox.add(PID_A)
    # A process that joined only the v1 cgroups escapes cgroup.kill.
    kernel.set_pids(sandbox.dirs()[0], [PID_A, PID_B])

    sandbox.kill()

    assert kernel.writes_to("cgroup.kill") == [(sandbox.dirs()[-1], "1")]
    assert kernel.signalled == [PID_B]
    assert sandbox.pids() == []


def test_kill_without_v2_freezes_signals_and_thaws(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel, unified=False)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    sandbox.add(PID_A)
    sandbox.add(PID_B)

    sandbox.kill()

    freezer = os.path.join(base, "freezer", "t", "s1")
    assert kernel.writes_to("freezer.state") == [
        (freezer, "FROZEN"),
        (freezer, "THAWED"),
    ]
    assert sorted(kernel.signalled) == [PID_A, PID_B]
    assert sandbox.pids() == []


def test_kill_that_cannot_empty_names_the_cgroup(
    tmp_path, kernel, monkeypatch
):
    layout, base = _hybrid_layout(tmp_path, kernel, unified=False)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    sandbox.add(PID_A)
    monkeypatch.setattr(cgroups, "_kill_listed", lambda list_pids: None)
    monkeypatch.setattr(cgroups, "KILL_TIMEOUT", 0.1)

    with pytest.raises(CgroupError) as caught:
        sandbox.kill()

    message = str(caught.value)
    assert message.startswith(f"kill sandbox cgroup {sandbox.dirs()[0]}")
    assert str(PID_A) in message


def test_freeze_without_v2_uses_v1_freezer(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel, unified=False)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    state = os.path.join(base, "freezer", "t", "s1", "freezer.state")

    sandbox.freeze()
    assert _get(state).strip() == "FROZEN"
    sandbox.thaw()
    assert _get(state).strip() == "THAWED"


def test_open_v2_without_cgroup2_raises(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel, unified=False)
    sandbox = CgroupTree(layout, "t").sandbox("s1")

    with pytest.raises(CgroupError, match="open v2 cgroup of sandbox s1"):
        sandbox.open_v2()
    assert sandbox.v1_procs_files() == sandbox.procs_files()


# Limits.


@pytest.mark.parametrize(
    "weight, shares",
    [(100, 1024), (1, 10), (50, 512), (200, 2048), (10000, 102400)],
)
def test_weight_to_shares_is_linear(weight, shares):
    assert weight_to_shares(weight) == shares


def test_weight_to_shares_clamps_to_kernel_range():
    assert weight_to_shares(0) == 2
    assert weight_to_shares(30000) == 262144


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"memory_bytes": 0, "pids": 1}, "memory_bytes"),
        ({"memory_bytes": "1G", "pids": 1}, "memory_bytes"),
        ({"memory_bytes": 1 << 20, "pids": 0}, "pids"),
        ({"memory_bytes": 1 << 20, "pids": True}, "pids"),
        ({"memory_bytes": 1 << 20, "pids": 1, "cpu_weight": 0}, "cpu_weight"),
        (
            {"memory_bytes": 1 << 20, "pids": 1, "cpu_weight": 10001},
            "cpu_weight",
        ),
    ],
)
def test_limits_reject_bad_values(kwargs, field):
    with pytest.raises(ValueError, match=f"cgroup limit {field}"):
        Limits(**kwargs)


def test_limits_default_weight():
    assert Limits(memory_bytes=1 << 20, pids=4).cpu_weight == 100


# OOM and memory.


def test_oom_killed_v2_reads_memory_events(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=8))
    events = os.path.join(start, "t", "s1", "memory.events")

    assert sandbox.oom_killed() is False
    _put(events, "low 0\nhigh 0\nmax 7\noom 2\noom_kill 1\noom_group_kill 0\n")
    assert sandbox.oom_killed() is True


def test_oom_killed_v1_reads_oom_control(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=8))
    control = os.path.join(
        base, "memory", "job", "t", "s1", "memory.oom_control"
    )

    assert sandbox.oom_killed() is False
    _put(control, "oom_kill_disable 0\nunder_oom 0\noom_kill 3\n")
    assert sandbox.oom_killed() is True
    _put(control, "oom_kill_disable 0\nunder_oom 0\n")
    with pytest.raises(CgroupError, match=f"read oom_kill from {control}"):
        sandbox.oom_killed()


def test_memory_usage(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=8))
    usage = os.path.join(
        base, "memory", "job", "t", "s1", "memory.usage_in_bytes"
    )
    _put(usage, "1234567\n")

    assert sandbox.memory_usage() == 1234567


# Errors.


def test_write_error_names_operation_and_path(tmp_path, kernel):
    del kernel.v1_files["pids"]["pids.max"]
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")

    with pytest.raises(CgroupError) as caught:
        sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))

    pids_dir = os.path.join(base, "pids", "t", "s1")
    assert str(caught.value) == (
        f"write pids.max=10 to {pids_dir}: No such file or directory"
    )
    assert caught.value.errno == errno.ENOENT
    assert isinstance(caught.value.__cause__, FileNotFoundError)
    # A failed create leaves nothing behind.
    assert not any(os.path.exists(d) for d in sandbox.dirs())


def test_create_over_existing_sandbox_keeps_it(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    first = tree.sandbox("s1")
    first.create(Limits(memory_bytes=64 * MiB, pids=10))

    with pytest.raises(CgroupError, match="mkdir .*s1: File exists"):
        tree.sandbox("s1").create(Limits(memory_bytes=64 * MiB, pids=10))

    assert all(os.path.isdir(d) for d in first.dirs())


@pytest.mark.parametrize(
    "name", ["", "..", "a/b", "x.supervisor", "tasks", "-x", "a" * 129, 7]
)
def test_bad_names_are_rejected(tmp_path, kernel, name):
    layout, base = _hybrid_layout(tmp_path, kernel)
    with pytest.raises(ValueError, match="cgroup tree name"):
        CgroupTree(layout, name)
    with pytest.raises(ValueError, match="sandbox id"):
        CgroupTree(layout, "t").sandbox(name)


def test_create_requires_limits(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    sandbox = CgroupTree(layout, "t").sandbox("s1")
    with pytest.raises(TypeError, match="limits must be Limits"):
        sandbox.create({"memory_bytes": 1})


# Destroy, leftovers and sweep.


def test_destroy_never_created_does_nothing(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")

    tree.sandbox("s1").destroy()
    tree.destroy()

    assert kernel.rmdirs == []
    assert kernel.writes == []


def test_destroy_half_created_sandbox(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    kernel.mkdir(sandbox.dirs()[0])
    kernel.set_pids(sandbox.dirs()[0], [PID_A])

    sandbox.destroy()

    assert kernel.signalled == [PID_A]
    assert kernel.rmdirs == [sandbox.dirs()[0]]
    assert not any(os.path.exists(d) for d in sandbox.dirs())


def test_destroy_is_idempotent_and_removes_children_first(tmp_path, kernel):
    layout, base = _hybrid_layout(tmp_path, kernel)
    tree = CgroupTree(layout, "t")
    tree.create()
    sandbox = tree.sandbox("s1")
    sandbox.create(Limits(memory_bytes=64 * MiB, pids=10))
    sandbox.add(PID_A)
    # A cgroup the sandbox made for itself, below its own.
    inner = os.path.join(sandbox.dirs()[-1], "inner")
    kernel.mkdir(inner)
    kernel.set_pids(inner, [PID_B])

    sandbox.destroy()
    sandbox.destroy()
    tree.destroy()
    tree.destroy()

    assert kernel.rmdirs.index(inner) < kernel.rmdirs.index(sandbox.dirs()[-1])
    for tree_dir in tree.dirs():
        assert kernel.rmdirs.index(tree_dir) > max(
            kernel.rmdirs.index(d) for d in sandbox.dirs()
        )
        assert not os.path.exists(tree_dir)
    assert len(kernel.rmdirs) == len(set(kernel.rmdirs))
    with pytest.raises(CgroupError, match="cgroup.procs: No such file"):
        sandbox.pids()
    with pytest.raises(CgroupError, match="kill sandbox cgroup s1: none of"):
        sandbox.kill()


def test_restarted_worker_finds_and_sweeps_leftovers(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel)
    old = CgroupTree(layout, "sockworker-aaaa")
    old.create()
    for sandbox_id in ("s2", "s1"):
        old.sandbox(sandbox_id).create(Limits(memory_bytes=64 * MiB, pids=8))
    old.sandbox("s1").add(PID_B)

    assert CgroupTree.find_trees(layout, "sockworker-") == ["sockworker-aaaa"]
    again = CgroupTree(layout, "sockworker-aaaa")
    assert again.leftover_ids() == ["s1", "s2"]
    assert again.sweep() == ["s1", "s2"]
    assert again.leftover_ids() == []
    again.destroy()

    assert CgroupTree.find_trees(layout, "sockworker-") == []
    assert not os.path.exists(os.path.join(start, "sockworker-aaaa"))
    # The supervisor leaf holds the worker's processes: it stays.
    supervisor = os.path.join(start, "sockworker-aaaa.supervisor")
    assert sorted(kernel.pids(supervisor)) == [PID_A]


def test_tree_destroy_removes_empty_supervisor(tmp_path, kernel):
    layout, start = _v2_layout(tmp_path, kernel, start_pids=())
    tree = CgroupTree(layout, "t")
    tree.create()
    supervisor = os.path.join(start, "t.supervisor")
    assert os.path.isdir(supervisor)

    tree.destroy()

    assert not os.path.exists(supervisor)
    assert os.listdir(start) and not any(e.is_dir() for e in os.scandir(start))


def test_sweep_reports_sandboxes_it_could_not_destroy(
    tmp_path, kernel, monkeypatch
):
    layout, base = _hybrid_layout(tmp_path, kernel, unified=False)
    tree = CgroupTree(layout, "t")
    tree.create()
    for sandbox_id in ("s1", "s2"):
        tree.sandbox(sandbox_id).create(Limits(memory_bytes=64 * MiB, pids=8))
    tree.sandbox("s2").add(PID_A)
    monkeypatch.setattr(cgroups, "_kill_listed", lambda list_pids: None)
    monkeypatch.setattr(cgroups, "KILL_TIMEOUT", 0.05)

    with pytest.raises(CgroupError, match="could not destroy s2: kill"):
        tree.sweep()

    assert tree.leftover_ids() == ["s2"]
