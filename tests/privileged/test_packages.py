"""The package store on the real kernel: pip runs in a SOCK container
with the host's network and pip configuration, and lambdas import what
it installed from package layers stacked into their own containers."""

import json
import os
import stat
import textwrap
import threading
import time

import pytest

from sockworker.guest import protocol
from sockworker.packages import (
    PACKAGES_PATH,
    PackageError,
    PackageStore,
    install_backend_factory,
)
from sockworker.sandbox.backend import SockBackend
from sockworker.sandbox.cgroups import Limits

pytestmark = pytest.mark.privileged

# The handler may not rely on the guest server for the package path yet.
REPORT = f"""
import importlib, os, sys

sys.path.insert(0, {PACKAGES_PATH!r})

def f(event):
    module = importlib.import_module(event["module"])
    return {{
        "version": getattr(module, "__version__", None),
        "file": module.__file__,
        "listing": sorted(os.listdir({PACKAGES_PATH!r})),
    }}
"""

NUMPY = f"""
import sys, time

sys.path.insert(0, {PACKAGES_PATH!r})

def f(event):
    started = time.perf_counter()
    import numpy
    seconds = time.perf_counter() - started
    return {{
        "sum": int(numpy.arange(3).sum()),
        "version": numpy.__version__,
        "file": numpy.__file__,
        "import_seconds": seconds,
    }}
"""


@pytest.fixture
def state(tmp_path):
    # Short names: a sandbox's socket path must fit in 108 bytes.
    path = tmp_path / "s"
    path.mkdir()
    return path


@pytest.fixture
def store(state, base_image, leak_check):
    store = PackageStore(
        str(state / "packages"),
        install_backend_factory(str(state / "i"), base_image),
        timeout=120,
    )
    yield store
    # The install backend lives only while an install runs.
    assert store.backend is None
    assert os.listdir(state / "i" / "sandboxes") == []


@pytest.fixture
def runner(state, base_image, leak_check):
    """Runs a lambda in a container whose layers are (code, packages...,
    guest, base), like an instance with packages will be."""
    backend = SockBackend(
        str(state / "r"),
        base_image,
        Limits(memory_bytes=256 << 20, pids=32),
        prepared=0,
    )
    backend.start()
    containers = []

    def run(source, packages, event):
        code = state / "code" / str(len(containers))
        (code / "handler").mkdir(parents=True)
        (code / "handler" / "f.py").write_text(textwrap.dedent(source))
        container = backend.prepare_one()
        containers.append(container)
        layers = (
            str(code),
            *(p.layer for p in packages),
            backend.guest_layer,
            base_image,
        )
        container.start(layers, {"PATH": "/usr/bin:/bin"})
        try:
            status, payload = container.request(json.dumps(event).encode(), 60)
        finally:
            container.destroy()
        assert status == protocol.REPLY_OK, payload
        return json.loads(payload)

    yield run
    for container in containers:
        container.destroy()
    backend.close()


def store_entries(store):
    found = []
    for name in sorted(os.listdir(store.store_dir)):
        path = os.path.join(store.store_dir, name)
        found.append(name)
        if os.path.isdir(path) and not name.startswith("."):
            found.extend(f"{name}/{v}" for v in sorted(os.listdir(path)))
    return found


def timed_resolve(store, requirements):
    started = time.monotonic()
    packages = store.resolve(requirements)
    print(f"resolve {requirements}: {time.monotonic() - started:.2f} s")
    return packages


def test_six_installs_and_imports_from_its_layer(store, runner):
    (six,) = timed_resolve(store, ("six==1.16.0",))

    assert (six.name, six.version) == ("six", "1.16.0")
    seen = runner(REPORT, [six], {"module": "six"})
    assert seen["version"] == "1.16.0"
    assert seen["file"] == f"{PACKAGES_PATH}/six.py"
    assert seen["listing"] == ["__pycache__", "six-1.16.0.dist-info", "six.py"]
    for top, dirs, files in os.walk(six.layer):
        for name in dirs:
            mode = os.stat(os.path.join(top, name)).st_mode
            assert stat.S_IMODE(mode) == 0o755
        for name in files:
            mode = os.stat(os.path.join(top, name)).st_mode
            assert stat.S_IMODE(mode) in (0o644, 0o755)
    assert store_entries(store) == ["six", "six/1.16.0"]


def test_two_versions_each_in_its_own_container(store, runner):
    (old,) = timed_resolve(store, ("six==1.15.0",))
    (new,) = timed_resolve(store, ("six==1.16.0",))

    assert runner(REPORT, [old], {"module": "six"})["version"] == "1.15.0"
    assert runner(REPORT, [new], {"module": "six"})["version"] == "1.16.0"
    # Unpinned: the newest stored version, although the index has newer.
    (unpinned,) = timed_resolve(store, ("six",))
    assert unpinned == new
    assert store_entries(store) == ["six", "six/1.15.0", "six/1.16.0"]


def test_unpinned_install_is_keyed_by_what_pip_chose(store, runner):
    (six,) = timed_resolve(store, ("Six",))

    seen = runner(REPORT, [six], {"module": "six"})
    assert seen["version"] == six.version
    assert store_entries(store) == ["six", f"six/{six.version}"]


def test_missing_package_is_named_and_leaves_the_store_clean(store):
    name = "sockworker-test-no-such-package"

    with pytest.raises(PackageError) as caught:
        store.resolve((f"{name}==1.0",))

    message = caught.value.message
    assert f"install package '{name}==1.0'" in message
    assert f"No matching distribution found for {name}==1.0" in message
    assert store_entries(store) == []

    # Other packages keep working after a failure.
    (six,) = store.resolve(("six==1.16.0",))
    assert six.version == "1.16.0"


def test_concurrent_resolves_install_once(store, monkeypatch):
    installs = []
    original = store.install

    def counting_install(requirement):
        installs.append(requirement.line)
        return original(requirement)

    monkeypatch.setattr(store, "install", counting_install)
    results, failures = [], []

    def resolve():
        try:
            results.append(store.resolve(("six==1.15.0",)))
        except Exception as exc:  # asserted below
            failures.append(exc)

    threads = [threading.Thread(target=resolve) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert failures == []
    assert installs == ["six==1.15.0"]
    assert len(results) == 3 and len(set(results)) == 1
    assert store_entries(store) == ["six", "six/1.15.0"]


@pytest.mark.slow
def test_numpy_installs_and_works_beside_six(store, runner):
    numpy, six = timed_resolve(store, ("numpy==1.26.4", "six==1.16.0"))

    seen = runner(NUMPY, [numpy, six], {})
    print(f"import numpy in a fresh container: {seen['import_seconds']:.3f} s")
    assert seen["sum"] == 3
    assert seen["version"] == "1.26.4"
    assert seen["file"] == f"{PACKAGES_PATH}/numpy/__init__.py"
    # Both layers merge into one folder holding exactly the two packages.
    listing = runner(REPORT, [numpy, six], {"module": "six"})["listing"]
    assert {"numpy", "six.py"} <= set(listing)
    assert {n for n in listing if n.endswith(".dist-info")} == {
        "numpy-1.26.4.dist-info",
        "six-1.16.0.dist-info",
    }
