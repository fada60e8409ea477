"""Privileged tests of the base image: a real debootstrap build (once per
images directory, shared by the session), chroot into it, real flock
between processes, real mounts left behind by a crashed build."""

import os
import shutil
import subprocess
import sys
import time

import pytest

from sockworker.image import DEFAULT_IMAGES_DIR, BaseImage, ImageBuildError

pytestmark = [
    pytest.mark.privileged,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root"),
]

IMAGES_DIR = os.environ.get("SOCKWORKER_IMAGES_DIR", DEFAULT_IMAGES_DIR)

# Same arguments and output shape as images/base/build, without network.
FAKE_RECIPE = """\
#!/bin/bash
set -eu
target=$1
echo "I: Retrieving adduser 3.134"
sleep "${FAKE_RECIPE_SLEEP:-0}"
mkdir -p "$target/usr/bin"
touch "$target/usr/bin/python3"
echo "$$" >>"$FAKE_RECIPE_RUNS"
echo "I: Finishing done"
"""


def mount_points():
    with open("/proc/self/mountinfo") as f:
        return sorted(line.split()[4] for line in f)


def processes_mentioning(text):
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmdline = f.read().decode(errors="replace")
        except (FileNotFoundError, ProcessLookupError):
            continue
        if text in cmdline:
            found.append((pid, cmdline.replace("\0", " ")))
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(tmp_path):
    before = mount_points()
    yield
    assert mount_points() == before
    assert processes_mentioning(str(tmp_path)) == []


@pytest.fixture(scope="session")
def shared_image():
    """The real base image, built at most once per images directory."""
    base = BaseImage(IMAGES_DIR)
    started = time.monotonic()
    base.ensure(progress=True)
    print(f"ensure() of {base.path}: {time.monotonic() - started:.1f} s")
    return base


@pytest.fixture
def fake_recipe(tmp_path, monkeypatch):
    recipe = tmp_path / "recipe"
    recipe.mkdir()
    (recipe / "build").write_text(FAKE_RECIPE)
    (recipe / "build").chmod(0o755)
    monkeypatch.setenv("FAKE_RECIPE_RUNS", str(tmp_path / "runs"))
    return recipe


def chroot_python(root, code):
    return subprocess.run(
        ["chroot", root, "/usr/bin/python3", "-I", "-S", "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_image_runs_python_with_its_standard_library(shared_image):
    assert shared_image.is_ready()

    result = chroot_python(
        shared_image.path, "import json, http.client, socket, selectors"
    )

    assert result.returncode == 0, result.stderr


def test_image_has_mount_points_tmp_and_nobody(shared_image):
    root = shared_image.path
    for mount_point in ("handler", "proc", "dev", "run/sockworker"):
        assert os.listdir(os.path.join(root, mount_point)) == []
    assert os.path.isdir(os.path.join(root, "opt/sockworker"))
    assert os.stat(os.path.join(root, "tmp")).st_mode & 0o7777 == 0o1777
    result = chroot_python(
        root, "import pwd; print(pwd.getpwnam('nobody').pw_uid)"
    )
    assert result.stdout.strip() == "65534", result.stderr
    assert not os.path.exists(os.path.join(root, "debootstrap"))
    assert os.listdir(os.path.join(root, "usr/share/doc")) == []
    assert not [
        name
        for name in os.listdir(os.path.join(root, "var/cache/apt/archives"))
        if name.endswith(".deb")
    ]


def test_second_ensure_does_not_rebuild(shared_image):
    marker_mtime = os.stat(shared_image.marker_path).st_mtime_ns
    again = BaseImage(IMAGES_DIR)

    started = time.monotonic()
    path = again.ensure(progress=True)
    elapsed = time.monotonic() - started

    assert path == shared_image.path
    assert elapsed < 0.5
    assert os.stat(shared_image.marker_path).st_mtime_ns == marker_mtime


def test_crashed_build_with_mounts_is_removed(shared_image):
    stale = os.path.join(IMAGES_DIR, f".build-{shared_image.name}-{2**22 + 1}")
    proc_dir = os.path.join(stale, "proc")
    os.makedirs(proc_dir)
    # What a killed debootstrap leaves: a filesystem still mounted inside
    # the target. A tmpfs with a file stands in for /proc, so that a
    # removal that descended into the mount would be seen deleting it.
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", proc_dir], check=True)
    open(os.path.join(proc_dir, "inside-the-mount"), "w").close()
    try:
        assert shared_image.ensure(progress=False) == shared_image.path

        assert not os.path.lexists(stale)
        assert proc_dir not in mount_points()
        assert shared_image.is_ready()
    finally:
        if proc_dir in mount_points():
            subprocess.run(["umount", "-l", proc_dir], check=True)
        shutil.rmtree(stale, ignore_errors=True)


def test_unreachable_mirror_names_the_mirror(tmp_path):
    # Port 9 (discard) on loopback: nothing listens, the connect is refused.
    mirror = "http://127.0.0.1:9/debian"
    base = BaseImage(str(tmp_path / "images"), mirror=mirror)

    with pytest.raises(ImageBuildError) as info:
        base.ensure(progress=False)

    message = str(info.value)
    assert f"mirror {mirror} is unreachable" in message
    assert base.log_path in message
    with open(base.log_path) as f:
        assert "Failed getting release file" in f.read()
    assert sorted(os.listdir(base.images_dir)) == [
        ".lock",
        base.name + ".build.log",
    ]


def test_concurrent_ensure_builds_once(tmp_path, fake_recipe, monkeypatch):
    monkeypatch.setenv("FAKE_RECIPE_SLEEP", "1")
    images_dir = tmp_path / "images"
    code = (
        "import sys; from sockworker.image import BaseImage;"
        "print(BaseImage(sys.argv[1], sys.argv[2], 'http://m').ensure())"
    )
    argv = [sys.executable, "-c", code, str(images_dir), str(fake_recipe)]

    procs = [
        subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [proc.communicate(timeout=60) for proc in procs]

    assert [proc.returncode for proc in procs] == [0, 0], results
    paths = {out.strip() for out, _ in results}
    assert len(paths) == 1
    assert (tmp_path / "runs").read_text().count("\n") == 1
    errs = "".join(err for _, err in results)
    assert "waiting for another process building" in errs


def test_remove_stale_keeps_a_mounted_image(tmp_path, fake_recipe):
    base = BaseImage(str(tmp_path / "images"), str(fake_recipe), "http://m")
    base.ensure(progress=False)
    in_use = tmp_path / "images" / "base-aaaaaaaaaaaa"
    unused = tmp_path / "images" / "base-bbbbbbbbbbbb"
    for old in (in_use, unused):
        (old / "handler").mkdir(parents=True)
        (tmp_path / "images" / f"{old.name}.ready").touch()
    subprocess.run(
        ["mount", "-t", "tmpfs", "tmpfs", str(in_use / "handler")],
        check=True,
    )
    try:
        base.remove_stale()

        assert in_use.is_dir()
        assert (tmp_path / "images" / f"{in_use.name}.ready").exists()
        assert not unused.exists()
        assert not (tmp_path / "images" / f"{unused.name}.ready").exists()
        assert base.is_ready()
    finally:
        subprocess.run(["umount", str(in_use / "handler")], check=True)
