"""The lambda registry: fetch, verify, unpack and cache lambda code.

A registry is where users put their lambdas, in the layouts OpenLambda
users already have. `location` is a folder path, a file:// URL or an
http(s):// URL; for a lambda <name> the forms are tried in this order:

1. the folder <name>/ holding f.py (and optionally requirements.txt,
   ol.yaml and anything else the handler needs);
2. the gzip tarball <name>.tar.gz with the same contents, either at the top
   of the archive or under a single top folder <name>/, which is stripped;
3. the single file <name>.py, which becomes f.py.

Over HTTP a folder cannot be listed, so only <name>.tar.gz and then
<name>.py are tried; a 404 means "try the next form".

Safety. Code is read completely into memory and checked before anything
is written: member paths must be relative and free of `..`; symlinks must
have a relative target that, followed through the tree the way the kernel
would (other symlinks included), stays inside it; hard links must point to
an earlier regular file of the same archive; devices, fifos and sockets are
refused; the unpacked size, the member count and the compressed download
are bounded by `max_bytes` and `max_members`; a gzip stream is read to its
end so that its checksum is verified. Extraction never goes through
tarfile's extraction code: files are created with O_EXCL | O_NOFOLLOW under
directories this module made, so even a check missed here could not write
outside the temporary directory. A folder entry is copied with the same
checks; its files are copied by content, so a hard link in a registry
folder is just a regular file.

Cache layout. Code lands in <cache_dir>/<name>/<version>/layer/handler/,
where `version` is the first 32 hex digits of a sha256 over the unpacked
tree (each member's relative path, kind, mode and content), so the same
code has the same version whichever form it came in. The version's
`layer/` directory is meant to be an overlay lower layer that shows the
code at /handler inside a container. Files are 0644 (0755 when any
execute bit was set), directories 0755, because the handler runs as an
unprivileged user. A version is unpacked into <cache_dir>/.tmp-<pid>-...
and renamed into place, so a version directory is either complete or
absent; a crash leaves only a temporary directory, which `sweep()` removes.
An existing version directory is reused as it is (also across restarts,
when cache_dir is on disk). A write that fails for want of space raises
CodeCacheFull, so that the caller can make room and try again.

Updates. `get()` returns the cached LambdaCode without touching the
registry until `refresh_seconds` have passed since the last check of that
lambda. Then a local registry compares a cheap stamp (size, mtime, ctime,
inode of the file, or of every entry of a folder) and re-reads only if it
changed; an HTTP registry sends If-None-Match / If-Modified-Since when the
server gave an ETag / Last-Modified, and otherwise downloads again. Either
way a new version appears only if the content hash changed. If the
registry cannot be reached during a re-check, the cached version is kept
(with a warning) until the next check; a lambda that disappeared or became
invalid raises and is no longer current. Errors are not cached: a lambda
that is missing or invalid is looked up again on the next call.

Lifetime of old versions. LambdaCode objects are immutable and name a
version directory that stays intact until the caller lets it go: the
registry never deletes a version by itself. `remove_unused(in_use)` deletes
every version that is neither current nor listed in `in_use` (with
keep_current=False, current ones too), so the caller (the lambda
manager, which knows which instances use which version) decides when.
This was chosen over reference counting because the manager already
keeps that set, and a missed release could then only keep
a directory too long, never delete one too early. The caller must list
every version it holds, including one it got from `get()` and is still
setting up an instance for.

Threads. Any number of threads may call `get()`. A cache hit is a
dictionary lookup and a clock read; pulls and re-checks of one lambda are
serialised by a per-lambda lock, so concurrent callers of a cold lambda
wait for a single pull.
"""

import contextlib
import dataclasses
import errno
import gzip
import hashlib
import http.client
import importlib.util
import io
import logging
import marshal
import os
import re
import shutil
import stat
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import zlib
from dataclasses import dataclass

from sockworker.errors import (
    BadRequest,
    CodeCacheFull,
    LambdaInvalid,
    LambdaNotFound,
    RegistryUnavailable,
)

log = logging.getLogger(__name__)

NAME_RULE = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME_RE = re.compile(NAME_RULE)
_VERSION_RE = re.compile(r"[0-9a-f]{32}")
_URL_RE = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")

HANDLER_FILE = "f.py"
REQUIREMENTS_FILE = "requirements.txt"

_TMP_PREFIX = ".tmp-"
_CHUNK = 1 << 16
_MAX_LINK_HOPS = 40
_MAX_NAME_BYTES = 255
# Tar headers, padding and long-name records come on top of the file data;
# this bounds them per member so a decompression bomb hidden in headers is
# stopped too.
_TAR_OVERHEAD_PER_MEMBER = 4096
_FILE_MODE = 0o644
_EXEC_MODE = 0o755
_DIR_MODE = 0o755
# The flags word of a .pyc validated by a hash of its source, which the
# importer does not check (PEP 552).
_UNCHECKED_HASH_PYC = 0b01
# Where a sandbox sees the code: the layer's handler/ folder, at /handler.
SANDBOX_CODE_DIR = "/handler"

# The clock for refresh intervals; tests replace it to step through time.
_now = time.monotonic


@dataclass(frozen=True)
class LambdaCode:
    """One version of a lambda's code, unpacked in the cache.

    The files under `root` do not change while the object exists, and stay
    until `Registry.remove_unused()` is called without this version.
    """

    name: str
    version: str
    root: str
    code_dir: str
    requirements: tuple[str, ...]


def check_name(name: str) -> None:
    """Raise BadRequest unless `name` is a valid lambda name."""
    if (
        not isinstance(name, str)
        or name in (".", "..")
        or not _NAME_RE.fullmatch(name)
    ):
        raise BadRequest(
            f"lambda name {name!r} is invalid: it must match "
            f"^{NAME_RULE}$ (a letter or digit, then up to 127 letters, "
            f"digits, '.', '_' or '-')"
        )


@dataclass(frozen=True)
class _Member:
    """One entry of a lambda's tree, read and held in memory."""

    path: tuple[str, ...]
    kind: str  # "file", "dir", "symlink" or "hardlink"
    data: bytes = b""
    executable: bool = False
    link: str = ""  # symlink target, or hard link target path

    @property
    def mode(self):
        if self.kind == "dir":
            return _DIR_MODE
        return _EXEC_MODE if self.executable else _FILE_MODE

    @property
    def shown(self):
        return "/".join(self.path) or "."


@dataclass(frozen=True)
class _Probe:
    """What a source found for a lambda: `members` is None when the
    source reports the content unchanged since `stamp`."""

    form: str
    origin: str
    stamp: object
    members: list | None


@dataclass(frozen=True)
class _Entry:
    """The current version of a lambda and when it was last checked."""

    code: LambdaCode
    checked: float
    form: str
    stamp: object


class Budget:
    """Counts members and bytes of one lambda against the limits."""

    def __init__(self, max_bytes, max_members, label):
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.label = label
        self.members = 0
        self.bytes = 0

    @property
    def stream_limit(self):
        overhead = (self.max_members + 2) * _TAR_OVERHEAD_PER_MEMBER
        return self.max_bytes + overhead

    def take_member(self, shown):
        self.members += 1
        if self.members > self.max_members:
            raise LambdaInvalid(
                f"{self.label}: more than {self.max_members} members "
                f"(limit reached at {shown!r})"
            )

    def take_bytes(self, size, shown):
        self.bytes += size
        if self.bytes > self.max_bytes:
            raise LambdaInvalid(
                f"{self.label}: unpacks to more than {self.max_bytes} "
                f"bytes (limit reached at {shown!r})"
            )


class _BoundedReader:
    """A read-only stream that refuses to yield more than `limit` bytes,
    so that decompressing an archive cannot run away."""

    def __init__(self, raw, limit, label):
        self._raw = raw
        self._limit = limit
        self._label = label
        self._count = 0

    def read(self, size=-1):
        room = self._limit - self._count + 1
        size = room if size is None or size < 0 else min(size, room)
        data = self._raw.read(size)
        self._count += len(data)
        if self._count > self._limit:
            raise LambdaInvalid(
                f"{self._label}: archive decompresses to more than "
                f"{self._limit} bytes"
            )
        return data


def _split_member_path(raw, label, what="member"):
    """Return the components of an archive path, refusing absolute paths
    and `..` components."""
    if raw.startswith("/"):
        raise LambdaInvalid(f"{label}: {what} {raw!r} has an absolute path")
    parts = tuple(p for p in raw.split("/") if p not in ("", "."))
    if ".." in parts:
        raise LambdaInvalid(f"{label}: {what} {raw!r} contains '..'")
    return parts


def _special_kind(is_chr, is_blk, is_fifo, is_sock=False):
    if is_chr:
        return "a character device"
    if is_blk:
        return "a block device"
    if is_fifo:
        return "a fifo"
    if is_sock:
        return "a socket"
    return "an unsupported file type"


def _member_of(archive, info, budget, label):
    """Turn one tar header (and its data) into a _Member, or None for the
    archive's root directory entry."""
    path = _split_member_path(info.name, label)
    budget.take_member(info.name)
    if info.isreg():
        budget.take_bytes(info.size, info.name)
        data = archive.extractfile(info).read()
        if len(data) != info.size:
            raise LambdaInvalid(
                f"{label}: corrupt archive: member {info.name!r} is truncated"
            )
        return _Member(path, "file", data, bool(info.mode & 0o111))
    if info.isdir():
        return _Member(path, "dir") if path else None
    if info.issym():
        return _Member(path, "symlink", link=info.linkname)
    if info.islnk():
        target = _split_member_path(info.linkname, label, "hard link target")
        return _Member(path, "hardlink", link="/".join(target))
    kind = _special_kind(info.ischr(), info.isblk(), info.isfifo())
    raise LambdaInvalid(
        f"{label}: member {info.name!r} is {kind}; only files, "
        f"directories and links are allowed"
    )


def read_tar(data, budget, label):
    """Read every member of a gzip tarball into memory, within limits."""
    members = []
    try:
        with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as gz:
            stream = _BoundedReader(gz, budget.stream_limit, label)
            with tarfile.open(fileobj=stream, mode="r|") as archive:
                for info in archive:
                    member = _member_of(archive, info, budget, label)
                    if member is not None:
                        members.append(member)
            # Reading to the end makes gzip verify its CRC: tar stops at
            # its end marker and would accept silently corrupted data.
            while stream.read(_CHUNK):
                pass
    except (tarfile.TarError, gzip.BadGzipFile, EOFError, zlib.error) as err:
        raise LambdaInvalid(f"{label}: corrupt archive: {err}") from err
    return members


def _strip_top_folder(members, name):
    """Drop a single top folder <name>/ that holds the whole archive."""
    if not members or any(m.path == (HANDLER_FILE,) for m in members):
        return members
    if not all(_under(m, name) for m in members):
        return members
    if any(m.path == (name,) and m.kind != "dir" for m in members):
        return members
    stripped = []
    for member in members:
        if member.path == (name,):
            continue
        link = member.link
        if member.kind == "hardlink":
            link = link.partition("/")[2]
        stripped.append(
            dataclasses.replace(member, path=member.path[1:], link=link)
        )
    return stripped


def _under(member, name):
    if member.path[0] != name:
        return False
    return member.kind != "hardlink" or member.link.split("/")[0] == name


def _read_bounded(path, limit, label, what, follow=True):
    """Read a whole regular file, refusing one larger than `limit`."""
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK
    if not follow:
        flags |= os.O_NOFOLLOW
    try:
        fd = os.open(path, flags)
    except OSError as err:
        raise RegistryUnavailable(
            f"{label}: open {path}: {err.strerror}"
        ) from err
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise LambdaInvalid(f"{label}: {path} is not a regular file")
        if st.st_size > limit:
            raise LambdaInvalid(
                f"{label}: {what} is {st.st_size} bytes, over the limit "
                f"of {limit}"
            )
        try:
            data = _read_fd(fd, limit + 1, st.st_size + 1)
        except OSError as err:
            raise RegistryUnavailable(
                f"{label}: read {path}: {err.strerror}"
            ) from err
    finally:
        os.close(fd)
    if len(data) > limit:
        raise LambdaInvalid(f"{label}: {what} is over the limit of {limit}")
    return data


def _read_fd(fd, most, expected):
    """Up to `most` bytes from fd, read in pieces of the expected size.

    PERF: one read of `most` bytes would allocate a buffer that large
    (the code size limit, 64 MiB) for every file, however small.
    """
    chunks = []
    total = 0
    while total < most:
        chunk = os.read(fd, min(max(expected, 1 << 16), most - total))
        if not chunk:
            break
        chunks.append(chunk)
        total += len(chunk)
    return b"".join(chunks)


def _walk_lstat(root, label):
    """Yield (relative path, full path, lstat result) for every entry under
    `root`, parents before children, in a fixed order."""
    pending = [()]
    while pending:
        rel = pending.pop()
        directory = os.path.join(root, *rel)
        try:
            with os.scandir(directory) as it:
                found = [
                    (e.name, e.path, e.stat(follow_symlinks=False)) for e in it
                ]
        except OSError as err:
            raise RegistryUnavailable(
                f"{label}: list {directory}: {err.strerror}"
            ) from err
        for name, full, st in sorted(found):
            if stat.S_ISDIR(st.st_mode):
                pending.append(rel + (name,))
            yield rel + (name,), full, st


def _read_folder(root, budget, label):
    """Read a registry folder into memory, with the checks of an archive;
    returns (members, stamp), the stamp as _folder_stamp makes it, from
    the lstat that came before each read."""
    members = []
    stamp = [_root_stamp(root, label)]
    for path, full, st in _walk_lstat(root, label):
        stamp.append(_entry_stamp(path, st))
        shown = "/".join(path)
        budget.take_member(shown)
        mode = st.st_mode
        if stat.S_ISDIR(mode):
            members.append(_Member(path, "dir"))
        elif stat.S_ISREG(mode):
            budget.take_bytes(st.st_size, shown)
            # The file may have grown since lstat: it may use what is
            # left of the budget, and the budget is corrected after.
            room = budget.max_bytes - budget.bytes + st.st_size
            data = _read_bounded(full, room, label, shown, follow=False)
            budget.bytes += len(data) - st.st_size
            members.append(_Member(path, "file", data, bool(mode & 0o111)))
        elif stat.S_ISLNK(mode):
            link = _readlink(full, label)
            members.append(_Member(path, "symlink", link=link))
        else:
            kind = _special_kind(
                stat.S_ISCHR(mode),
                stat.S_ISBLK(mode),
                stat.S_ISFIFO(mode),
                stat.S_ISSOCK(mode),
            )
            raise LambdaInvalid(
                f"{label}: {shown!r} is {kind}; only files, directories "
                f"and symlinks are allowed"
            )
    return members, tuple(stamp)


def _readlink(path, label):
    try:
        return os.readlink(path)
    except OSError as err:
        raise RegistryUnavailable(
            f"{label}: readlink {path}: {err.strerror}"
        ) from err


def _folder_stamp(root, limit, label):
    """A cheap fingerprint of a folder: lstat of every entry."""
    stamp = [_root_stamp(root, label)]
    for path, _, st in _walk_lstat(root, label):
        stamp.append(_entry_stamp(path, st))
        if len(stamp) > limit:
            break  # too many members: the full read reports it
    return tuple(stamp)


def _root_stamp(root, label):
    try:
        st = os.stat(root)
    except OSError as err:
        raise RegistryUnavailable(
            f"{label}: stat {root}: {err.strerror}"
        ) from err
    return ((), st.st_mode, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _entry_stamp(path, st):
    return (
        path,
        st.st_mode,
        st.st_size,
        st.st_mtime_ns,
        st.st_ctime_ns,
        st.st_ino,
    )


def _symlink_problem(path, symlinks):
    """Follow the symlink at `path` through the tree, substituting every
    symlink met on the way, and say why it is unsafe (None if it is not).
    Paths that do not exist in the tree are fine: they dangle inside it."""
    stack = list(path[:-1])
    pending = list(reversed(symlinks[path].split("/")))
    hops = 0
    while pending:
        part = pending.pop()
        if part in ("", "."):
            continue
        if part == "..":
            if not stack:
                return "leaves the lambda's tree"
            stack.pop()
            continue
        target = symlinks.get(tuple(stack) + (part,))
        if target is None:
            stack.append(part)
            continue
        hops += 1
        if hops > _MAX_LINK_HOPS:
            return "loops"
        if target.startswith("/"):
            return "goes through a symlink with an absolute target"
        pending.extend(reversed(target.split("/")))
    return None


def check_paths(members, label):
    """Refuse duplicate paths, members under a non-directory, overlong
    names and hard links to anything but an earlier regular file."""
    seen = {}
    parents = set()
    for member in members:
        path = member.path
        if not path:
            raise LambdaInvalid(
                f"{label}: the archive's root entry is not a directory"
            )
        for part in path:
            if len(os.fsencode(part)) > _MAX_NAME_BYTES:
                raise LambdaInvalid(
                    f"{label}: {member.shown!r} has a name component "
                    f"longer than {_MAX_NAME_BYTES} bytes"
                )
        if path in seen:
            raise LambdaInvalid(f"{label}: {member.shown!r} appears twice")
        for i in range(1, len(path)):
            above = seen.get(path[:i])
            if above is not None and above.kind != "dir":
                raise LambdaInvalid(
                    f"{label}: {member.shown!r} sits under "
                    f"{above.shown!r}, which is a {above.kind}"
                )
            parents.add(path[:i])
        if member.kind != "dir" and path in parents:
            raise LambdaInvalid(
                f"{label}: {member.shown!r} is a {member.kind} but other "
                f"members sit under it"
            )
        if member.kind == "hardlink":
            target = seen.get(tuple(member.link.split("/")))
            if target is None or target.kind != "file":
                raise LambdaInvalid(
                    f"{label}: hard link {member.shown!r} points to "
                    f"{member.link!r}, which is not an earlier regular "
                    f"file of the archive"
                )
        seen[path] = member


def check_symlinks(members, label):
    symlinks = {m.path: m.link for m in members if m.kind == "symlink"}
    for path, target in symlinks.items():
        shown = "/".join(path)
        if not target:
            raise LambdaInvalid(f"{label}: symlink {shown!r} is empty")
        if target.startswith("/"):
            raise LambdaInvalid(
                f"{label}: symlink {shown!r} -> {target!r} has an "
                f"absolute target"
            )
        problem = _symlink_problem(path, symlinks)
        if problem:
            raise LambdaInvalid(
                f"{label}: symlink {shown!r} -> {target!r} {problem}"
            )


def _file_data(members, name, label):
    """The content of the top-level file `name`, or None if absent."""
    by_path = {m.path: m for m in members}
    member = by_path.get((name,))
    if member is None:
        return None
    if member.kind == "hardlink":
        member = by_path[tuple(member.link.split("/"))]
    if member.kind != "file":
        raise LambdaInvalid(
            f"{label}: {name} must be a regular file, not a {member.kind}"
        )
    return member.data


def _check_tree(members, label):
    """All structural checks that must pass before anything is written."""
    check_paths(members, label)
    check_symlinks(members, label)
    if _file_data(members, HANDLER_FILE, label) is None:
        raise LambdaInvalid(
            f"{label}: no {HANDLER_FILE} at the top of the code (a tarball "
            f"may also hold it under a single top folder named after the "
            f"lambda)"
        )


def _parse_requirements(text):
    """requirements.txt lines without comments, blanks and continuations."""
    text = re.sub(r"\\\r?\n", "", text)
    requirements = []
    for line in text.splitlines():
        line = re.split(r"(?:^|\s)#", line, maxsplit=1)[0].strip()
        if line:
            requirements.append(line)
    return tuple(requirements)


def _requirements_of(members, label):
    data = _file_data(members, REQUIREMENTS_FILE, label)
    if data is None:
        return ()
    try:
        return _parse_requirements(data.decode("utf-8-sig"))
    except UnicodeDecodeError as err:
        raise LambdaInvalid(
            f"{label}: {REQUIREMENTS_FILE} is not UTF-8: {err}"
        ) from err


def _hash_tree(members):
    """The version: a hash over each member's path, kind, mode and
    content, in path order, with lengths so that no two trees collide."""
    digest = hashlib.sha256(b"sockworker lambda tree 1\0")
    for member in sorted(members, key=lambda m: m.path):
        payload = member.data
        if member.kind in ("symlink", "hardlink"):
            payload = os.fsencode(member.link)
        head = "%s\0%s\0%o\0%d\0" % (
            member.shown,
            member.kind,
            member.mode,
            len(payload),
        )
        digest.update(os.fsencode(head))
        digest.update(payload)
    return digest.hexdigest()[:32]


def write_tree(members, top):
    """Create `members` under the empty directory `top`. Parents are
    created here first, so no path written goes through a symlink."""
    dirs = {m.path for m in members if m.kind == "dir"}
    for member in members:
        dirs.update(member.path[:i] for i in range(1, len(member.path)))
    for path in sorted(dirs, key=len):
        full = os.path.join(top, *path)
        os.mkdir(full, _DIR_MODE)
        os.chmod(full, _DIR_MODE)
    for member in members:
        if member.kind == "file":
            _write_file(os.path.join(top, *member.path), member)
    for member in members:
        full = os.path.join(top, *member.path)
        if member.kind == "symlink":
            os.symlink(member.link, full)
        elif member.kind == "hardlink":
            source = os.path.join(top, *member.link.split("/"))
            os.link(source, full, follow_symlinks=False)


def _write_file(path, member):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
    fd = os.open(path, flags | os.O_CLOEXEC, member.mode)
    with os.fdopen(fd, "wb") as f:
        f.write(member.data)
        os.fchmod(fd, member.mode)


class _LocalSource:
    """A registry in a local folder (given as a path or a file:// URL)."""

    forms = (("folder", ""), ("tar", ".tar.gz"), ("py", ".py"))

    def __init__(self, root, location, max_bytes, max_members):
        self.root = root
        self.location = location
        self.max_bytes = max_bytes
        self.max_members = max_members

    def probe(self, name, entry):
        form, path = self._locate(name)
        label = f"lambda {name!r} from {path}"
        budget = Budget(self.max_bytes, self.max_members, label)
        if form == "folder" and (entry is None or entry.form != form):
            # PERF: nothing to compare with, so the folder is walked once,
            # stamped as it is read; a cold start saves a walk.
            members, stamp = _read_folder(path, budget, label)
            return _Probe(form, path, stamp, members)
        stamp = self._stamp(form, path, label)
        if entry is not None and (entry.form, entry.stamp) == (form, stamp):
            return _Probe(form, path, stamp, None)
        if form == "folder":
            members, _ = _read_folder(path, budget, label)
        else:
            data = _read_bounded(path, self.max_bytes, label, "the file")
            members = _members_of_file(form, data, name, budget, label)
        return _Probe(form, path, stamp, members)

    def _locate(self, name):
        for form, suffix in self.forms:
            path = os.path.join(self.root, name + suffix)
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            except OSError as err:
                raise RegistryUnavailable(
                    f"registry {self.location}: stat {path}: {err.strerror}"
                ) from err
            if stat.S_ISDIR(st.st_mode) == (form == "folder"):
                return form, path
        self._check_root()
        raise LambdaNotFound(
            f"lambda {name!r} not found in registry {self.location}"
        )

    def _check_root(self):
        try:
            st = os.stat(self.root)
        except OSError as err:
            raise RegistryUnavailable(
                f"registry {self.location}: stat {self.root}: {err.strerror}"
            ) from err
        if not stat.S_ISDIR(st.st_mode):
            raise RegistryUnavailable(
                f"registry {self.location}: {self.root} is not a directory"
            )

    def _stamp(self, form, path, label):
        if form == "folder":
            return _folder_stamp(path, self.max_members, label)
        try:
            st = os.stat(path)
        except OSError as err:
            raise RegistryUnavailable(
                f"{label}: stat {path}: {err.strerror}"
            ) from err
        return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


class _HttpSource:
    """A registry served over HTTP(S): <base>/<name>.tar.gz or .py."""

    forms = (("tar", ".tar.gz"), ("py", ".py"))

    def __init__(self, base, location, max_bytes, max_members, timeout):
        self.base = base if base.endswith("/") else base + "/"
        self.location = location
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.timeout = timeout
        self.opener = urllib.request.build_opener()

    def probe(self, name, entry):
        for form, suffix in self.forms:
            url = self.base + urllib.parse.quote(name + suffix)
            label = f"lambda {name!r} from {url}"
            validators = None
            if entry is not None and entry.form == form:
                validators = entry.stamp
            result = self._fetch(url, validators, label)
            if result is None:
                continue
            if result == "not modified":
                return _Probe(form, url, validators, None)
            data, stamp = result
            budget = Budget(self.max_bytes, self.max_members, label)
            members = _members_of_file(form, data, name, budget, label)
            return _Probe(form, url, stamp, members)
        raise LambdaNotFound(
            f"lambda {name!r} not found in registry {self.location}"
        )

    def _fetch(self, url, validators, label):
        """GET `url`: (body, validators), "not modified", or None for a
        404."""
        request = urllib.request.Request(url, headers=_conditional(validators))
        try:
            response = self.opener.open(request, timeout=self.timeout)
        except urllib.error.HTTPError as err:
            if err.fp is not None:
                err.close()
            if err.code == 304 and validators:
                return "not modified"
            if err.code in (404, 410):
                return None
            raise RegistryUnavailable(
                f"{label}: HTTP {err.code} {err.reason}"
            ) from err
        except (OSError, http.client.HTTPException) as err:
            reason = getattr(err, "reason", None) or err
            raise RegistryUnavailable(f"{label}: {reason}") from err
        with response:
            if response.status != 200:
                raise RegistryUnavailable(
                    f"{label}: unexpected HTTP {response.status}"
                )
            data = self._read_body(response, label)
            stamp = (
                response.headers.get("ETag"),
                response.headers.get("Last-Modified"),
            )
        return data, stamp

    def _read_body(self, response, label):
        length = response.headers.get("Content-Length")
        if length and length.isdigit() and int(length) > self.max_bytes:
            raise LambdaInvalid(
                f"{label}: download is {length} bytes, over the limit of "
                f"{self.max_bytes}"
            )
        chunks = []
        size = 0
        try:
            while chunk := response.read(_CHUNK):
                size += len(chunk)
                if size > self.max_bytes:
                    raise LambdaInvalid(
                        f"{label}: download is over the limit of "
                        f"{self.max_bytes} bytes"
                    )
                chunks.append(chunk)
        except (OSError, http.client.HTTPException) as err:
            raise RegistryUnavailable(f"{label}: read body: {err}") from err
        return b"".join(chunks)


def _conditional(validators):
    headers = {"User-Agent": "sockworker-registry"}
    if validators:
        etag, last_modified = validators
        if etag:
            headers["If-None-Match"] = etag
        if last_modified:
            headers["If-Modified-Since"] = last_modified
    return headers


def _members_of_file(form, data, name, budget, label):
    """Members of a downloaded or read file: a tarball or a single .py."""
    if form == "py":
        budget.take_member(HANDLER_FILE)
        budget.take_bytes(len(data), HANDLER_FILE)
        return [_Member((HANDLER_FILE,), "file", data)]
    return _strip_top_folder(read_tar(data, budget, label), name)


def _source_for(location, max_bytes, max_members, timeout):
    """Pick the source for a `registry` config value (None if empty)."""
    if not location:
        return None
    if not _URL_RE.match(location):
        root = os.path.abspath(location)
        return _LocalSource(root, location, max_bytes, max_members)
    url = urllib.parse.urlsplit(location)
    if url.scheme in ("http", "https") and url.netloc:
        return _HttpSource(location, location, max_bytes, max_members, timeout)
    if url.scheme == "file" and url.netloc in ("", "localhost"):
        root = urllib.parse.unquote(url.path)
        return _LocalSource(root, location, max_bytes, max_members)
    raise ValueError(
        f"registry location {location!r}: unsupported; use a folder path, "
        f"a file:// URL or an http(s):// URL"
    )


class _NameLocks:
    """One lock per lambda name, kept only while someone holds or waits
    for it, so that requests for many unknown names cannot grow it."""

    def __init__(self):
        self._guard = threading.Lock()
        self._slots = {}  # name -> [lock, holders and waiters]

    @contextlib.contextmanager
    def hold(self, name):
        with self._guard:
            slot = self._slots.setdefault(name, [threading.Lock(), 0])
            slot[1] += 1
        try:
            with slot[0]:
                yield
        finally:
            with self._guard:
                slot[1] -= 1
                if slot[1] == 0:
                    del self._slots[name]


def _pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Registry:
    """Lambda code from `location`, unpacked and cached under `cache_dir`.

    See the module docstring for the formats, the checks, the cache layout
    and the update rules. `get()` is safe to call from many threads;
    `sweep()` and `remove_unused()` may run alongside it.
    """

    def __init__(
        self,
        location: str,
        cache_dir: str,
        refresh_seconds: float = 5.0,
        max_bytes: int = 64 << 20,
        max_members: int = 10000,
        timeout: float = 10.0,
    ):
        _check_positive("max_bytes", max_bytes)
        _check_positive("max_members", max_members)
        _check_positive("timeout", timeout)
        if refresh_seconds < 0:
            raise ValueError(
                f"registry refresh_seconds must be >= 0, not "
                f"{refresh_seconds!r}"
            )
        if not cache_dir:
            raise ValueError("registry cache_dir must not be empty")
        self.location = location
        self.cache_dir = os.path.abspath(cache_dir)
        self.refresh_seconds = refresh_seconds
        self._source = _source_for(location, max_bytes, max_members, timeout)
        self._entries = {}
        self._locks = _NameLocks()
        # Temporary directories that an unpack or a removal is using now.
        self._busy = set()
        self._busy_guard = threading.Lock()
        self._make_cache_dir()

    def _make_cache_dir(self):
        try:
            os.makedirs(self.cache_dir, _DIR_MODE, exist_ok=True)
        except OSError as err:
            raise OSError(
                err.errno,
                f"create registry cache dir: {err.strerror}",
                self.cache_dir,
            ) from err

    def get(self, name: str) -> LambdaCode:
        """The current code of lambda `name`, pulled if not yet cached or
        if `refresh_seconds` have passed and the registry has a change.

        Raises BadRequest, LambdaNotFound, LambdaInvalid or
        RegistryUnavailable.
        """
        check_name(name)
        entry = self._entries.get(name)
        if entry is not None and self._fresh(entry):
            return entry.code
        if self._source is None:
            raise LambdaNotFound(
                f"lambda {name!r} not found: no registry is configured"
            )
        with self._locks.hold(name):
            entry = self._entries.get(name)
            if entry is not None and self._fresh(entry):
                return entry.code  # another thread checked it meanwhile
            return self._check(name, entry)

    def _fresh(self, entry):
        return _now() - entry.checked < self.refresh_seconds

    def _check(self, name, entry):
        """Ask the source about `name` and make its current version. Called
        with the lambda's lock held."""
        started = _now()
        try:
            probe = self._source.probe(name, entry)
            if probe.members is None:
                self._entries[name] = dataclasses.replace(
                    entry, checked=started, stamp=probe.stamp
                )
                return entry.code
            code = self._make_version(name, probe)
        except RegistryUnavailable as err:
            if entry is None:
                raise
            log.warning(
                "lambda %r: registry check failed, keeping version %s: %s",
                name,
                entry.code.version,
                err.message,
            )
            self._entries[name] = dataclasses.replace(entry, checked=started)
            return entry.code
        except (LambdaNotFound, LambdaInvalid):
            self._entries.pop(name, None)
            raise
        self._entries[name] = _Entry(code, started, probe.form, probe.stamp)
        return code

    def _make_version(self, name, probe):
        label = f"lambda {name!r} from {probe.origin}"
        _check_tree(probe.members, label)
        requirements = _requirements_of(probe.members, label)
        version = _hash_tree(probe.members)
        root = os.path.join(self.cache_dir, name, version, "layer")
        code = LambdaCode(
            name=name,
            version=version,
            root=root,
            code_dir=os.path.join(root, "handler"),
            requirements=requirements,
        )
        current = self._entries.get(name)
        if current is not None and current.code == code:
            return current.code
        if not os.path.isdir(code.code_dir):
            self._unpack(name, version, probe.members)
            log.info(
                "lambda %r: unpacked version %s from %s (%d members)",
                name,
                version,
                probe.origin,
                len(probe.members),
            )
        return code

    def _unpack(self, name, version, members):
        """Write a version into a temporary directory and rename it into
        place, so that the version directory is complete or absent."""
        tmp = self._make_tmp(name)
        try:
            os.chmod(tmp, _DIR_MODE)
            handler = os.path.join(tmp, "layer", "handler")
            for directory in (os.path.dirname(handler), handler):
                os.mkdir(directory, _DIR_MODE)
                os.chmod(directory, _DIR_MODE)
            write_tree(members, handler)
            write_bytecode(members, handler)
            self._move_into_place(tmp, name, version)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CodeCacheFull(
                    f"unpack lambda {name!r} version {version}: the code "
                    f"cache {self.cache_dir} is full ({err.strerror})"
                ) from err
            raise OSError(
                err.errno,
                f"unpack lambda {name!r} version {version}: {err.strerror}",
                err.filename,
            ) from err
        finally:
            self._drop_tmp(tmp)

    def _make_tmp(self, name):
        """A new temporary directory, marked busy as it is made so that a
        concurrent sweep() never takes it for a leftover."""
        prefix = f"{_TMP_PREFIX}{os.getpid()}-{name}-"
        with self._busy_guard:
            tmp = tempfile.mkdtemp(prefix=prefix, dir=self.cache_dir)
            self._busy.add(tmp)
        return tmp

    def _drop_tmp(self, tmp):
        if os.path.lexists(tmp):
            self._remove_tree(tmp)
        with self._busy_guard:
            self._busy.discard(tmp)

    def _move_into_place(self, tmp, name, version):
        name_dir = os.path.join(self.cache_dir, name)
        try:
            os.mkdir(name_dir, _DIR_MODE)
            os.chmod(name_dir, _DIR_MODE)
        except FileExistsError:
            pass
        try:
            os.rename(tmp, os.path.join(name_dir, version))
        except OSError as err:
            # Another process unpacked the same version first; the
            # content is identical, so theirs is as good as ours.
            if err.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise

    def sweep(self) -> None:
        """Remove temporary directories left by crashed pulls: those of
        dead processes, and this process's own that no pull is using."""
        pid = os.getpid()
        for entry in self._scan(self.cache_dir):
            if not entry.name.startswith(_TMP_PREFIX):
                continue
            owner = entry.name[len(_TMP_PREFIX) :].split("-", 1)[0]
            with self._busy_guard:
                if entry.path in self._busy:
                    continue
            if owner.isdigit() and int(owner) != pid:
                if _pid_alive(int(owner)):
                    continue
            log.info("registry: removing leftover %s", entry.path)
            self._remove_tree(entry.path)

    def remove_unused(
        self, in_use: set[tuple[str, str]], keep_current: bool = True
    ) -> None:
        """Delete every version directory not listed in `in_use` as
        (name, version), except the current version of each lambda unless
        `keep_current` is false. A lambda whose current version goes is
        pulled again on its next get()."""
        for name_entry in self._scan(self.cache_dir):
            name = name_entry.name
            if not _NAME_RE.fullmatch(name):
                continue
            if not name_entry.is_dir(follow_symlinks=False):
                continue
            with self._locks.hold(name):
                self._remove_versions(
                    name, name_entry.path, in_use, keep_current
                )

    def _remove_versions(self, name, name_dir, in_use, keep_current):
        entry = self._entries.get(name)
        current = entry.code.version if entry is not None else None
        if current is not None and not keep_current:
            if (name, current) not in in_use:
                del self._entries[name]
                current = None
        for version_entry in self._scan(name_dir):
            version = version_entry.name
            if not _VERSION_RE.fullmatch(version):
                continue
            if version == current or (name, version) in in_use:
                continue
            # Renaming first means a crash mid-delete leaves a temporary
            # directory for sweep(), never a half-deleted version that a
            # later get() would take as complete.
            doomed = self._make_tmp(name)
            try:
                os.rename(version_entry.path, os.path.join(doomed, version))
            finally:
                self._drop_tmp(doomed)
            log.info("lambda %r: removed unused version %s", name, version)
        try:
            os.rmdir(name_dir)
        except OSError as err:
            if err.errno != errno.ENOTEMPTY:
                raise

    def _scan(self, directory):
        try:
            with os.scandir(directory) as it:
                return list(it)
        except OSError as err:
            raise OSError(
                err.errno, f"list registry cache: {err.strerror}", directory
            ) from err

    def _remove_tree(self, path):
        try:
            shutil.rmtree(path)
        except OSError as err:
            raise OSError(
                err.errno,
                f"remove from registry cache: {err.strerror}",
                err.filename,
            ) from err


def _check_positive(what, value):
    if not value > 0:
        raise ValueError(f"registry {what} must be > 0, not {value!r}")


def compile_code(tree, seen_at):
    """Write bytecode beside every module under `tree`, which a sandbox
    sees at `seen_at`, as the unpack does (see write_bytecode), for code
    that is already on disk."""
    members = []
    for directory, _, files in os.walk(tree):
        rel = os.path.relpath(directory, tree).split(os.sep)
        rel = tuple(part for part in rel if part != ".")
        for filename in files:
            if filename.endswith(".py"):
                with open(os.path.join(directory, filename), "rb") as f:
                    data = f.read()
                members.append(_Member((*rel, filename), "file", data))
    write_bytecode(members, tree, seen_at)


def write_bytecode(members, top, seen_at=SANDBOX_CODE_DIR):
    """Write bytecode beside the modules among `members`, unpacked under
    `top`, from the source held in memory. The code objects are named as
    a sandbox sees the files, under `seen_at`, so the bytecode holds no
    host path (the importer puts the real path in at import anyway).

    PERF: the code layer is read-only inside a sandbox, so without this
    every cold start compiles f.py again. The files are unchecked-hash
    .pyc files, valid whatever the files' times, written straight into
    the unpack's temporary tree (py_compile would read each source back
    and write through a temporary file of its own). An image whose
    Python has another version ignores them: its cache tag differs. A
    module that does not compile is left for the sandbox to report when
    it imports it.
    """
    made = set()
    for member in members:
        if member.kind != "file" or not member.path[-1].endswith(".py"):
            continue
        source = os.path.join(top, *member.path)
        target = importlib.util.cache_from_source(source, optimization="")
        in_sandbox = "/".join((seen_at, *member.path))
        try:
            code = compile(
                member.data, in_sandbox, "exec", dont_inherit=True, optimize=0
            )
        except (SyntaxError, ValueError, RecursionError):
            continue
        data = b"".join(
            (
                importlib.util.MAGIC_NUMBER,
                _UNCHECKED_HASH_PYC.to_bytes(4, "little"),
                importlib.util.source_hash(member.data),
                marshal.dumps(code),
            )
        )
        try:
            _make_cache_dir_once(os.path.dirname(target), made)
            _remove_old_bytecode(target)
            _write_file(target, _Member(member.path, "file", data))
        except OSError:
            continue


def _remove_old_bytecode(path):
    """A tree from a registry may hold bytecode of its own, which the
    worker's replaces. Unlinked, not overwritten: it may be a hard link
    to another member."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _make_cache_dir_once(path, made):
    if path in made:
        return
    try:
        os.mkdir(path, _DIR_MODE)
        os.chmod(path, _DIR_MODE)
    except FileExistsError:
        pass
    made.add(path)
