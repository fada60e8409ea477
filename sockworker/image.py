"""The base image: the root filesystem every sandbox's handler runs on.

The recipe in images/base/ builds Debian bookworm (minbase) with python3
through debootstrap. An image is named by the hash of its recipe, built
once into the images directory, and reused until the recipe changes. A
build goes into a temporary directory that is renamed into place, and a
marker file written last says the image is complete, so a crash at any
point leaves either a finished image or debris that the next ensure()
removes.

Run `python -m sockworker.image --images-dir DIR` to build it by hand.
"""

import argparse
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_IMAGES_DIR = "/var/lib/sockworker/images"
SUITE = "bookworm"
# debootstrap needs about 270 MB before the recipe trims it to 125 MB; the
# margin covers apt's lists and a slower-growing future release.
MIN_FREE_BYTES = 600 * 1024 * 1024
RECIPE_DIR = Path(__file__).resolve().parents[1] / "images" / "base"
RECIPE_SCRIPT = "build"

_MIRROR_SCHEMES = ("http://", "https://", "file:")
_TEMP_PREFIX = ".build-"
_LOCK_NAME = ".lock"
# The kill of a build waits this long for debootstrap's own cleanup (it
# unmounts /proc and /sys inside the target) before SIGKILL.
_STOP_TIMEOUT = 30


class ImageBuildError(Exception):
    """The base image cannot be built; the message names what is missing
    and, after a failed build, where the full log is."""


# -- apt configuration ----------------------------------------------------


def find_mirror(
    sources_dir="/etc/apt/sources.list.d",
    sources_list="/etc/apt/sources.list",
    suite=SUITE,
) -> str:
    """Return the first mirror URI that apt's configuration uses for
    `suite`, in apt's own reading order: sources_list, then the *.list and
    *.sources files of sources_dir by name."""
    for path in _apt_source_files(sources_dir, sources_list):
        for uri in _uris_for_suite(path, suite):
            return uri
    raise ImageBuildError(
        f"find Debian mirror: no enabled 'deb' source for suite {suite} in"
        f" {sources_list} or {sources_dir}/*.list, *.sources (add e.g."
        f" 'deb http://deb.debian.org/debian {suite} main' or pass a"
        " mirror)"
    )


def _apt_source_files(sources_dir, sources_list):
    files = [sources_list]
    try:
        names = sorted(os.listdir(sources_dir))
    except FileNotFoundError:
        names = []
    except OSError as e:
        raise ImageBuildError(
            f"find Debian mirror: list {sources_dir}: {e.strerror}"
        ) from e
    for name in names:
        if name.endswith((".list", ".sources")):
            files.append(os.path.join(sources_dir, name))
    return files


def _uris_for_suite(path, suite):
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except FileNotFoundError:
        return []
    except OSError as e:
        raise ImageBuildError(
            f"find Debian mirror: read {path}: {e.strerror}"
        ) from e
    if path.endswith(".sources"):
        return _deb822_uris(text, suite)
    return _one_line_uris(text, suite)


def _one_line_uris(text, suite):
    """URIs of `deb [options] URI SUITE COMPONENT...` lines."""
    uris = []
    for line in text.splitlines():
        words = line.split("#", 1)[0].split()
        if len(words) < 3 or words[0] != "deb":
            continue
        words = words[1:]
        if words[0].startswith("["):
            # Options may contain spaces: "[ arch=amd64 signed-by=... ]".
            while words and not words[0].endswith("]"):
                words = words[1:]
            words = words[1:]
        if len(words) >= 2 and words[1] == suite:
            uris.append(words[0])
    return [uri for uri in uris if uri.startswith(_MIRROR_SCHEMES)]


def _deb822_uris(text, suite):
    """URIs of deb822 stanzas whose Types has deb and Suites has suite."""
    uris = []
    for fields in _deb822_stanzas(text):
        if fields.get("enabled", "yes").strip().lower() == "no":
            continue
        if "deb" not in fields.get("types", "").split():
            continue
        if suite not in fields.get("suites", "").split():
            continue
        uris.extend(fields.get("uris", "").split())
    return [uri for uri in uris if uri.startswith(_MIRROR_SCHEMES)]


def _deb822_stanzas(text):
    fields, key = {}, None
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        if not line.strip():
            if fields:
                yield fields
            fields, key = {}, None
        elif line[0] in " \t" and key is not None:
            fields[key] += " " + line.strip()
        elif ":" in line:
            key, value = line.split(":", 1)
            key = key.strip().lower()
            fields[key] = value.strip()
    if fields:
        yield fields


# -- recipe ---------------------------------------------------------------


def recipe_hash(recipe_dir) -> str:
    """sha256 over every file under recipe_dir: its relative path, mode and
    content, so renaming, chmod or editing any file changes the image."""
    digest = hashlib.sha256()
    try:
        for rel, mode, data in _recipe_files(str(recipe_dir)):
            header = f"{rel}\0{mode:o}\0{len(data)}\0"
            digest.update(header.encode())
            digest.update(data)
    except OSError as e:
        raise ImageBuildError(
            f"read base image recipe {recipe_dir}: {e.strerror} ({e.filename})"
        ) from e
    return digest.hexdigest()


def _recipe_files(recipe_dir):
    if not os.path.isdir(recipe_dir):
        raise FileNotFoundError(
            errno.ENOENT, os.strerror(errno.ENOENT), recipe_dir
        )
    for top, dirs, files in os.walk(recipe_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(top, name)
            rel = os.path.relpath(path, recipe_dir)
            st = os.lstat(path)
            if stat.S_ISLNK(st.st_mode):
                data = os.fsencode(os.readlink(path))
            else:
                with open(path, "rb") as f:
                    data = f.read()
            yield rel, st.st_mode, data


# -- the image ------------------------------------------------------------


class BaseImage:
    """The base root filesystem, built from the recipe at most once per
    recipe hash and images directory.

    Guarantees: `path` is a complete image whenever is_ready() is true, and
    it is never modified after that; concurrent ensure() calls, from any
    number of processes, build it once (the others wait on a lock on
    <images_dir>/.lock); a build that crashed leaves nothing that the next
    ensure() does not remove.
    """

    python = "/usr/bin/python3"

    def __init__(
        self,
        images_dir: str,
        recipe_dir: str | None = None,
        mirror: str | None = None,
    ):
        self.images_dir = os.path.abspath(images_dir)
        self.recipe_dir = os.path.abspath(recipe_dir or RECIPE_DIR)
        self.mirror = mirror
        self.recipe_hash = recipe_hash(self.recipe_dir)
        self.name = f"base-{self.recipe_hash[:12]}"
        self.path = os.path.join(self.images_dir, self.name)
        self.marker_path = self.path + ".ready"
        self.log_path = self.path + ".build.log"

    def __repr__(self):
        return f"BaseImage({self.path!r})"

    def is_ready(self) -> bool:
        """True when the image is completely built (its marker exists)."""
        return os.path.isfile(self.marker_path) and os.path.lexists(
            self.path + self.python
        )

    def ensure(self, progress: bool = True) -> str:
        """Build the image unless it is ready; return its path.

        With progress, a bar (or, when stderr is not a terminal, one line
        per build phase) goes to stderr during the build of about 40 s.
        An exception (KeyboardInterrupt included) stops the build and
        removes its temporary directory; a caller killed outright leaves
        the recipe running to its end, and the next ensure() removes what
        it built.
        """
        if self.is_ready():
            if self._has_temp_builds():
                with self._locked(progress):
                    self._remove_temp_builds()
            return self.path
        mirror = self.check_prerequisites()
        self._make_images_dir()
        with self._locked(progress):
            if self.is_ready():
                log.info("base image %s was built while waiting", self.name)
                return self.path
            self._remove_temp_builds()
            self._remove_unfinished()
            self._build(mirror, progress)
        return self.path

    def check_prerequisites(self) -> str:
        """Check everything a build needs; return the mirror to use.

        All missing things are named in one ImageBuildError.
        """
        problems = []
        if os.geteuid() != 0:
            problems.append(
                "not running as root (debootstrap and chroot need root)"
            )
        if shutil.which("debootstrap") is None:
            problems.append(
                "debootstrap is not installed or not on PATH"
                " (apt-get install debootstrap)"
            )
        problems.extend(self._check_disk())
        mirror = self.mirror
        if mirror is None:
            try:
                mirror = find_mirror()
            except ImageBuildError as e:
                problems.append(str(e))
        if problems:
            raise ImageBuildError(
                f"cannot build base image {self.name} in {self.images_dir}: "
                + "; ".join(problems)
            )
        return mirror

    def remove_stale(self) -> None:
        """Delete builds of other recipes and leftover temporary builds.

        An image that is still mounted (in this mount namespace) is kept
        and logged: removing files under a live overlay would break the
        sandboxes using it.
        """
        if not os.path.isdir(self.images_dir):
            return
        with self._locked(progress=False):
            self._remove_temp_builds()
            names = {_image_name(e) for e in os.listdir(self.images_dir)}
            for name in sorted(names - {None, self.name}):
                self._remove_stale_image(name)

    # -- steps of ensure() ------------------------------------------------

    def _check_disk(self):
        existing = self.images_dir
        while not os.path.isdir(existing):
            existing = os.path.dirname(existing)
        free = shutil.disk_usage(existing).free
        if free >= MIN_FREE_BYTES:
            return []
        return [
            f"not enough disk space: {free // 2**20} MB free in {existing},"
            f" the build needs about {MIN_FREE_BYTES // 2**20} MB"
        ]

    def _make_images_dir(self):
        try:
            os.makedirs(self.images_dir, mode=0o755, exist_ok=True)
        except OSError as e:
            raise ImageBuildError(
                f"create images directory {self.images_dir}: {e.strerror}"
            ) from e

    @contextlib.contextmanager
    def _locked(self, progress):
        lock_path = os.path.join(self.images_dir, _LOCK_NAME)
        try:
            fd = os.open(
                lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644
            )
        except OSError as e:
            raise ImageBuildError(
                f"open image lock {lock_path}: {e.strerror}"
            ) from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                _say(
                    progress,
                    f"waiting for another process building in"
                    f" {self.images_dir} ({lock_path})",
                )
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _has_temp_builds(self):
        try:
            entries = os.listdir(self.images_dir)
        except FileNotFoundError:
            return False
        return any(e.startswith(_TEMP_PREFIX) for e in entries)

    def _remove_temp_builds(self):
        # Only called under the lock, so no live build owns these.
        for entry in sorted(os.listdir(self.images_dir)):
            if not entry.startswith(_TEMP_PREFIX):
                continue
            path = os.path.join(self.images_dir, entry)
            log.warning("removing leftover temporary build %s", path)
            _remove_path(path)

    def _remove_unfinished(self):
        # A crash between the rename and the marker leaves an image that
        # may be fine, but nothing proves it: rebuild.
        if os.path.lexists(self.path):
            log.warning("removing unfinished base image %s", self.path)
            _remove_path(self.path)
        if os.path.lexists(self.marker_path):
            _remove_path(self.marker_path)

    def _build(self, mirror, progress):
        temp = os.path.join(
            self.images_dir, f"{_TEMP_PREFIX}{self.name}-{os.getpid()}"
        )
        detail_log = temp + ".detail"
        started = time.monotonic()
        _say(
            progress,
            f"building base image {self.name} from {mirror} (about 40 s;"
            f" log: {self.log_path})",
        )
        try:
            self._run_recipe(temp, mirror, detail_log, progress)
            self._check_built(temp)
            os.rename(temp, self.path)
        except BaseException:
            _remove_path(temp)
            raise
        finally:
            self._append_detail_log(detail_log)
        seconds = time.monotonic() - started
        self._write_marker(mirror, seconds)
        log.info("built base image %s in %.1f s", self.path, seconds)

    def _run_recipe(self, temp, mirror, detail_log, progress):
        script = os.path.join(self.recipe_dir, RECIPE_SCRIPT)
        argv = [script, temp, mirror, detail_log]
        # debootstrap's messages are parsed for progress and errors.
        env = dict(os.environ, LC_ALL="C")
        reporter = _make_reporter(self.name, progress)
        errors = []
        try:
            with open(self.log_path, "w", encoding="utf-8") as log_file:
                log_file.write(f"# {' '.join(argv)}\n")
                proc = _spawn_recipe(argv, env, log_file)
                try:
                    for line in proc.stdout:
                        log_file.write(line)
                        log_file.flush()
                        reporter.feed(line)
                        if line.startswith(("E:", "W:")):
                            errors.append(line.strip())
                    status = proc.wait()
                finally:
                    _stop_recipe(proc)
        except OSError as e:
            raise ImageBuildError(
                f"build base image {self.name}: {e.strerror}"
                f" ({e.filename}); see {self.log_path}"
            ) from e
        finally:
            reporter.close()
        if status != 0:
            raise ImageBuildError(
                self._failure_message(mirror, status, errors)
            )

    def _failure_message(self, mirror, status, errors):
        text = " ".join(errors)
        if "release file" in text.lower() or "InRelease" in text:
            cause = (
                f"mirror {mirror} is unreachable or has no {SUITE} suite"
                " (debootstrap could not retrieve its Release file)"
            )
        elif "No space left" in text:
            cause = f"disk full in {self.images_dir}"
        else:
            cause = f"recipe exited with status {status}"
        last = f": {errors[-1]}" if errors else ""
        return (
            f"build base image {self.name}: {cause}{last};"
            f" full log in {self.log_path}"
        )

    def _check_built(self, temp):
        if not os.path.lexists(temp + self.python):
            raise ImageBuildError(
                f"build base image {self.name}: recipe succeeded but"
                f" {self.python} is missing in {temp};"
                f" see {self.log_path}"
            )

    def _append_detail_log(self, detail_log):
        try:
            with open(detail_log, encoding="utf-8", errors="replace") as f:
                detail = f.read()
        except FileNotFoundError:
            return
        with open(self.log_path, "a", encoding="utf-8") as log_file:
            log_file.write("\n# debootstrap's detailed log\n")
            log_file.write(detail)
        os.unlink(detail_log)

    def _write_marker(self, mirror, seconds):
        info = {
            "name": self.name,
            "recipe_hash": self.recipe_hash,
            "mirror": mirror,
            "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "build_seconds": round(seconds, 1),
        }
        temp = self.marker_path + ".tmp"
        with open(temp, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, self.marker_path)
        _fsync_dir(self.images_dir)

    def _remove_stale_image(self, name):
        path = os.path.join(self.images_dir, name)
        users = _mounts_using(path)
        if users:
            log.warning(
                "keeping stale base image %s: still mounted at %s",
                path,
                ", ".join(users),
            )
            return
        log.info("removing stale base image %s", path)
        # The marker goes first: a half-removed image is never ready.
        for suffix in (".ready", "", ".build.log"):
            _remove_path(path + suffix)


def _image_name(entry):
    """The base-<hash> name an images-dir entry belongs to, or None."""
    match = re.fullmatch(r"(base-[0-9a-f]+)(\.ready|\.build\.log)?", entry)
    return match.group(1) if match else None


def _spawn_recipe(argv, env, log_file):
    try:
        # A session of its own, so that stopping the build reaches
        # debootstrap and its children, and a ^C meant for the caller is
        # handled by the caller, who then stops the build in order.
        return subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            errors="replace",
            start_new_session=True,
        )
    except OSError as e:
        log_file.write(f"# spawn failed: {e}\n")
        raise


def _stop_recipe(proc):
    """Kill the recipe's process group if it is still running; reap it."""
    if proc.poll() is not None:
        proc.stdout.close()
        return
    log.warning("stopping base image build (pid %d)", proc.pid)
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=_STOP_TIMEOUT)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    proc.stdout.close()


def _mounts_using(path):
    """Mount points in this namespace at or under path, or overlays that
    name path in their options."""
    users = []
    prefix = path.rstrip("/") + "/"
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            mount_point = _unescape_mountinfo(fields[4])
            options = fields[-1]
            # Overlay layers appear as lowerdir=/a:/b,upperdir=...
            layers = re.split(r"[,:=]", _unescape_mountinfo(options))
            if (
                mount_point == path
                or mount_point.startswith(prefix)
                or path in layers
            ):
                users.append(mount_point)
    return users


def _unescape_mountinfo(text):
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), text)


def _remove_path(path):
    """Remove a file or a tree, unmounting first whatever a killed
    debootstrap left mounted inside it (/proc, /sys), so that the removal
    never descends into a mounted filesystem."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            _unmount_under(path)
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        raise ImageBuildError(
            f"remove {path}: {e.strerror} ({e.filename})"
        ) from e


def _unmount_under(path):
    prefix = path.rstrip("/") + "/"
    mount_points = []
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            mount_point = _unescape_mountinfo(line.split()[4])
            if mount_point == path or mount_point.startswith(prefix):
                mount_points.append(mount_point)
    if not mount_points:
        return
    # Imported here: the native module is only needed in this rare path.
    from sockworker.sandbox import native

    for mount_point in sorted(mount_points, key=len, reverse=True):
        log.warning("unmounting %s left by an unfinished build", mount_point)
        try:
            native.umount2(mount_point, native.MNT_DETACH)
        except OSError as e:
            # A parent's detach may already have taken it away.
            if e.errno not in (errno.EINVAL, errno.ENOENT):
                raise


def _fsync_dir(path):
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _say(progress, message):
    if progress:
        print(message, file=sys.stderr, flush=True)
    log.info("%s", message)


# -- progress -------------------------------------------------------------

# "I: Retrieving adduser 3.134", "I: Unpacking libc6:amd64...", and the
# recipe's own "I: Finishing check-python". "I: Retrieving InRelease" has
# no version, so it is not a package.
_STEP_LINE = re.compile(
    r"I: (?:(Retrieving|Validating) (\S+) \S+"
    r"|(Extracting|Unpacking|Configuring) (\S+?)\.\.\."
    r"|(Finishing) (\S+))\s*$"
)
# debootstrap interleaves retrieving with validating, and unpacking with
# configuring, so each pair is shown as one phase.
_PHASES = {
    "Retrieving": "download",
    "Validating": "download",
    "Extracting": "extract",
    "Unpacking": "install",
    "Configuring": "install",
    "Finishing": "finish",
}
_PHASE_ORDER = ["download", "extract", "install", "finish"]
# Measured on bookworm minbase + python3: 110 packages retrieved, and about
# 4.7 step lines per package over all phases, plus the recipe's own steps.
_EXPECTED_PACKAGES = 110
_LINES_PER_PACKAGE = 4.7
_FINISHING_STEPS = 8


def parse_step(line):
    """(debootstrap's verb, package or step) for a progress line of the
    recipe, else None."""
    match = _STEP_LINE.match(line)
    if match is None:
        return None
    groups = [g for g in match.groups() if g is not None]
    return groups[0], groups[1]


class _Reporter:
    """Counts steps and follows the phases; subclasses show them."""

    def __init__(self, name):
        self.name = name
        self.phase = None
        self.item = None
        self.packages = 0
        self.steps = 0
        self.started = time.monotonic()

    def feed(self, line):
        step = parse_step(line)
        if step is None:
            return
        verb, self.item = step
        self.steps += 1
        if verb == "Retrieving":
            self.packages += 1
        phase = _PHASES[verb]
        if self._is_later(phase):
            self.phase = phase
            self.new_phase(phase)
        self.new_step(self.item)

    def _is_later(self, phase):
        if self.phase is None:
            return True
        return _PHASE_ORDER.index(phase) > _PHASE_ORDER.index(self.phase)

    def expected_steps(self):
        packages = self.packages
        if self.phase in (None, "download"):
            packages = max(packages, _EXPECTED_PACKAGES)
        return round(packages * _LINES_PER_PACKAGE) + _FINISHING_STEPS

    def finished(self):
        return self.phase == "finish" and self.item == "done"

    def elapsed(self):
        return time.monotonic() - self.started

    def new_phase(self, phase):
        pass

    def new_step(self, item):
        pass

    def close(self):
        pass


class _LineReporter(_Reporter):
    """One line per phase, for logs and pipes."""

    def new_phase(self, phase):
        print(
            f"{self.name}: {phase} ({self.elapsed():.0f} s,"
            f" {self.packages} packages)",
            file=sys.stderr,
            flush=True,
        )

    def close(self):
        if self.phase is None:
            return
        state = "finished" if self.finished() else "stopped"
        print(
            f"{self.name}: {state} after {self.elapsed():.0f} s",
            file=sys.stderr,
            flush=True,
        )


class _BarReporter(_Reporter):
    """A tqdm bar whose total is re-estimated once the packages are known."""

    def __init__(self, name):
        super().__init__(name)
        # Imported here: only a build on a terminal needs it.
        from tqdm import tqdm

        # On a terminal that reports no size (a pty nobody sized) tqdm
        # hides the bar as if it were below the last row.
        sized = _terminal_is_sized(sys.stderr)
        self.bar = tqdm(
            total=self.expected_steps(),
            desc=f"{name}: starting",
            unit="step",
            file=sys.stderr,
            dynamic_ncols=sized,
            ncols=None if sized else 80,
            nrows=None if sized else 24,
        )

    def new_phase(self, phase):
        self.bar.set_description(f"{self.name}: {phase}")

    def new_step(self, item):
        total = max(self.expected_steps(), self.steps + 1)
        if total != self.bar.total:
            self.bar.total = total
        self.bar.set_postfix_str(item, refresh=False)
        self.bar.update(self.steps - self.bar.n)

    def close(self):
        if self.finished():
            self.bar.total = self.bar.n
            self.bar.set_postfix_str("done", refresh=False)
        self.bar.close()


def _terminal_is_sized(stream):
    try:
        size = os.get_terminal_size(stream.fileno())
    except OSError as e:
        if e.errno != errno.ENOTTY:
            raise
        return False
    return size.columns > 0 and size.lines > 0


def _make_reporter(name, progress):
    if not progress:
        return _Reporter(name)
    if sys.stderr.isatty():
        return _BarReporter(name)
    return _LineReporter(name)


# -- command line ---------------------------------------------------------


def _exit_on_termination():
    """Turn SIGTERM and SIGHUP into SystemExit, so that a killed command
    still stops its build and removes the temporary directory (the
    recipe runs in a session of its own and would not get the signal)."""

    def leave(signum, frame):
        raise SystemExit(128 + signum)

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, leave)


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m sockworker.image",
        description="Build the sockworker base image unless it is built.",
    )
    parser.add_argument(
        "--images-dir",
        default=os.environ.get("SOCKWORKER_IMAGES_DIR", DEFAULT_IMAGES_DIR),
        help="where images live (default: $SOCKWORKER_IMAGES_DIR or"
        f" {DEFAULT_IMAGES_DIR})",
    )
    parser.add_argument(
        "--mirror", help="Debian mirror (default: the one apt uses)"
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="only tell by the exit status whether the image is ready",
    )
    parser.add_argument(
        "--remove-stale",
        action="store_true",
        help="also delete builds of older recipes",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no progress output"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    _exit_on_termination()
    try:
        image = BaseImage(args.images_dir, mirror=args.mirror)
        if args.check:
            return 0 if image.is_ready() else 1
        was_ready = image.is_ready()
        path = image.ensure(progress=not args.quiet)
        if args.remove_stale:
            image.remove_stale()
    except ImageBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    state = "already built" if was_ready else "built"
    print(f"base image {image.name} {state}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
