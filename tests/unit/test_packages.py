"""The package store without root: requirement parsing, store keys,
the hand-off archive's checks, pip configuration, and PackageError
messages. Installs go to a fake backend whose sandboxes answer the way
the installer handler does."""

import base64
import io
import json
import os
import stat
import tarfile
import threading
import time

import pytest
from packaging.requirements import Requirement as PipRequirement

from sockworker import errors, packages
from sockworker.guest import protocol
from sockworker.packages import (
    Package,
    PackageError,
    PackageStore,
    PipSetup,
    normalize_name,
    parse_requirement,
    parse_requirements,
)

# -- requirements ---------------------------------------------------------


@pytest.mark.parametrize(
    "raw, normal",
    [
        ("six", "six"),
        ("NumPy", "numpy"),
        ("Foo_Bar.baz", "foo-bar-baz"),
        ("a--b__c..d", "a-b-c-d"),
        ("zope.interface", "zope-interface"),
    ],
)
def test_normalize_name_follows_pep_503(raw, normal):
    assert normalize_name(raw) == normal


def test_pinned_requirement():
    requirement = parse_requirement("NumPy==1.26.4")

    assert requirement.name == "numpy"
    assert requirement.pinned == "1.26.4"
    assert requirement.pip_argument() == "numpy==1.26.4"
    assert str(requirement) == "NumPy==1.26.4"


@pytest.mark.parametrize(
    "line", ["six", "six>=1.10", "six==1.*", "six>=1,<2", "six~=1.16"]
)
def test_unpinned_requirements_have_no_pin(line):
    requirement = parse_requirement(line)

    assert requirement.name == "six"
    assert requirement.pinned is None


def test_extras_are_dropped_from_what_pip_gets():
    requirement = parse_requirement("Requests[socks] == 2.31.0")

    assert requirement.name == "requests"
    assert requirement.pip_argument() == "requests==2.31.0"


def test_false_marker_skips_the_requirement():
    assert parse_requirement('six; python_version < "3"') is None
    kept = parse_requirement('six; python_version >= "3"')
    assert kept.name == "six"


@pytest.mark.parametrize(
    "line, reason",
    [
        ("-r other.txt", "pip options"),
        ("--index-url http://example.invalid/simple", "pip options"),
        ("-e .", "pip options"),
        ("six @ https://example.invalid/six.whl", "direct URL"),
        ("six=1.16", "invalid"),
        ("numpy==1.26.4 --hash=sha256:00", "invalid"),
        ("", "invalid"),
    ],
)
def test_bad_requirements_are_refused_by_line(line, reason):
    with pytest.raises(PackageError) as caught:
        parse_requirement(line)

    assert repr(line) in caught.value.message
    assert reason in caught.value.message
    assert caught.value.status == 500
    assert caught.value.kind == "package_error"


def test_a_package_listed_twice_is_refused():
    with pytest.raises(PackageError, match="'six' is required twice"):
        parse_requirements(("six==1.16.0", "Six"))


def test_pip_command_installs_exactly_the_package():
    command = packages.pip_command(parse_requirement("six==1.16.0"))

    assert command[0] == "install"
    for flag in (
        "--no-deps",
        "--no-compile",
        "--disable-pip-version-check",
        "--no-cache-dir",
    ):
        assert flag in command
    assert command[command.index("--target") + 1] == "/tmp/out"
    assert command[-2:] == ["--", "six==1.16.0"]


def test_package_error_is_a_worker_error():
    error = PackageError("install package 'x': no")

    assert isinstance(error, errors.WorkerError)
    assert error.to_dict() == {
        "error": "package_error",
        "message": "install package 'x': no",
    }


# -- a fake index and backend ----------------------------------------------


def wheel_files(name, version, extra=None):
    """What `pip install --target` leaves for a tiny package."""
    dist = f"{name.replace('-', '_')}-{version}.dist-info"
    files = {
        f"{name.replace('-', '_')}.py": f"__version__ = {version!r}\n",
        f"{dist}/METADATA": (
            f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"
        ),
        f"{dist}/RECORD": "",
    }
    files.update(extra or {})
    return files


def tar_of(entries):
    """A gzip tarball of (name, kind, payload) entries, exactly as given,
    so that unsafe archives can be made."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, kind, payload in entries:
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind in ("dir", "exec") else 0o600
            if kind in ("file", "exec"):
                data = payload.encode()
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.linkname = payload
            tar.addfile(info)
    return raw.getvalue()


def archive_of(files):
    entries = [("./", "dir", "")]
    entries += [(f"./{path}", "file", text) for path, text in files.items()]
    return tar_of(entries)


def ok_reply(archive, output="Successfully installed\n"):
    reply = {
        "ok": True,
        "output": output,
        "archive": base64.b64encode(archive).decode(),
    }
    return protocol.REPLY_OK, json.dumps(reply).encode()


def pip_failure(requirement):
    output = (
        "Looking in indexes: https://pypi.org/simple\n"
        f"ERROR: Could not find a version that satisfies the requirement "
        f"{requirement} (from versions: none)\n"
        f"ERROR: No matching distribution found for {requirement}\n"
    )
    reply = {
        "ok": False,
        "error": "pip exited with status 1",
        "output": output,
    }
    return protocol.REPLY_OK, json.dumps(reply).encode()


class FakeIndex:
    """Answers install requests like the installer handler would, from
    {name: [versions]}; `replies` overrides the answer per pip argument."""

    def __init__(self, available):
        self.available = available
        self.replies = {}
        self.installs = []
        self.delay = 0
        self.lock = threading.Lock()

    def answer(self, pip_argument):
        with self.lock:
            self.installs.append(pip_argument)
        time.sleep(self.delay)
        if pip_argument in self.replies:
            reply = self.replies[pip_argument]
            return reply() if callable(reply) else reply
        wanted = PipRequirement(pip_argument)
        versions = [
            v
            for v in self.available.get(wanted.name, [])
            if wanted.specifier.contains(v)
        ]
        if not versions:
            return pip_failure(pip_argument)
        best = max(versions, key=lambda v: tuple(map(int, v.split("."))))
        return ok_reply(archive_of(wheel_files(wanted.name, best)))


class FakeContainer:
    def __init__(self, backend, layer, env):
        self.backend = backend
        self.layer = layer
        self.env = env
        self.destroyed = False

    def request(self, body, timeout):
        event = json.loads(body)
        assert os.path.isfile(os.path.join(self.layer, "handler", "f.py"))
        assert os.path.isfile(os.path.join(self.layer, "etc", "pip.conf"))
        self.backend.events.append(event)
        return self.backend.index.answer(event["pip_args"][-1])

    def destroy(self):
        self.destroyed = True


class FakeBackend:
    def __init__(self, index):
        self.index = index
        self.containers = []
        self.events = []
        self.closed = False

    def create(self, code_root, env=None):
        container = FakeContainer(self, code_root, env)
        self.containers.append(container)
        return container

    def close(self):
        self.closed = True


class Factory:
    """A backend_factory that remembers the backends it made."""

    def __init__(self, index):
        self.index = index
        self.backends = []

    def __call__(self):
        backend = FakeBackend(self.index)
        self.backends.append(backend)
        return backend

    def containers(self):
        return [c for b in self.backends for c in b.containers]


load_pip_setup = packages.load_pip_setup


@pytest.fixture(autouse=True)
def no_host_pip_setup(monkeypatch):
    """Installs here need none of the host's pip sources (the tests of
    the pip configuration below use their own)."""
    monkeypatch.setattr(
        packages, "load_pip_setup", lambda environ=None: PipSetup({}, (), ())
    )


@pytest.fixture
def index():
    return FakeIndex({"six": ["1.15.0", "1.16.0"], "numpy": ["1.26.4"]})


@pytest.fixture
def factory(index):
    return Factory(index)


@pytest.fixture
def store(tmp_path, factory):
    return PackageStore(str(tmp_path / "packages"), factory, timeout=30)


def store_entries(store):
    """The store's names and versions (and anything else at those two
    levels, such as temporary directories), as relative paths."""
    found = []
    for top, dirs, files in os.walk(store.store_dir):
        rel = os.path.relpath(top, store.store_dir)
        depth = 0 if rel == "." else rel.count("/") + 1
        if depth == 2:
            dirs[:] = []
            continue
        for name in dirs + files:
            found.append(os.path.normpath(os.path.join(rel, name)))
    return sorted(found)


# -- resolving --------------------------------------------------------------


def test_resolve_installs_into_the_layer_layout(store, factory):
    (six,) = store.resolve(("six==1.16.0",))

    root = store.store_dir
    assert six == Package("six", "1.16.0", f"{root}/six/1.16.0/layer")
    top = os.path.join(six.layer, "opt", "sockworker", "packages")
    with open(os.path.join(top, "six.py")) as f:
        assert f.read() == "__version__ = '1.16.0'\n"
    # Readable by the sandbox's user whatever the archive said (0600).
    for path in (top, os.path.join(top, "six.py")):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        assert mode in (0o755, 0o644)
    (container,) = factory.containers()
    assert container.destroyed
    assert factory.backends[0].closed
    assert container.env["HOME"] == "/tmp"


def test_the_event_carries_the_pip_command(store, factory):
    store.resolve(("six==1.16.0",))

    (event,) = factory.backends[0].events
    assert event["pip_args"] == packages.pip_command(
        parse_requirement("six==1.16.0")
    )
    assert event["max_archive_bytes"] < protocol.MAX_FRAME
    assert "unchecked-hash" in event["compile_args"]


def test_result_is_sorted_by_name(store):
    resolved = store.resolve(("six==1.15.0", "NumPy==1.26.4"))

    assert [p.name for p in resolved] == ["numpy", "six"]
    assert store.resolve(()) == ()


def test_installed_versions_are_reused(store, index):
    first = store.resolve(("six==1.16.0",))
    again = store.resolve(("Six == 1.16.0",))

    assert again == first
    assert index.installs == ["six==1.16.0"]


def test_two_pinned_versions_live_side_by_side(store):
    (old,) = store.resolve(("six==1.15.0",))
    (new,) = store.resolve(("six==1.16.0",))

    assert old.layer != new.layer
    assert os.path.isdir(old.layer) and os.path.isdir(new.layer)
    assert store_entries(store) == ["six", "six/1.15.0", "six/1.16.0"]


def test_unpinned_requirement_is_keyed_by_the_version_pip_chose(store, index):
    (six,) = store.resolve(("six",))

    assert six.version == "1.16.0"
    assert os.path.isdir(os.path.join(store.store_dir, "six", "1.16.0"))

    index.available["six"].append("1.17.0")
    (again,) = store.resolve(("six",))
    assert again == six
    assert index.installs == ["six"]


def test_unpinned_requirement_reuses_the_newest_stored_version(store, index):
    store.resolve(("six==1.15.0",))
    store.resolve(("six==1.16.0",))

    (newest,) = store.resolve(("six",))
    (older,) = store.resolve(("six<1.16",))

    assert newest.version == "1.16.0"
    assert older.version == "1.15.0"
    assert index.installs == ["six==1.15.0", "six==1.16.0"]


def test_specifier_not_met_by_the_store_installs(store, index):
    store.resolve(("six==1.15.0",))

    (six,) = store.resolve(("six>=1.16",))

    assert six.version == "1.16.0"
    assert index.installs == ["six==1.15.0", "six>=1.16"]


def test_store_survives_a_new_store_object(store, factory, index):
    store.resolve(("six==1.16.0",))

    reopened = PackageStore(store.store_dir, factory)

    assert reopened.resolve(("six",))[0].version == "1.16.0"
    assert index.installs == ["six==1.16.0"]


def test_concurrent_resolves_install_once(store, index, factory):
    index.delay = 0.2
    results, failures = [], []

    def resolve():
        try:
            results.append(store.resolve(("six==1.16.0",)))
        except Exception as exc:  # reported below
            failures.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert not failures
    assert len(results) == 4 and len(set(results)) == 1
    assert index.installs == ["six==1.16.0"]
    assert all(b.closed for b in factory.backends)


def test_concurrent_installs_of_different_names_share_a_backend(
    store, index, factory
):
    index.delay = 0.3
    threads = [
        threading.Thread(target=store.resolve, args=((req,),))
        for req in ("six==1.16.0", "numpy==1.26.4")
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert sorted(index.installs) == ["numpy==1.26.4", "six==1.16.0"]
    assert len(factory.backends) == 1
    assert factory.backends[0].closed
    assert store.backend is None


# -- failures ---------------------------------------------------------------


def test_missing_package_names_it_and_quotes_pip(store, factory):
    with pytest.raises(PackageError) as caught:
        store.resolve(("six==1.16.0", "no-such-package==1.0"))

    message = caught.value.message
    assert message.startswith("install package 'no-such-package==1.0'")
    assert "pip exited with status 1" in message
    assert "No matching distribution found for no-such-package==1.0" in (
        message
    )
    # pip's ERROR lines, not its progress.
    assert "Looking in indexes" not in message
    assert store_entries(store) == ["six", "six/1.16.0"]
    assert not any(e.startswith("no-such") for e in store_entries(store))
    assert all(c.destroyed for c in factory.containers())
    assert all(b.closed for b in factory.backends)


def test_failed_install_leaves_the_store_clean_and_usable(store, index):
    with pytest.raises(PackageError):
        store.resolve(("nothing-here",))

    assert store_entries(store) == []
    assert store.resolve(("six==1.15.0",))[0].version == "1.15.0"


def test_long_pip_lines_are_cut(store, index):
    long_line = "ERROR: " + "x" * 5000
    index.replies["six==1.16.0"] = (
        protocol.REPLY_OK,
        json.dumps(
            {
                "ok": False,
                "error": "pip exited with status 1",
                "output": long_line,
            }
        ).encode(),
    )

    with pytest.raises(PackageError) as caught:
        store.resolve(("six==1.16.0",))

    assert len(caught.value.message) < 600


def test_handler_error_reply(store, index):
    index.replies["six==1.16.0"] = (
        protocol.REPLY_ERROR,
        json.dumps(
            {"error": "handler_error", "message": "handler raised KeyError"}
        ).encode(),
    )

    with pytest.raises(PackageError, match="handler raised KeyError"):
        store.resolve(("six==1.16.0",))
    assert store_entries(store) == []


def test_reply_that_is_not_json(store, index):
    index.replies["six==1.16.0"] = (protocol.REPLY_OK, b"\xff not json")

    with pytest.raises(PackageError, match="invalid JSON"):
        store.resolve(("six==1.16.0",))


def test_reply_without_archive(store, index):
    index.replies["six==1.16.0"] = (
        protocol.REPLY_OK,
        json.dumps({"ok": True, "archive": "%%%"}).encode(),
    )

    with pytest.raises(PackageError, match="no valid archive"):
        store.resolve(("six==1.16.0",))


def test_timeout_becomes_package_error(store, index, factory):
    def time_out():
        raise errors.HandlerTimeout("handler ran longer than 30 s")

    index.replies["six==1.16.0"] = time_out

    with pytest.raises(PackageError, match="pip ran longer than 30 s"):
        store.resolve(("six==1.16.0",))
    assert all(c.destroyed for c in factory.containers())
    assert store_entries(store) == []


def test_dead_sandbox_becomes_package_error(store, index):
    def die():
        raise errors.SandboxDied("sandbox died", reason="out of memory")

    index.replies["six==1.16.0"] = die

    with pytest.raises(PackageError, match="died: out of memory"):
        store.resolve(("six==1.16.0",))


def test_backend_that_cannot_start(tmp_path):
    def broken():
        raise OSError(13, "Permission denied")

    store = PackageStore(str(tmp_path / "packages"), broken)

    with pytest.raises(PackageError, match="start the install backend"):
        store.resolve(("six",))
    assert store_entries(store) == []


# -- the archive's checks -----------------------------------------------------

GOOD = wheel_files("six", "1.16.0")


def with_entries(*extra):
    entries = [("./", "dir", "")]
    entries += [(f"./{path}", "file", text) for path, text in GOOD.items()]
    return tar_of(entries + list(extra))


@pytest.mark.parametrize(
    "entry, reason",
    [
        (("/etc/evil", "file", "x"), "absolute path"),
        (("./../evil", "file", "x"), "'..'"),
        (("./a/../../evil", "file", "x"), "'..'"),
        (("./escape", "symlink", "../../etc"), "leaves"),
        (("./abs", "symlink", "/etc/passwd"), "absolute target"),
        (("./hard", "hardlink", "/etc/passwd"), "absolute path"),
        (("./hard", "hardlink", "nothing-before"), "not an earlier"),
        (("./tty", "chr", ""), "character device"),
        (("./pipe", "fifo", ""), "fifo"),
        (("./six.py", "file", "twice"), "appears twice"),
    ],
)
def test_unsafe_archives_are_refused(store, index, entry, reason):
    index.replies["six==1.16.0"] = ok_reply(with_entries(entry))

    with pytest.raises(PackageError) as caught:
        store.resolve(("six==1.16.0",))

    message = caught.value.message
    assert message.startswith("install package 'six==1.16.0'")
    assert reason in message
    assert store_entries(store) == []


def test_links_inside_the_tree_are_kept(store, index):
    index.replies["six==1.16.0"] = ok_reply(
        with_entries(
            ("./lib", "dir", ""),
            ("./lib/real.so", "file", "elf"),
            ("./lib/alias.so", "symlink", "real.so"),
            ("./lib/twin.so", "hardlink", "lib/real.so"),
        )
    )

    (six,) = store.resolve(("six==1.16.0",))

    lib = os.path.join(six.layer, "opt/sockworker/packages/lib")
    assert os.readlink(os.path.join(lib, "alias.so")) == "real.so"
    assert os.path.samefile(
        os.path.join(lib, "real.so"), os.path.join(lib, "twin.so")
    )


def test_archive_over_the_size_limit(tmp_path, factory, index):
    store = PackageStore(str(tmp_path / "p"), factory, max_bytes=1000)
    index.replies["six==1.16.0"] = ok_reply(
        with_entries(("./big.bin", "file", "x" * 2000))
    )

    with pytest.raises(PackageError, match="more than 1000 bytes"):
        store.resolve(("six==1.16.0",))
    assert store_entries(store) == []


def test_archive_with_too_many_members(tmp_path, factory, index):
    store = PackageStore(str(tmp_path / "p"), factory, max_members=5)
    many = [(f"./m{i}.py", "file", "") for i in range(10)]
    index.replies["six==1.16.0"] = ok_reply(with_entries(*many))

    with pytest.raises(PackageError, match="more than 5 members"):
        store.resolve(("six==1.16.0",))


def test_archive_that_is_not_gzip(store, index):
    index.replies["six==1.16.0"] = ok_reply(b"not a tarball")

    with pytest.raises(PackageError, match="corrupt archive"):
        store.resolve(("six==1.16.0",))


# -- metadata -----------------------------------------------------------------


def test_name_and_version_come_from_metadata(store, index):
    files = wheel_files("Six", "1.16")
    index.replies["six"] = ok_reply(archive_of(files))

    (six,) = store.resolve(("six",))

    # Both normalized: "1.16" is PEP 440's "1.16".
    assert (six.name, six.version) == ("six", "1.16")


def test_archive_without_dist_info(store, index):
    index.replies["six==1.16.0"] = ok_reply(archive_of({"six.py": ""}))

    with pytest.raises(PackageError, match="no .dist-info"):
        store.resolve(("six==1.16.0",))


def test_archive_of_another_package(store, index):
    index.replies["six==1.16.0"] = ok_reply(
        archive_of(wheel_files("seven", "1.16.0"))
    )

    with pytest.raises(PackageError) as caught:
        store.resolve(("six==1.16.0",))
    assert "did not install exactly one six (found seven 1.16.0)" in (
        caught.value.message
    )


def test_archive_with_the_wrong_version(store, index):
    index.replies["six==1.16.0"] = ok_reply(
        archive_of(wheel_files("six", "1.15.0"))
    )

    with pytest.raises(PackageError, match="does not satisfy"):
        store.resolve(("six==1.16.0",))
    assert store_entries(store) == []


def test_metadata_without_version(store, index):
    files = {"six-1.dist-info/METADATA": "Name: six\n"}
    index.replies["six"] = ok_reply(archive_of(files))

    with pytest.raises(PackageError, match="lacks Name or Version"):
        store.resolve(("six",))


def test_metadata_with_a_non_pep440_version(store, index):
    files = {"six-1.dist-info/METADATA": "Name: six\nVersion: 1.0/../x\n"}
    index.replies["six"] = ok_reply(archive_of(files))

    with pytest.raises(PackageError, match="not a PEP 440 version"):
        store.resolve(("six",))


# -- sweep --------------------------------------------------------------------


def test_sweep_removes_temporary_directories(store, factory):
    store.resolve(("six==1.16.0",))
    leftover = os.path.join(store.store_dir, ".tmp-crashed")
    os.makedirs(os.path.join(leftover, "sandbox", "handler"))

    store.sweep()

    assert store_entries(store) == ["six", "six/1.16.0"]
    assert not os.path.exists(leftover)
    # Starting and closing a backend swept its leftover sandboxes.
    assert factory.backends[-1].closed


def test_sweep_of_a_store_not_made_yet(tmp_path, factory):
    PackageStore(str(tmp_path / "nothing"), factory).sweep()

    assert not os.path.exists(tmp_path / "nothing")


# -- the host's pip configuration ------------------------------------------


def write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def test_pip_config_files_in_pips_order(tmp_path):
    environ = {
        "HOME": "/home/w",
        "XDG_CONFIG_DIRS": "/etc/xdg:/opt/xdg",
        "PIP_CONFIG_FILE": "/srv/pip.conf",
    }

    assert packages.pip_config_files(environ) == [
        "/etc/xdg/pip/pip.conf",
        "/opt/xdg/pip/pip.conf",
        "/etc/pip.conf",
        "/home/w/.pip/pip.conf",
        "/home/w/.config/pip/pip.conf",
        "/srv/pip.conf",
    ]
    assert packages.pip_config_files({"PIP_CONFIG_FILE": os.devnull}) == []


def test_read_pip_config_merges_and_keeps_only_source_options(tmp_path):
    first = write(
        tmp_path / "global.conf",
        "[global]\nindex_url = https://a.invalid/simple\n"
        "target = /somewhere\nrequire-virtualenv = true\n"
        "[install]\ntrusted-host = a.invalid\n"
        "[freeze]\ntimeout = 1\n",
    )
    second = write(
        tmp_path / "user.conf",
        "[global]\nindex-url = https://b.invalid/simple\n"
        "find-links =\n    /w1\n    /w2\n",
    )

    merged = packages.read_pip_config(
        [first, str(tmp_path / "missing.conf"), second]
    )

    assert merged == {
        "global": {
            "index-url": "https://b.invalid/simple",
            "find-links": "\n/w1\n/w2",
        },
        "install": {"trusted-host": "a.invalid"},
    }


def test_unreadable_pip_config_is_named(tmp_path):
    bad = write(tmp_path / "bad.conf", "no section header\n")

    with pytest.raises(PackageError, match="bad.conf"):
        packages.read_pip_config([bad])


def test_forwarded_environment():
    environ = {
        "PIP_INDEX_URL": "https://i.invalid/simple",
        "PIP_EXTRA_INDEX_URL": "x",
        "PIP_TRUSTED_HOST": "i.invalid",
        "PIP_FIND_LINKS": "/w",
        "PIP_TARGET": "/elsewhere",
        "PIP_REQUIRE_VIRTUALENV": "1",
        "https_proxy": "http://proxy.invalid:3128",
        "SECRET": "no",
    }

    assert packages.forwarded_environment(environ) == {
        "PIP_INDEX_URL": "https://i.invalid/simple",
        "PIP_EXTRA_INDEX_URL": "x",
        "PIP_TRUSTED_HOST": "i.invalid",
        "PIP_FIND_LINKS": "/w",
        "https_proxy": "http://proxy.invalid:3128",
    }


def test_load_pip_setup_finds_the_local_sources(tmp_path):
    index = tmp_path / "pypi"
    (index / "simple" / "six").mkdir(parents=True)
    (index / "files").mkdir()
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    cert = write(tmp_path / "ca.pem", "CA")
    conf = write(
        tmp_path / "pip.conf",
        f"[global]\nextra-index-url = file://{index}/simple "
        f"https://remote.invalid/simple\ncert = {cert}\n"
        f"find-links = {tmp_path}/gone\n",
    )
    environ = {
        "HOME": str(tmp_path / "home"),
        "XDG_CONFIG_DIRS": str(tmp_path / "none"),
        "PIP_CONFIG_FILE": conf,
        "PIP_FIND_LINKS": f"file://{wheels}",
    }

    setup = load_pip_setup(environ)

    assert setup.dirs == (str(index), str(wheels))
    assert cert in setup.files
    assert f"{tmp_path}/gone" in setup.files
    assert "/etc/resolv.conf" in setup.files


def test_root_as_a_package_source_is_refused():
    with pytest.raises(PackageError, match="names / as a package source"):
        packages.outermost({"/", "/opt/wheels"})
    assert packages.outermost({"/a/b", "/a", "/ab"}) == ("/a", "/ab")


def test_sandbox_layer_mirrors_sources_at_their_paths(tmp_path):
    source = tmp_path / "src" / "wheels"
    (source / "sub").mkdir(parents=True)
    wheel = write(source / "sub" / "six.whl", "wheel")
    os.symlink("sub/six.whl", source / "latest.whl")
    cert = write(tmp_path / "src" / "ca.pem", "CA")
    os.chmod(cert, 0o600)
    setup = PipSetup(
        {"global": {"find-links": str(source), "cert": cert}},
        (cert, str(tmp_path / "src" / "absent.pem")),
        (str(source),),
    )
    layer = str(tmp_path / "layer")

    packages.build_sandbox_layer(layer, setup)

    mirrored = layer + wheel
    assert os.path.samefile(mirrored, wheel)
    assert os.readlink(layer + str(source / "latest.whl")) == "sub/six.whl"
    with open(layer + cert) as f:
        assert f.read() == "CA"
    assert stat.S_IMODE(os.stat(layer + cert).st_mode) == 0o644
    assert not os.path.exists(layer + str(tmp_path / "src" / "absent.pem"))
    for path in (layer, layer + "/etc", layer + str(source)):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    with open(os.path.join(layer, "etc", "pip.conf")) as f:
        text = f.read()
    assert f"find-links = {source}" in text
    with open(os.path.join(layer, "handler", "f.py")) as f:
        assert "def f(event)" in f.read()


def test_rendered_pip_config_keeps_multiline_values():
    text = packages.render_pip_config({"global": {"find-links": "\n/w1\n/w2"}})

    parser = __import__("configparser").RawConfigParser()
    parser.read_string(text)
    assert parser.get("global", "find-links").split() == ["/w1", "/w2"]


def test_local_locations():
    assert packages.local_locations(
        "file:///opt/a%20b/simple https://x.invalid /w ./rel"
    ) == ["/opt/a b/simple", "/w"]
    assert packages.source_dir("extra-index-url", "/opt/p/simple") == "/opt/p"
    assert packages.source_dir("find-links", "/opt/simple") == "/opt/simple"


def test_installer_handler_compiles():
    compile(packages.INSTALLER, "f.py", "exec")
