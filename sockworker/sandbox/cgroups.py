"""Cgroups for sandboxes, on a pure cgroup v2 host or a hybrid v1/v2 one.

CgroupLayout.detect() reads /proc/self/mountinfo and /proc/self/cgroup once
at start and finds where each controller lives:

- "v2": one cgroup2 hierarchy holds memory, pids and (if delegated) cpu.
- "hybrid": v1 hierarchies hold memory, pids, cpu and freezer; a cgroup2
  mount (often /sys/fs/cgroup/unified) holds few or no controllers, but its
  core files (cgroup.kill, cgroup.freeze, cgroup.events) work anyway, and
  clone3(CLONE_INTO_CGROUP) needs a v2 directory, so a sandbox gets a v2
  cgroup there as well.

Guarantees:

- Every directory this module makes is <start>/<tree>/<sandbox id> in each
  hierarchy, where <start> is the cgroup the worker was started in. Nothing
  is made at a hierarchy root, so the worker runs inside a delegated
  subtree (a systemd unit with Delegate=yes, a container, a CI job).
- Tree and sandbox names are single path components of letters, digits,
  "-" and "_", so they never collide with a control file, and the trees of
  a crashed worker can be found again by name (CgroupTree.find_trees).
- Directories are removed with rmdir only, never by deleting files.
- destroy() is idempotent and safe from any state; every failure raises
  CgroupError naming the operation and the path.
"""

import errno
import logging
import os
import re
import signal
import time
from dataclasses import dataclass

from sockworker.errors import WorkerError

log = logging.getLogger(__name__)

# Controllers a sandbox is limited by; freezer is used only when present.
CONTROLLERS = ("memory", "pids", "cpu")
V1_CONTROLLERS = CONTROLLERS + ("freezer",)
REQUIRED = ("memory", "pids")

# Suffix of the leaf that takes the start cgroup's processes on v2. A dot
# cannot occur in a tree name, so a supervisor leaf is never taken for a
# tree (see _NAME).
SUPERVISOR_SUFFIX = ".supervisor"

KILL_TIMEOUT = 2.0
FREEZE_TIMEOUT = 2.0
# How long a kill waits for a freeze before signalling anyway: a process in
# uninterruptible sleep can hold a freeze up.
KILL_FREEZE_WAIT = 0.5
MOVE_TIMEOUT = 2.0
POLL_INTERVAL = 0.002
RESIGNAL_INTERVAL = 0.05

MIN_SHARES = 2
MAX_SHARES = 262144
MIN_WEIGHT = 1
MAX_WEIGHT = 10000

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,127}")
# v1 control files whose names hold no dot; a cgroup cannot share a name
# with one of them.
_RESERVED_NAMES = frozenset({"tasks", "notify_on_release", "release_agent"})
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


class CgroupError(WorkerError):
    """A cgroup operation failed; the message names the operation and the
    path. `errno` is the errno of the OSError behind it, if any."""

    def __init__(self, message, err=None):
        super().__init__(message)
        self.errno = err


@dataclass(frozen=True)
class Limits:
    """Resource limits of one sandbox. cpu_weight has the range and meaning
    of cgroup v2 cpu.weight (1..10000, default 100)."""

    memory_bytes: int
    pids: int
    cpu_weight: int = 100

    def __post_init__(self):
        _check_int("memory_bytes", self.memory_bytes, 4096)
        _check_int("pids", self.pids, 1)
        _check_int("cpu_weight", self.cpu_weight, MIN_WEIGHT, MAX_WEIGHT)


def _check_int(field, value, low, high=None):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(
            f"cgroup limit {field}: expected an integer, got {value!r}"
        )
    if value < low or (high is not None and value > high):
        bounds = f">= {low}" if high is None else f"in {low}..{high}"
        raise ValueError(f"cgroup limit {field}={value}: must be {bounds}")


def weight_to_shares(weight):
    """Map a v2 cpu.weight onto v1 cpu.shares: linear, 100 -> 1024, clamped
    to the range the kernel accepts."""
    return max(MIN_SHARES, min(MAX_SHARES, weight * 1024 // 100))


def _check_name(what, name):
    if (
        not isinstance(name, str)
        or not _NAME.fullmatch(name)
        or name in _RESERVED_NAMES
    ):
        raise ValueError(
            f"{what} {name!r}: must be 1 to 128 letters, digits, '-' or '_', "
            "starting with a letter or digit"
        )


# File access. Every cgroup file operation goes through these helpers, so
# each error names the operation and the path in one place.


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError as e:
        raise CgroupError(f"read {path}: {e.strerror}", e.errno) from e


def _write(path, value):
    # No O_CREAT: a missing control file means a controller is not there,
    # and that must fail rather than leave a plain file behind.
    directory, name = os.path.split(path)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, value.encode())
        finally:
            os.close(fd)
    except OSError as e:
        raise CgroupError(
            f"write {name}={value} to {directory}: {e.strerror}", e.errno
        ) from e


def _make_dir(path):
    try:
        os.mkdir(path, 0o755)
    except OSError as e:
        raise CgroupError(f"mkdir {path}: {e.strerror}", e.errno) from e


def _ensure_dir(path):
    try:
        _make_dir(path)
    except CgroupError as e:
        if e.errno != errno.EEXIST:
            raise


def _remove_dir(path):
    """rmdir one cgroup; a missing one is already removed."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CgroupError(f"rmdir {path}: {e.strerror}", e.errno) from e


def _read_keyed(path):
    """Parse a flat keyed file ("key value" lines) into a dict."""
    values = {}
    for line in _read(path).splitlines():
        key, _, value = line.partition(" ")
        values[key] = value.strip()
    return values


def _read_int(path):
    text = _read(path).strip()
    try:
        return int(text)
    except ValueError as e:
        raise CgroupError(f"parse {path}: not an integer: {text!r}") from e


def _read_pids(path):
    return [int(word) for word in _read(path).split()]


def _subdirs(path):
    """Names of the child cgroups of path ([] if path does not exist)."""
    try:
        with os.scandir(path) as entries:
            return sorted(
                e.name for e in entries if e.is_dir(follow_symlinks=False)
            )
    except FileNotFoundError:
        return []
    except OSError as e:
        raise CgroupError(f"list {path}: {e.strerror}", e.errno) from e


def _cgroup_dirs(top):
    """top and every cgroup below it, children before parents."""
    found = []
    for name in _subdirs(top):
        found.extend(_cgroup_dirs(os.path.join(top, name)))
    found.append(top)
    return found


def _is_v2_root(path):
    # cgroup.type exists in every v2 cgroup except the root. Inside a cgroup
    # namespace the start cgroup looks like "/" but is not the real root, so
    # the path alone cannot tell.
    return not os.path.exists(os.path.join(path, "cgroup.type"))


def _wait_for(predicate, timeout):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_INTERVAL)
    return True


# Layout detection.


@dataclass(frozen=True)
class Hierarchy:
    """One mounted cgroup hierarchy as the worker sees it.

    controllers: for v1 the controllers bound to it; for v2 those listed in
    the start cgroup's cgroup.controllers. start: the directory of the
    cgroup the worker was started in.
    """

    version: int
    controllers: frozenset
    mount_point: str
    start: str


@dataclass(frozen=True)
class _Mount:
    root: str
    point: str
    fstype: str
    options: frozenset


@dataclass(frozen=True)
class _Membership:
    hierarchy_id: str
    controllers: frozenset
    path: str


def _unescape(field):
    # mountinfo escapes space, tab, newline and backslash as \ooo.
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


def _parse_mountinfo(text, source):
    """Visible cgroup mounts: for each mount point, the last mount on it
    (an earlier one is hidden)."""
    by_point = {}
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        try:
            sep = fields.index("-", 6)
            mount = _Mount(
                root=_unescape(fields[3]),
                point=_unescape(fields[4]),
                fstype=fields[sep + 1],
                options=frozenset(fields[sep + 3].split(","))
                if len(fields) > sep + 3
                else frozenset(),
            )
        except (ValueError, IndexError) as e:
            raise CgroupError(
                f"parse {source} line {number}: malformed: {line!r}"
            ) from e
        by_point[mount.point] = mount
    return [m for m in by_point.values() if m.fstype in ("cgroup", "cgroup2")]


def _parse_proc_cgroup(text, source):
    memberships = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split(":", 2)
        if len(parts) != 3 or not parts[2].startswith("/"):
            raise CgroupError(
                f"parse {source} line {number}: malformed: {line!r}"
            )
        hierarchy_id, controllers, path = parts
        names = frozenset(c for c in controllers.split(",") if c)
        memberships.append(_Membership(hierarchy_id, names, path))
    return memberships


def _start_dir(mount, path, proc_cgroup):
    """Directory of the cgroup `path` (from /proc/self/cgroup) under mount.

    Without a cgroup namespace, a container may see a bind mount whose root
    is its own cgroup: strip that root from the path. With one, the path is
    already relative to the mount's root.
    """
    relative = path
    root = mount.root.rstrip("/")
    if root and (path == root or path.startswith(root + "/")):
        relative = path[len(root) :] or "/"
    if relative == "/.." or relative.startswith("/../"):
        raise CgroupError(
            f"find start cgroup {path} (from {proc_cgroup}) under "
            f"{mount.point}: the worker's cgroup is outside this mount"
        )
    directory = os.path.normpath(
        os.path.join(mount.point, relative.lstrip("/"))
    )
    if not os.path.isdir(directory):
        raise CgroupError(
            f"find start cgroup {path} (from {proc_cgroup}) under "
            f"{mount.point}: {directory} is not a directory"
        )
    return directory


def _find_v1(mounts, memberships, proc_cgroup):
    """Map each of V1_CONTROLLERS that a v1 hierarchy holds to it."""
    found = {}
    for member in memberships:
        wanted = member.controllers & set(V1_CONTROLLERS)
        if not wanted:
            continue
        mount = next(
            (
                m
                for m in mounts
                if m.fstype == "cgroup" and member.controllers <= m.options
            ),
            None,
        )
        if mount is None:
            continue
        hierarchy = Hierarchy(
            version=1,
            controllers=member.controllers,
            mount_point=mount.point,
            start=_start_dir(mount, member.path, proc_cgroup),
        )
        for controller in wanted:
            found[controller] = hierarchy
    return found


def _leave_supervisor(start):
    # A worker started from a shell that an earlier worker moved into its
    # supervisor leaf would otherwise nest its tree one level deeper each
    # time, and would not see the earlier worker's trees as siblings.
    if os.path.basename(start).endswith(SUPERVISOR_SUFFIX):
        return os.path.dirname(start)
    return start


def _find_v2(mounts, memberships, proc_cgroup):
    member = next((m for m in memberships if m.hierarchy_id == "0"), None)
    mount = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if member is None or mount is None:
        return None
    start = _leave_supervisor(_start_dir(mount, member.path, proc_cgroup))
    available = _read(os.path.join(start, "cgroup.controllers")).split()
    return Hierarchy(
        version=2,
        controllers=frozenset(available),
        mount_point=mount.point,
        start=start,
    )


def _choose_mode(v1, v2, sources):
    if "memory" in v1:
        missing = [c for c in REQUIRED if c not in v1]
        if missing:
            raise CgroupError(
                f"detect cgroup layout from {sources}: memory is on cgroup "
                f"v1 but {', '.join(missing)} is not; mixed layouts are not "
                "supported"
            )
        return "hybrid"
    if v2 is not None and set(REQUIRED) <= v2.controllers:
        return "v2"
    if v2 is None:
        raise CgroupError(
            f"detect cgroup layout from {sources}: no v1 memory hierarchy "
            "and no cgroup2 mount"
        )
    raise CgroupError(
        f"detect cgroup layout from {sources}: no v1 memory hierarchy, and "
        f"{os.path.join(v2.start, 'cgroup.controllers')} lists "
        f"{' '.join(sorted(v2.controllers)) or 'nothing'}, not "
        f"{' and '.join(REQUIRED)} (is the subtree delegated?)"
    )


class CgroupLayout:
    """Where each controller lives on this host, and the worker's start
    cgroup in each hierarchy. Built by detect(); immutable."""

    def __init__(self, mode, v1, v2):
        self.mode = mode
        # v2 mode drives everything through the one v2 hierarchy.
        self.v1 = dict(v1) if mode == "hybrid" else {}
        self.v2 = v2

    @classmethod
    def detect(
        cls, mountinfo="/proc/self/mountinfo", proc_cgroup="/proc/self/cgroup"
    ):
        mounts = _parse_mountinfo(_read(mountinfo), mountinfo)
        memberships = _parse_proc_cgroup(_read(proc_cgroup), proc_cgroup)

        v1 = _find_v1(mounts, memberships, proc_cgroup)
        v2 = _find_v2(mounts, memberships, proc_cgroup)

        mode = _choose_mode(v1, v2, f"{mountinfo} and {proc_cgroup}")
        layout = cls(mode, v1, v2)
        log.info("cgroup layout: %s", layout.describe())
        return layout

    def hierarchy(self, controller):
        """The hierarchy that drives controller, or None if it has none."""
        if self.mode == "v2":
            if controller in self.v2.controllers:
                return self.v2
            return None
        return self.v1.get(controller)

    def hierarchies(self):
        """Every hierarchy a sandbox gets a directory in, v1 ones first."""
        found = dict.fromkeys(
            self.v1[c] for c in V1_CONTROLLERS if c in self.v1
        )
        if self.v2 is not None:
            found[self.v2] = None
        return list(found)

    def describe(self):
        if self.mode == "v2":
            controllers = [c for c in CONTROLLERS if c in self.v2.controllers]
            return (
                f"cgroup v2 at {self.v2.mount_point}, start {self.v2.start}, "
                f"controllers {' '.join(controllers)}"
            )
        parts = [
            f"{c} v1 {self.v1[c].start}"
            for c in V1_CONTROLLERS
            if c in self.v1
        ]
        if self.v2 is None:
            parts.append("no cgroup2 mount")
        else:
            parts.append(f"v2 core {self.v2.start}")
        return "cgroup hybrid: " + ", ".join(parts)


# Trees and sandboxes.


class CgroupTree:
    """The worker's subtree <start>/<name> in every hierarchy.

    create() is idempotent. On v2 it first empties <start> into the leaf
    <start>/<name>.supervisor (cgroup v2's no-internal-processes rule) and
    enables the controllers for the tree and its sandboxes.
    """

    def __init__(self, layout, name):
        _check_name("cgroup tree name", name)
        self.layout = layout
        self.name = name

    def __repr__(self):
        return f"CgroupTree({self.name!r}, {self.layout.mode})"

    def dirs(self):
        return [
            os.path.join(h.start, self.name) for h in self.layout.hierarchies()
        ]

    @classmethod
    def find_trees(cls, layout, prefix):
        """Names of the trees under the start cgroups whose names begin with
        prefix, e.g. those a crashed worker left behind."""
        names = set()
        for hierarchy in layout.hierarchies():
            for name in _subdirs(hierarchy.start):
                if name.startswith(prefix) and _NAME.fullmatch(name):
                    names.add(name)
        return sorted(names)

    def create(self):
        for path in self.dirs():
            _ensure_dir(path)

        if self.layout.mode == "v2":
            self._delegate_controllers()

        log.info(
            "cgroup tree %s created: %s", self.name, ", ".join(self.dirs())
        )

    def _supervisor_dir(self):
        return os.path.join(
            self.layout.v2.start, self.name + SUPERVISOR_SUFFIX
        )

    def _delegate_controllers(self):
        start = self.layout.v2.start
        tree = os.path.join(start, self.name)
        wanted = [c for c in CONTROLLERS if c in self.layout.v2.controllers]

        missing = _missing_controllers(start, wanted)
        if missing:
            # The root cgroup is exempt from the no-internal-processes rule;
            # emptying it would move every process on the host.
            if not _is_v2_root(start):
                self._move_start_processes()
            _enable_controllers(start, missing)

        missing = _missing_controllers(tree, wanted)
        if missing:
            _enable_controllers(tree, missing)

    def _move_start_processes(self):
        start = self.layout.v2.start
        supervisor = self._supervisor_dir()
        _ensure_dir(supervisor)
        target = os.path.join(supervisor, "cgroup.procs")
        source = os.path.join(start, "cgroup.procs")

        # Processes of <start> may fork while they are moved: repeat until
        # a read finds it empty.
        deadline = time.monotonic() + MOVE_TIMEOUT
        while pids := _read_pids(source):
            if time.monotonic() >= deadline:
                raise CgroupError(
                    f"move processes of {start} into {supervisor}: "
                    f"{len(pids)} still there after {MOVE_TIMEOUT} s"
                )
            for pid in pids:
                _move_pid(pid, target)
        log.info(
            "cgroup tree %s: moved processes of %s into %s",
            self.name,
            start,
            supervisor,
        )

    def sandbox(self, sandbox_id):
        return SandboxCgroup(self, sandbox_id)

    def leftover_ids(self):
        ids = set()
        for path in self.dirs():
            ids.update(n for n in _subdirs(path) if _NAME.fullmatch(n))
        return sorted(ids)

    def sweep(self):
        ids = self.leftover_ids()
        failures = []
        for sandbox_id in ids:
            try:
                self.sandbox(sandbox_id).destroy()
            except CgroupError as e:
                failures.append((sandbox_id, e))
                continue
            log.info("cgroup tree %s: swept sandbox %s", self.name, sandbox_id)
        if failures:
            names = ", ".join(i for i, _ in failures)
            raise CgroupError(
                f"sweep cgroup tree {self.name}: could not destroy {names}: "
                f"{failures[0][1]}"
            ) from failures[0][1]
        return ids

    def destroy(self):
        self.sweep()
        for path in self.dirs():
            _remove_dir(path)
        if self.layout.mode == "v2":
            self._remove_supervisor()
        log.info("cgroup tree %s destroyed", self.name)

    def _remove_supervisor(self):
        # The leaf usually holds the worker itself, which cannot move back:
        # <start> now has controllers enabled for its children. Remove it
        # only once it is empty.
        supervisor = self._supervisor_dir()
        procs = os.path.join(supervisor, "cgroup.procs")
        if os.path.isdir(supervisor) and not _read_pids(procs):
            _remove_dir(supervisor)


def _missing_controllers(path, wanted):
    enabled = _read(os.path.join(path, "cgroup.subtree_control")).split()
    return [c for c in wanted if c not in enabled]


def _enable_controllers(path, controllers):
    _write(
        os.path.join(path, "cgroup.subtree_control"),
        " ".join("+" + c for c in controllers),
    )


def _move_pid(pid, procs_file):
    try:
        _write(procs_file, str(pid))
    except CgroupError as e:
        # The process exited between the read and the write.
        if e.errno != errno.ESRCH:
            raise


def _kill_listed(list_pids):
    """SIGKILL every process that list_pids() returns.

    A pid read from cgroup.procs may be freed and reused by a process
    outside the sandbox before it is signalled. So each pid is pinned with
    a pidfd first, and signalled only if a second read still lists it: then
    the pinned process is the one in the cgroup.
    """
    pidfds = {}
    try:
        for pid in list_pids():
            try:
                pidfds[pid] = os.pidfd_open(pid)
            except ProcessLookupError:
                continue
        still_listed = set(list_pids())
        for pid, pidfd in pidfds.items():
            if pid not in still_listed:
                continue
            try:
                signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            except ProcessLookupError:
                continue
    finally:
        for pidfd in pidfds.values():
            os.close(pidfd)


class SandboxCgroup:
    """The cgroups of one sandbox: <start>/<tree>/<id> in every hierarchy.

    Limits are set by create(). A process joins by add(), or by
    clone3(CLONE_INTO_CGROUP) with open_v2() plus writes of its pid to
    v1_procs_files() on hybrid. kill() leaves the sandbox empty or raises.
    destroy() may be called in any state, any number of times. Other
    methods on a sandbox that does not exist raise CgroupError.
    """

    def __init__(self, tree, sandbox_id):
        _check_name("sandbox id", sandbox_id)
        self.id = sandbox_id
        self.layout = tree.layout
        self.tree_name = tree.name

    def __repr__(self):
        return f"SandboxCgroup({self.id!r}, tree={self.tree_name!r})"

    def _dir_in(self, hierarchy):
        return os.path.join(hierarchy.start, self.tree_name, self.id)

    def dirs(self):
        return [self._dir_in(h) for h in self.layout.hierarchies()]

    def _controller_dir(self, controller):
        hierarchy = self.layout.hierarchy(controller)
        return None if hierarchy is None else self._dir_in(hierarchy)

    def _v2_dir(self):
        v2 = self.layout.v2
        return None if v2 is None else self._dir_in(v2)

    def _existing_dirs(self):
        return [d for d in self.dirs() if os.path.isdir(d)]

    def create(self, limits):
        if not isinstance(limits, Limits):
            raise TypeError(
                f"create sandbox cgroup {self.id}: limits must be Limits, "
                f"not {type(limits).__name__}"
            )
        made = []
        try:
            for path in self.dirs():
                _make_dir(path)
                made.append(path)
            if self.layout.mode == "v2":
                self._apply_v2_limits(limits)
            else:
                self._apply_v1_limits(limits)
        except BaseException:
            # Only what this call made: an existing directory of the same
            # name may belong to a live sandbox. Nothing has joined yet.
            self._remove_made(made)
            raise
        log.debug(
            "sandbox %s: cgroups created (memory %d, pids %d, cpu weight "
            "%d): %s",
            self.id,
            limits.memory_bytes,
            limits.pids,
            limits.cpu_weight,
            ", ".join(made),
        )

    def _remove_made(self, made):
        for path in reversed(made):
            try:
                _remove_dir(path)
            except CgroupError as e:
                log.error("sandbox %s: undo create: %s", self.id, e)

    def _apply_v2_limits(self, limits):
        path = self._v2_dir()
        _write(os.path.join(path, "memory.max"), str(limits.memory_bytes))
        swap = os.path.join(path, "memory.swap.max")
        if os.path.exists(swap):
            _write(swap, "0")
        _write(os.path.join(path, "pids.max"), str(limits.pids))
        if "cpu" in self.layout.v2.controllers:
            _write(os.path.join(path, "cpu.weight"), str(limits.cpu_weight))

    def _apply_v1_limits(self, limits):
        memory = self._controller_dir("memory")
        value = str(limits.memory_bytes)
        _write(os.path.join(memory, "memory.limit_in_bytes"), value)
        # memory+swap equal to memory: no swap. Needs swap accounting; the
        # file is absent without it.
        memsw = os.path.join(memory, "memory.memsw.limit_in_bytes")
        if os.path.exists(memsw):
            _write(memsw, value)
        _write(os.path.join(memory, "memory.swappiness"), "0")

        pids = self._controller_dir("pids")
        _write(os.path.join(pids, "pids.max"), str(limits.pids))

        cpu = self._controller_dir("cpu")
        if cpu is not None:
            shares = weight_to_shares(limits.cpu_weight)
            _write(os.path.join(cpu, "cpu.shares"), str(shares))

    def procs_files(self):
        """cgroup.procs files a process must be written to, to join every
        hierarchy (on hybrid: the v1 ones and the v2 one)."""
        return [os.path.join(d, "cgroup.procs") for d in self.dirs()]

    def v1_procs_files(self):
        """The cgroup.procs files CLONE_INTO_CGROUP cannot reach."""
        return [
            os.path.join(self._dir_in(h), "cgroup.procs")
            for h in self.layout.hierarchies()
            if h.version == 1
        ]

    def open_v2(self):
        """An O_DIRECTORY fd of the v2 cgroup, for CLONE_INTO_CGROUP. The
        caller owns (and closes) it."""
        path = self._v2_dir()
        if path is None:
            raise CgroupError(
                f"open v2 cgroup of sandbox {self.id}: no cgroup2 mount"
            )
        try:
            return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise CgroupError(f"open {path}: {e.strerror}", e.errno) from e

    def add(self, pid):
        for procs in self.procs_files():
            _write(procs, str(pid))
        log.debug("sandbox %s: pid %d added", self.id, pid)

    def pids(self):
        return _pids_in(self.dirs())

    def freeze(self):
        self._freezer("freeze").freeze(FREEZE_TIMEOUT)
        log.debug("sandbox %s: frozen", self.id)

    def thaw(self):
        self._freezer("thaw").thaw()
        log.debug("sandbox %s: thawed", self.id)

    def _freezer(self, operation):
        freezer = self._find_freezer(self._existing_dirs())
        if freezer is None:
            raise CgroupError(
                f"{operation} sandbox cgroup {self.id}: no v2 cgroup.freeze "
                f"and no v1 freezer among {', '.join(self.dirs())}"
            )
        return freezer

    def _find_freezer(self, dirs):
        """The freezer of the existing dirs: v2 cgroup.freeze if there,
        else the v1 freezer, else None."""
        v2 = self._v2_dir()
        if v2 in dirs and os.path.exists(os.path.join(v2, "cgroup.freeze")):
            return _Freezer(v2, "cgroup.freeze", "1", "0")
        v1 = self._controller_dir("freezer")
        if v1 in dirs:
            return _Freezer(v1, "freezer.state", "FROZEN", "THAWED")
        return None

    def kill(self):
        dirs = self._existing_dirs()
        if not dirs:
            raise CgroupError(
                f"kill sandbox cgroup {self.id}: none of "
                f"{', '.join(self.dirs())} exists"
            )
        self._kill(dirs)

    def _kill(self, dirs):
        v2 = self._v2_dir()
        if v2 in dirs and os.path.exists(os.path.join(v2, "cgroup.kill")):
            _write(os.path.join(v2, "cgroup.kill"), "1")
        else:
            self._kill_each(dirs)
        self._wait_empty(dirs)
        log.debug("sandbox %s: killed", self.id)

    def _kill_each(self, dirs):
        # Frozen processes cannot fork, so one pass finds them all. A
        # frozen process dies of SIGKILL once thawed, if not before.
        freezer = self._find_freezer(dirs)
        if freezer is not None:
            freezer.freeze(KILL_FREEZE_WAIT, required=False)
        try:
            _kill_listed(lambda: _pids_in(dirs))
        finally:
            if freezer is not None:
                freezer.thaw()

    def _wait_empty(self, dirs):
        started = time.monotonic()
        signalled = started
        while remaining := _pids_in(dirs):
            now = time.monotonic()
            if now - started >= KILL_TIMEOUT:
                raise CgroupError(
                    f"kill sandbox cgroup {dirs[0]}: {len(remaining)} "
                    f"processes left after {KILL_TIMEOUT} s: {remaining[:10]}"
                )
            # Stragglers: on hybrid a process written only into v1 cgroups
            # escapes cgroup.kill, and without a freezer a process may fork
            # while the pass runs. Dying ones are just signalled again.
            if now - signalled >= RESIGNAL_INTERVAL:
                self._kill_each(dirs)
                signalled = now
            time.sleep(POLL_INTERVAL)

    def oom_killed(self):
        if self.layout.mode == "v2":
            path = os.path.join(self._v2_dir(), "memory.events")
        else:
            memory = self._controller_dir("memory")
            path = os.path.join(memory, "memory.oom_control")
        values = _read_keyed(path)
        if "oom_kill" not in values:
            raise CgroupError(
                f"read oom_kill from {path}: no such line (kernel older "
                "than 4.13?)"
            )
        try:
            return int(values["oom_kill"]) > 0
        except ValueError as e:
            raise CgroupError(
                f"parse oom_kill in {path}: {values['oom_kill']!r}"
            ) from e

    def memory_usage(self):
        if self.layout.mode == "v2":
            return _read_int(os.path.join(self._v2_dir(), "memory.current"))
        memory = self._controller_dir("memory")
        return _read_int(os.path.join(memory, "memory.usage_in_bytes"))

    def destroy(self):
        dirs = self._existing_dirs()
        if not dirs:
            return
        self._kill(dirs)
        # A sandbox with a cgroup namespace may have made child cgroups;
        # rmdir fails on a parent until they are gone.
        for top in dirs:
            for path in _cgroup_dirs(top):
                _remove_dir(path)
        log.debug("sandbox %s: cgroups destroyed", self.id)


@dataclass(frozen=True)
class _Freezer:
    """The freezer file of one cgroup: v2 cgroup.freeze ("1"/"0") or v1
    freezer.state ("FROZEN"/"THAWED")."""

    directory: str
    name: str
    frozen: str
    thawed: str

    def state(self):
        # Freezing is asynchronous. v2 reports the effect in cgroup.events;
        # v1 freezer.state reads FREEZING until every task is frozen.
        if self.name == "cgroup.freeze":
            events = _read_keyed(os.path.join(self.directory, "cgroup.events"))
            return self.frozen if events.get("frozen") == "1" else self.thawed
        return _read(os.path.join(self.directory, self.name)).strip()

    def freeze(self, timeout, required=True):
        self._set(self.frozen, timeout, required)

    def thaw(self):
        self._set(self.thawed, FREEZE_TIMEOUT, True)

    def _set(self, value, timeout, required):
        _write(os.path.join(self.directory, self.name), value)
        if _wait_for(lambda: self.state() == value, timeout) or not required:
            return
        raise CgroupError(
            f"write {self.name}={value} to {self.directory}: state still "
            f"{self.state()} after {timeout} s"
        )


def _pids_in(dirs):
    """Processes in the cgroups dirs and below them, sorted."""
    found = set()
    for top in dirs:
        for path in _cgroup_dirs(top):
            found.update(_read_pids(os.path.join(path, "cgroup.procs")))
    return sorted(found)
