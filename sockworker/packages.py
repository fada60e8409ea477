"""The package store: the Python packages that lambdas declare in
requirements.txt, each installed once into an overlay layer.

A requirement is a package name with an optional version specifier, as
OpenLambda users write them: `numpy==1.26.4` (pinned) or `numpy`
(unpinned), also `numpy<2` and friends. Extras are accepted and ignored,
environment markers are evaluated against the worker's Python (the image
has the same version), and pip options, URLs and editable installs are
refused.

Layout. A package lives in <store>/<name>/<version>/layer/, where `name`
is normalized as PEP 503 says and `version` as PEP 440 says. The layer
holds what `pip install --target` made, under opt/sockworker/packages/, so
stacking the layers of several packages in one overlay gives a single
/opt/sockworker/packages with exactly those packages. Files are 0644 (0755
when executable) and directories 0755: handlers run as nobody. A version
directory is written under <store>/.tmp-... and renamed into place, so it
is either complete or absent; sweep() removes the temporary directories
of installs that a crash interrupted. Stored versions are never removed:
an unpinned requirement resolves to the newest stored version that
satisfies it, so `numpy` is installed once and then kept until the store
is cleared (with the worker stopped).

Installing. Setup scripts of packages are untrusted code, so pip never
runs on the host. Each install creates a sandbox from the backend factory
(host network, for the package index; larger memory) whose handler runs
the image's `pip install --no-deps --no-compile --target /tmp/out <req>`.
--no-deps makes exactly the declared packages importable, nothing they
depend on. The same sandbox then compiles the files to hash-based .pyc
(see COMPILE_ARGS). The handler replies with /tmp/out as a gzip tarball
in base64 inside its JSON reply (the container's writable layer is a
tmpfs that only its mount namespace sees), and the host unpacks it with
the registry's checks: relative paths without `..`, links that stay
inside the tree, no devices, bounded size and member count. The
package's name and version come from the METADATA of its .dist-info. The
sandbox is destroyed after every install, whatever the outcome.

The host's pip configuration (index URLs, trusted hosts, find-links, the
CA bundle, constraints, timeouts and proxies, from the global and user
pip.conf files, PIP_CONFIG_FILE and the matching PIP_* variables) is
merged into the sandbox's /etc/pip.conf and environment. Files it names
are copied into the sandbox at the same path; local directories it names
(find-links folders, file:// indexes) are mirrored there with hard links.

Threads. Any number of threads may call resolve(). A stored package is
found with a directory listing and no lock. Installs of one name are
serialized by a per-name lock, and whoever waited looks again before
installing, so concurrent callers install a requirement once. Installs of
different names run in parallel in one shared install backend, which is
started for the first and closed after the last.
"""

import base64
import binascii
import configparser
import contextlib
import email.parser
import errno
import json
import logging
import os
import re
import shlex
import shutil
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass

from packaging.requirements import InvalidRequirement
from packaging.requirements import Requirement as PipRequirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import InvalidVersion, Version

from sockworker import registry
from sockworker.errors import (
    HandlerTimeout,
    LambdaInvalid,
    SandboxDied,
    WorkerError,
)
from sockworker.guest import protocol
from sockworker.sandbox.backend import SockBackend
from sockworker.sandbox.cgroups import Limits
from sockworker.sandbox.container import SandboxError

log = logging.getLogger(__name__)

# Where package layers show their files inside a container.
PACKAGES_PATH = "/opt/sockworker/packages"
LAYER_SUBDIR = os.path.join("opt", "sockworker", "packages")

DEFAULT_TIMEOUT = 300
# numpy unpacks to about 60 MB; the largest wheels (torch) do not fit in
# a reply frame anyway.
DEFAULT_MAX_BYTES = 512 << 20
DEFAULT_MAX_MEMBERS = 100_000
# The install sandbox's limits (see install_backend_factory).
INSTALL_MEMORY_BYTES = 1 << 30
INSTALL_PIDS = 256
INSTALL_SCRATCH_BYTES = 1 << 30

# What pip's own output contributes to an error message.
OUTPUT_LINES = 6
OUTPUT_LINE_CHARS = 400
OUTPUT_TAIL_BYTES = 64 << 10

_TMP_PREFIX = ".tmp-"
_NAME_RE = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
_VERSION_RE = re.compile(r"[0-9a-z][0-9a-z.!+-]*")
_DIR_MODE = 0o755
_FILE_MODE = 0o644
# A local package source larger than this is refused rather than
# mirrored: it is most likely a mistake, such as a home directory.
_MAX_MIRROR_ENTRIES = 200_000

PIP_ARGS = (
    "install",
    "--no-deps",
    "--no-compile",
    "--disable-pip-version-check",
    "--no-cache-dir",
    "--no-input",
    "--progress-bar",
    "off",
)
# NOTE: pip's own bytecode is timestamp-checked and the store does not
# keep mtimes, so every import would recompile (and could not save) it.
# Unchecked hash-based .pyc files stay valid: the store never changes a
# file. Measured: `import numpy` in a fresh container 230 ms -> 90 ms.
COMPILE_ARGS = ("-q", "-j0", "--invalidation-mode", "unchecked-hash")
SANDBOX_OUT = "/tmp/out"
SANDBOX_ENV = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "HOME": "/tmp",
    "TMPDIR": "/tmp",
    "LANG": "C.UTF-8",
}


class PackageError(WorkerError):
    """A package cannot be resolved or installed; the message names the
    package and the reason (pip's own last words when pip failed)."""

    status = 500
    kind = "package_error"


@dataclass(frozen=True)
class Package:
    """One installed version of a package. `layer` is an overlay lower
    layer whose files sit under opt/sockworker/packages/; it does not
    change and is not removed while the store exists."""

    name: str
    version: str
    layer: str


@dataclass(frozen=True)
class Requirement:
    """One requirements.txt line, parsed. `name` is PEP 503 normalized;
    `specifier` may be empty (unpinned)."""

    line: str
    name: str
    specifier: SpecifierSet

    @property
    def pinned(self):
        """The exact version of a `name==version` pin, else None."""
        specs = list(self.specifier)
        if len(specs) != 1 or specs[0].operator not in ("==", "==="):
            return None
        if specs[0].version.endswith(".*"):
            return None
        return specs[0].version

    def pip_argument(self):
        """What pip is given: rebuilt from the parsed parts, so that no
        option or URL a line might hide reaches pip."""
        return f"{self.name}{self.specifier}"

    def accepts(self, version):
        # Every stored version was chosen by pip for some requirement, so
        # a pre-release in the store was asked for and may be reused.
        return self.specifier.contains(version, prereleases=True)

    def __str__(self):
        return self.line


def normalize_name(name):
    """The PEP 503 form of a package name: lowercase, runs of `-_.` made
    one `-`."""
    return canonicalize_name(name)


def parse_requirement(line):
    """Parse one requirements.txt line into a Requirement, or None when
    its environment marker excludes this Python. Raises PackageError for
    anything but `name[extras] specifiers ; marker`."""
    text = line.strip()
    if text.startswith("-"):
        raise PackageError(
            f"requirement {line!r} is invalid: pip options in "
            f"requirements.txt are not supported; list packages only"
        )
    try:
        parsed = PipRequirement(text)
    except InvalidRequirement as exc:
        reason = str(exc).splitlines()[0]
        raise PackageError(
            f"requirement {line!r} is invalid: {reason}"
        ) from exc
    if parsed.url:
        raise PackageError(
            f"requirement {line!r} is invalid: direct URL requirements "
            f"are not supported; name a package from the index"
        )
    if parsed.marker is not None and not parsed.marker.evaluate():
        log.info("requirement %r skipped: its marker excludes it", line)
        return None
    return Requirement(text, normalize_name(parsed.name), parsed.specifier)


def parse_requirements(lines):
    """Parse requirements.txt lines; a package listed twice is refused
    because only one version of it can be importable."""
    wanted = {}
    for line in lines:
        requirement = parse_requirement(line)
        if requirement is None:
            continue
        earlier = wanted.get(requirement.name)
        if earlier is not None:
            raise PackageError(
                f"package {requirement.name!r} is required twice: "
                f"{earlier.line!r} and {requirement.line!r}"
            )
        wanted[requirement.name] = requirement
    return list(wanted.values())


class PackageStore:
    """Installs packages into overlay layers under store_dir, once each.

    backend_factory is a zero-argument callable returning a started
    SockBackend meant for installs (host network, room for pip: see
    install_backend_factory). The store calls it when an install starts
    and no install backend is running, shares that backend between
    concurrent installs, and closes it after the last one, so no sandbox,
    cgroup or thread of it outlives an install. Each install runs in a
    sandbox of its own that is destroyed afterwards, and takes at most
    `timeout` seconds.
    """

    def __init__(
        self,
        store_dir,
        backend_factory,
        timeout=DEFAULT_TIMEOUT,
        max_bytes=DEFAULT_MAX_BYTES,
        max_members=DEFAULT_MAX_MEMBERS,
    ):
        self.store_dir = store_dir
        self.backend_factory = backend_factory
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.max_members = max_members
        self.name_locks = {}
        self.name_locks_guard = threading.Lock()
        self.backend = None
        self.backend_users = 0
        self.backend_guard = threading.Lock()

    def resolve(self, requirements):
        """The packages for requirements.txt lines, installing the missing
        ones; sorted by name. Raises PackageError naming the first package
        that cannot be had; the others stay installed."""
        packages = [
            self.resolve_one(requirement)
            for requirement in parse_requirements(requirements)
        ]
        return tuple(sorted(packages, key=lambda package: package.name))

    def resolve_one(self, requirement):
        package = self.find(requirement)
        if package is not None:
            return package
        with self.lock_for(requirement.name):
            # Another thread may have installed it while this one waited.
            package = self.find(requirement)
            if package is not None:
                return package
            return self.install(requirement)

    def lock_for(self, name):
        with self.name_locks_guard:
            return self.name_locks.setdefault(name, threading.Lock())

    def find(self, requirement):
        """The newest stored version that satisfies requirement, or
        None."""
        best = None
        for version in self.stored_versions(requirement.name):
            if requirement.accepts(version) and (
                best is None or version > best
            ):
                best = version
        if best is None:
            return None
        return self.package(requirement.name, str(best))

    def stored_versions(self, name):
        name_dir = os.path.join(self.store_dir, name)
        try:
            entries = os.listdir(name_dir)
        except FileNotFoundError:
            return []
        versions = []
        for entry in entries:
            if entry.startswith("."):
                continue
            try:
                version = Version(entry)
            except InvalidVersion:
                log.warning(
                    "ignoring %s: not a version", os.path.join(name_dir, entry)
                )
                continue
            if str(version) == entry:
                versions.append(version)
        return versions

    def package(self, name, version):
        layer = os.path.join(self.store_dir, name, version, "layer")
        return Package(name, version, layer)

    def install(self, requirement):
        """Install requirement in a sandbox and publish it in the store."""
        label = f"install package {requirement.line!r}"
        started = time.monotonic()
        staging = self.make_staging(label)
        try:
            sandbox_layer = os.path.join(staging, "sandbox")
            build_sandbox_layer(sandbox_layer, load_pip_setup())
            reply = self.run_installer(sandbox_layer, requirement, label)
            members = self.unpack_reply(reply, label)
            name, version = installed_identity(members, requirement, label)
            version_dir = os.path.join(staging, "version")
            write_layer(members, version_dir, label)
            package = self.publish(version_dir, name, version, label)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        log.info(
            "installed package %s %s for %r in %.1f s",
            package.name,
            package.version,
            requirement.line,
            time.monotonic() - started,
        )
        return package

    def make_staging(self, label):
        try:
            os.makedirs(self.store_dir, mode=_DIR_MODE, exist_ok=True)
            return tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.store_dir)
        except OSError as exc:
            raise PackageError(
                f"{label}: make a temporary directory in {self.store_dir}: "
                f"{exc.strerror}"
            ) from exc

    def run_installer(self, sandbox_layer, requirement, label):
        """Create the install sandbox, run pip there, destroy it; the
        handler's reply as a dict."""
        body = json.dumps(
            {
                "pip_args": pip_command(requirement),
                "compile_args": list(COMPILE_ARGS),
                "output_tail_bytes": OUTPUT_TAIL_BYTES,
                "max_archive_bytes": archive_limit(),
            }
        ).encode()
        backend = self.acquire_backend(label)
        try:
            container = create_sandbox(backend, sandbox_layer, label)
            try:
                status, payload = container.request(body, self.timeout)
            finally:
                container.destroy()
        except HandlerTimeout as exc:
            raise PackageError(
                f"{label}: pip ran longer than {self.timeout:g} s"
            ) from exc
        except SandboxDied as exc:
            raise PackageError(
                f"{label}: the install sandbox died: "
                f"{exc.details.get('reason', exc)}"
            ) from exc
        finally:
            self.release_backend()
        return parse_reply(status, payload, label)

    def acquire_backend(self, label):
        with self.backend_guard:
            if self.backend is None:
                try:
                    self.backend = self.backend_factory()
                except Exception as exc:
                    raise PackageError(
                        f"{label}: start the install backend: {exc}"
                    ) from exc
            self.backend_users += 1
            return self.backend

    def release_backend(self):
        with self.backend_guard:
            self.backend_users -= 1
            if self.backend_users == 0:
                backend, self.backend = self.backend, None
                backend.close()

    def unpack_reply(self, reply, label):
        try:
            archive = base64.b64decode(reply["archive"], validate=True)
        except (KeyError, TypeError, binascii.Error) as exc:
            raise PackageError(
                f"{label}: the install sandbox sent no valid archive"
            ) from exc
        return unpack_archive(archive, self.max_bytes, self.max_members, label)

    def publish(self, version_dir, name, version, label):
        """Rename the finished version directory into place. If the same
        version is already there (installed for another requirement
        meanwhile), that one is kept."""
        package = self.package(name, version)
        final = os.path.dirname(package.layer)
        try:
            os.makedirs(os.path.dirname(final), mode=_DIR_MODE, exist_ok=True)
            os.rename(version_dir, final)
        except OSError as exc:
            if exc.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise PackageError(
                    f"{label}: publish {final}: {exc.strerror}"
                ) from exc
            log.info("package %s %s was installed meanwhile", name, version)
        return package

    def sweep(self):
        """Remove the temporary directories of installs that a crash
        interrupted, and the install sandboxes a killed worker left (by
        starting an install backend, whose start sweeps its leftovers).
        Call it before the first resolve()."""
        removed = 0
        try:
            entries = os.listdir(self.store_dir)
        except FileNotFoundError:
            entries = []
        for entry in entries:
            if entry.startswith(_TMP_PREFIX):
                shutil.rmtree(
                    os.path.join(self.store_dir, entry), ignore_errors=True
                )
                removed += 1
        if removed:
            log.warning(
                "swept %d unfinished package installs in %s",
                removed,
                self.store_dir,
            )
        with self.backend_guard:
            if self.backend is not None:
                return
            try:
                self.backend_factory().close()
            except Exception as exc:
                raise PackageError(
                    f"sweep install sandboxes of {self.store_dir}: {exc}"
                ) from exc


def create_sandbox(backend, sandbox_layer, label):
    env = dict(SANDBOX_ENV)
    env.update(forwarded_environment(os.environ))
    try:
        return backend.create(sandbox_layer, env)
    except SandboxError as exc:
        raise PackageError(
            f"{label}: create the install sandbox: {exc}"
        ) from exc


def pip_command(requirement):
    return [
        *PIP_ARGS,
        "--target",
        SANDBOX_OUT,
        "--",
        requirement.pip_argument(),
    ]


def archive_limit():
    """The largest base64 archive whose reply still fits in a frame, with
    room for the rest of the JSON."""
    return protocol.MAX_FRAME - OUTPUT_TAIL_BYTES * 2 - 4096


def install_backend_factory(
    backend_state_dir,
    image_path,
    memory_bytes=INSTALL_MEMORY_BYTES,
    pids=INSTALL_PIDS,
    scratch_bytes=INSTALL_SCRATCH_BYTES,
):
    """A backend_factory for PackageStore: SockBackends with the host's
    network (pip needs the package index), 1 GiB of memory and of scratch
    space (pip unpacks wheels on the tmpfs) and no prepared pool.

    backend_state_dir must not be the worker's own state directory: a
    backend sweeps its state directory's sandboxes when it starts.
    """

    def factory():
        backend = SockBackend(
            backend_state_dir,
            image_path,
            Limits(memory_bytes=memory_bytes, pids=pids),
            network="host",
            scratch_bytes=scratch_bytes,
            prepared=0,
        )
        backend.start()
        return backend

    return factory


# -- the hand-off ---------------------------------------------------------

# The install sandbox's handler. It runs under the image's Python as
# nobody; what it returns comes back as the JSON reply.
INSTALLER = '''\
"""Runs pip for the worker's package store and returns what it made."""

import base64
import io
import os
import subprocess
import sys
import tarfile

OUT = "/tmp/out"


def f(event):
    run = subprocess.run(
        [sys.executable, "-m", "pip", *event["pip_args"]],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd="/tmp",
    )
    tail = event["output_tail_bytes"]
    output = run.stdout[-tail:].decode("utf-8", "replace")
    if run.returncode != 0:
        return {
            "ok": False,
            "error": f"pip exited with status {run.returncode}",
            "output": output,
        }
    # A file that does not compile (Python 2 leftovers) just stays
    # without bytecode, as it would after pip's own compile step.
    subprocess.run(
        [sys.executable, "-m", "compileall", *event["compile_args"], OUT],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd="/tmp",
    )
    encoded = base64.b64encode(pack(OUT))
    if len(encoded) > event["max_archive_bytes"]:
        return {
            "ok": False,
            "error": f"the installed files compress to {len(encoded)} "
            f"bytes in base64, over the reply limit of "
            f"{event['max_archive_bytes']}",
            "output": output,
        }
    return {"ok": True, "output": output, "archive": encoded.decode()}


def pack(top):
    raw = io.BytesIO()
    # Level 1: most of a large package is shared libraries, which hardly
    # compress; the time goes to the bytes that do not shrink anyway.
    with tarfile.open(fileobj=raw, mode="w:gz", compresslevel=1) as tar:
        tar.add(top, arcname=".")
    return raw.getvalue()
'''


def parse_reply(status, payload, label):
    """The installer's reply as a dict; PackageError with pip's last
    lines if the install failed."""
    try:
        reply = json.loads(payload)
    except ValueError as exc:
        raise PackageError(
            f"{label}: the install sandbox replied with invalid JSON"
        ) from exc
    if status != protocol.REPLY_OK:
        message = reply.get("message") if isinstance(reply, dict) else None
        raise PackageError(f"{label}: the installer failed: {message}")
    if not isinstance(reply, dict):
        raise PackageError(f"{label}: the installer replied {reply!r}")
    output = str(reply.get("output", ""))
    if not reply.get("ok"):
        error = reply.get("error", "the installer failed")
        raise PackageError(f"{label}: {error}{pip_tail(output)}")
    log.debug("%s: pip said:\n%s", label, output)
    return reply


def pip_tail(output):
    """pip's reason in a few lines: its ERROR lines if it printed any
    (the rest is progress), else the last lines of its output."""
    lines = [line.rstrip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR:")]
    chosen = [
        line
        if len(line) <= OUTPUT_LINE_CHARS
        else line[:OUTPUT_LINE_CHARS] + "..."
        for line in (errors or lines)[-OUTPUT_LINES:]
    ]
    if not chosen:
        return ""
    return ":\n" + "\n".join(chosen)


# -- unpacking ------------------------------------------------------------


def unpack_archive(archive, max_bytes, max_members, label):
    """Read and check the installer's tarball with the registry's rules;
    its members, in memory."""
    label = f"{label}: archive from the install sandbox"
    budget = registry.Budget(max_bytes, max_members, label)
    try:
        members = registry.read_tar(archive, budget, label)
        registry.check_paths(members, label)
        registry.check_symlinks(members, label)
    except LambdaInvalid as exc:
        raise PackageError(exc.message) from exc
    return members


def installed_identity(members, requirement, label):
    """(name, version) from the METADATA of the one .dist-info that
    belongs to requirement, checked against it."""
    found = []
    for member in members:
        path = member.path
        if (
            len(path) == 2
            and path[0].endswith(".dist-info")
            and path[1] == "METADATA"
            and member.kind == "file"
        ):
            found.append(read_metadata(member.data, label))
    mine = [item for item in found if item[0] == requirement.name]
    if len(mine) != 1:
        seen = ", ".join(f"{n} {v}" for n, v in found) or "no .dist-info"
        raise PackageError(
            f"{label}: pip did not install exactly one {requirement.name} "
            f"(found {seen})"
        )
    name, version = mine[0]
    if not requirement.accepts(Version(version)):
        raise PackageError(
            f"{label}: pip installed {name} {version}, which does not "
            f"satisfy {requirement.line!r}"
        )
    return name, version


def read_metadata(data, label):
    """(normalized name, normalized version) from a METADATA file."""
    headers = email.parser.BytesHeaderParser().parsebytes(data)
    raw_name, raw_version = headers.get("Name"), headers.get("Version")
    if not raw_name or not raw_version:
        raise PackageError(f"{label}: METADATA lacks Name or Version")
    name = normalize_name(str(raw_name).strip())
    try:
        version = str(Version(str(raw_version).strip()))
    except InvalidVersion as exc:
        raise PackageError(
            f"{label}: {name} has version {raw_version!r}, which is not a "
            f"PEP 440 version"
        ) from exc
    if not _NAME_RE.fullmatch(name) or not _VERSION_RE.fullmatch(version):
        raise PackageError(
            f"{label}: unusable name or version {name!r} {version!r}"
        )
    return name, version


def write_layer(members, version_dir, label):
    """Write members under version_dir/layer/opt/sockworker/packages."""
    subdir = "/layer/" + LAYER_SUBDIR
    try:
        make_tree_dir(version_dir, subdir)
        registry.write_tree(members, version_dir + subdir)
    except OSError as exc:
        raise PackageError(
            f"{label}: write {exc.filename or version_dir}: {exc.strerror}"
        ) from exc


# -- the host's pip configuration -----------------------------------------

# pip settings that say where packages come from and how to reach it. Any
# other setting (target, user, require-virtualenv...) would change how
# the installer works, so it is not passed on.
PIP_OPTIONS = (
    "index-url",
    "extra-index-url",
    "no-index",
    "trusted-host",
    "find-links",
    "cert",
    "client-cert",
    "constraint",
    "timeout",
    "default-timeout",
    "retries",
    "proxy",
    "only-binary",
    "no-binary",
    "prefer-binary",
    "pre",
)
PIP_SECTIONS = ("global", "install")
# Proxy variables are read by pip's HTTP stack, not by pip's options.
PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "no_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "NO_PROXY",
    "ALL_PROXY",
)
# Options whose values name local files or directories the sandbox needs.
PATH_OPTIONS = ("cert", "client-cert", "constraint")
LOCATION_OPTIONS = ("find-links", "index-url", "extra-index-url")
# The host's name service files: install sandboxes share its network.
HOST_FILES = ("/etc/resolv.conf", "/etc/hosts")


@dataclass(frozen=True)
class PipSetup:
    """What the install sandbox needs from the host: the merged pip.conf
    sections, and the local files and directories they name."""

    config: dict
    files: tuple
    dirs: tuple


def pip_config_files(environ=None):
    """The pip.conf files of the host, in pip's order of precedence
    (later ones override): global, user, then $PIP_CONFIG_FILE; or
    none when that is os.devnull (pip's way to say "no config")."""
    environ = os.environ if environ is None else environ
    explicit = environ.get("PIP_CONFIG_FILE")
    if explicit == os.devnull:
        return []
    xdg_dirs = environ.get("XDG_CONFIG_DIRS") or "/etc/xdg"
    files = [
        os.path.join(d, "pip", "pip.conf") for d in xdg_dirs.split(":") if d
    ]
    files.append("/etc/pip.conf")
    home = environ.get("HOME") or os.path.expanduser("~")
    config_home = environ.get("XDG_CONFIG_HOME") or os.path.join(
        home, ".config"
    )
    files.append(os.path.join(home, ".pip", "pip.conf"))
    files.append(os.path.join(config_home, "pip", "pip.conf"))
    if explicit:
        files.append(explicit)
    return files


def read_pip_config(paths):
    """Merge the pip settings of the given files: {section: {option:
    value}} for the sections and options the installer passes on."""
    merged = {}
    for path in paths:
        parser = configparser.RawConfigParser()
        try:
            with open(path, encoding="utf-8") as f:
                parser.read_file(f, source=path)
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, configparser.Error) as exc:
            raise PackageError(
                f"read pip configuration {path}: {exc}"
            ) from exc
        for section in PIP_SECTIONS:
            if not parser.has_section(section):
                continue
            for option, value in parser.items(section):
                option = option.lower().replace("_", "-")
                if option in PIP_OPTIONS:
                    merged.setdefault(section, {})[option] = value
    return merged


def forwarded_environment(environ):
    """The PIP_* and proxy variables of the worker that the installer
    gets."""
    names = [
        "PIP_" + option.upper().replace("-", "_") for option in PIP_OPTIONS
    ]
    names.extend(PROXY_VARIABLES)
    return {name: environ[name] for name in names if name in environ}


def local_locations(value):
    """The local paths in a find-links or index URL setting: bare
    absolute paths and file:// URLs."""
    paths = []
    for item in shlex.split(value):
        if item.startswith("file:"):
            path = urllib.parse.unquote(urllib.parse.urlsplit(item).path)
        elif item.startswith("/"):
            path = item
        else:
            continue
        paths.append(os.path.normpath(path))
    return paths


def source_dir(option, path):
    """The directory to mirror for a local location. A file index named
    .../simple usually keeps its files beside it (simple/../files), so
    the folder holding it is mirrored."""
    if option != "find-links" and os.path.basename(path) == "simple":
        return os.path.dirname(path)
    return path


def load_pip_setup(environ=None):
    """Collect the host's pip configuration and the paths it names."""
    environ = os.environ if environ is None else environ
    config = read_pip_config(pip_config_files(environ))
    settings = [
        (option, value)
        for section in config.values()
        for option, value in section.items()
    ]
    for name, value in forwarded_environment(environ).items():
        if name.startswith("PIP_"):
            settings.append((name[4:].lower().replace("_", "-"), value))
    files, dirs = set(HOST_FILES), set()
    for option, value in settings:
        if option in PATH_OPTIONS and value.startswith("/"):
            path = os.path.normpath(value)
            (dirs if os.path.isdir(path) else files).add(path)
        elif option in LOCATION_OPTIONS:
            for path in local_locations(value):
                if os.path.isdir(path):
                    dirs.add(source_dir(option, path))
                elif option == "find-links":
                    files.add(path)
    return PipSetup(config, tuple(sorted(files)), outermost(dirs))


def outermost(dirs):
    """dirs without those inside another one of them."""
    kept = []
    for path in sorted(dirs):
        if path == "/":
            raise PackageError(
                "pip configuration names / as a package source; refusing "
                "to show the host's root to the install sandbox"
            )
        if not any(path.startswith(k.rstrip("/") + "/") for k in kept):
            kept.append(path)
    return tuple(kept)


def render_pip_config(config):
    lines = []
    for section, options in config.items():
        lines.append(f"[{section}]")
        for option, value in options.items():
            # A continuation line must be indented to stay in the value.
            value = value.replace("\n", "\n    ")
            lines.append(f"{option} = {value}")
        lines.append("")
    return "\n".join(lines)


def build_sandbox_layer(layer, setup):
    """The install sandbox's top layer: the installer handler, the merged
    /etc/pip.conf, and the host files and directories pip needs, each at
    its own path."""
    try:
        make_tree_dir(layer, "/")
        write_layer_file(layer, "/handler/f.py", INSTALLER.encode())
        for path in setup.files:
            copy_host_file(layer, path)
        for path in setup.dirs:
            mirror_host_dir(layer, path)
        config = render_pip_config(setup.config).encode()
        write_layer_file(layer, "/etc/pip.conf", config)
    except OSError as exc:
        raise PackageError(
            f"build the install sandbox's layer in {layer}: "
            f"{exc.strerror} ({exc.filename})"
        ) from exc


def make_tree_dir(layer, path):
    """mkdir layer+path and its parents, each 0755."""
    current = layer
    for part in [""] + [p for p in path.split("/") if p]:
        current = os.path.join(current, part) if part else current
        try:
            os.mkdir(current, _DIR_MODE)
        except FileExistsError:
            if not os.path.isdir(current) or os.path.islink(current):
                raise PackageError(
                    f"build install sandbox layer: {current} is not a "
                    f"directory"
                ) from None
            continue
        os.chmod(current, _DIR_MODE)


def write_layer_file(layer, path, data):
    make_tree_dir(layer, os.path.dirname(path))
    target = layer + path
    with contextlib.suppress(FileNotFoundError):
        os.unlink(target)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, _FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        os.fchmod(fd, _FILE_MODE)


def copy_host_file(layer, path):
    """Copy a host file (following links) to the same path in the layer,
    readable by the sandbox's user; a missing file is left out, as pip
    would then complain about it by name."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        log.debug("pip setting names %s, which does not exist", path)
        return
    except OSError as exc:
        raise PackageError(
            f"copy {path} into the install sandbox: {exc.strerror}"
        ) from exc
    write_layer_file(layer, path, data)


def mirror_host_dir(layer, source):
    """Make the host directory source appear at the same path in the
    layer: directories are made, regular files hard linked (copied when
    the layer is on another filesystem), symlinks recreated as they are,
    so they resolve inside the sandbox. Other files are left out."""
    make_tree_dir(layer, source)
    entries = 0
    copied = 0
    for top, dirs, files in os.walk(source):
        entries += len(dirs) + len(files)
        if entries > _MAX_MIRROR_ENTRIES:
            raise PackageError(
                f"mirror pip source {source} into the install sandbox: "
                f"more than {_MAX_MIRROR_ENTRIES} entries"
            )
        target_top = layer + top
        for name in dirs:
            mirror_entry(os.path.join(top, name), target_top, name)
        for name in files:
            copied += mirror_entry(os.path.join(top, name), target_top, name)
    if copied:
        log.warning(
            "copied %d files of pip source %s into the install sandbox: "
            "it is on another filesystem than the package store",
            copied,
            source,
        )


def mirror_entry(path, target_dir, name):
    """Mirror one entry; 1 if its content had to be copied, else 0."""
    target = os.path.join(target_dir, name)
    try:
        st = os.lstat(path)
        if os.path.islink(path):
            os.symlink(os.readlink(path), target)
        elif os.path.isdir(path):
            os.mkdir(target, _DIR_MODE)
            os.chmod(target, _DIR_MODE)
        elif os.path.isfile(path):
            return link_or_copy(path, target, st.st_mode)
    except FileExistsError:
        pass
    except OSError as exc:
        raise PackageError(
            f"mirror {path} into the install sandbox: {exc.strerror}"
        ) from exc
    return 0


def link_or_copy(path, target, mode):
    try:
        os.link(path, target, follow_symlinks=False)
        return 0
    except OSError as exc:
        if exc.errno not in (errno.EXDEV, errno.EPERM):
            raise
    shutil.copyfile(path, target, follow_symlinks=False)
    os.chmod(target, mode & 0o755)
    return 1
