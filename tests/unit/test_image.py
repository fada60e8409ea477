"""Unit tests for the base image: apt config parsing, the recipe hash,
prerequisite errors, and the build machinery driven by a fake recipe (a
shell script that prints debootstrap-like lines and makes a tiny tree)."""

import collections
import json
import os
import stat
import textwrap

import pytest

from sockworker import image
from sockworker.image import BaseImage, ImageBuildError, find_mirror

DEB822 = """\
Types: deb
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
Components: main
"""

FAKE_RECIPE = """\
#!/bin/bash
# Stands in for images/base/build: same arguments, same kind of output.
set -eu
target=$1 mirror=$2 detail=$3
echo "I: Retrieving InRelease "
echo "I: Retrieving adduser 3.134"
echo "I: Validating adduser 3.134"
echo "I: Extracting adduser..."
echo "I: Unpacking adduser..."
echo "I: Configuring adduser..."
echo "detail of the run for $mirror" >>"$detail"
if [[ $mirror == *unreachable* ]]; then
    echo "E: Failed getting release file $mirror/dists/bookworm/Release"
    exit 1
fi
mkdir -p "$target/usr/bin"
touch "$target/usr/bin/python3"
echo "$$" >>"$FAKE_RECIPE_RUNS"
echo "I: Finishing done"
"""


def write(path, text, mode=0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


# -- find_mirror ----------------------------------------------------------


def test_find_mirror_reads_deb822_sources(tmp_path):
    write(tmp_path / "d" / "debian.sources", DEB822)

    mirror = find_mirror(str(tmp_path / "d"), str(tmp_path / "none"))

    assert mirror == "http://mirror.example/debian"


def test_find_mirror_skips_disabled_and_other_suites(tmp_path):
    write(
        tmp_path / "d" / "a.sources",
        "Types: deb\nURIs: http://off.example/debian\nSuites: bookworm\n"
        "Enabled: no\n\n"
        "Types: deb-src\nURIs: http://src.example/debian\n"
        "Suites: bookworm\n\n"
        "Types: deb\nURIs: http://old.example/debian\nSuites: bullseye\n\n"
        "Types: deb\nURIs:\n http://on.example/debian\nSuites: bookworm\n",
    )

    mirror = find_mirror(str(tmp_path / "d"), str(tmp_path / "none"))

    assert mirror == "http://on.example/debian"


def test_find_mirror_reads_one_line_format(tmp_path):
    write(
        tmp_path / "sources.list",
        "# deb http://commented.example/debian bookworm main\n"
        "deb-src http://src.example/debian bookworm main\n"
        "deb http://updates.example/debian bookworm-updates main\n"
        "deb [ arch=amd64 signed-by=/k.gpg ] http://one.example/debian"
        " bookworm main contrib\n",
    )

    mirror = find_mirror(str(tmp_path / "d"), str(tmp_path / "sources.list"))

    assert mirror == "http://one.example/debian"


def test_find_mirror_prefers_sources_list_then_dir_by_name(tmp_path):
    write(tmp_path / "d" / "b.list", "deb http://b.example/d bookworm main\n")
    write(tmp_path / "d" / "a.sources", DEB822)
    write(tmp_path / "d" / "c.list.disabled", "deb http://c.example/d x\n")
    sources_list = tmp_path / "sources.list"

    assert (
        find_mirror(str(tmp_path / "d"), str(sources_list))
        == "http://mirror.example/debian"
    )
    write(sources_list, "deb http://first.example/d bookworm main\n")
    assert (
        find_mirror(str(tmp_path / "d"), str(sources_list))
        == "http://first.example/d"
    )


def test_find_mirror_ignores_non_network_uris(tmp_path):
    write(
        tmp_path / "sources.list",
        "deb cdrom:[Debian 12]/ bookworm main\n"
        "deb http://net.example/debian bookworm main\n",
    )

    mirror = find_mirror(str(tmp_path / "d"), str(tmp_path / "sources.list"))

    assert mirror == "http://net.example/debian"


def test_find_mirror_none_found_names_the_files(tmp_path):
    write(tmp_path / "d" / "sec.sources", DEB822.split("\n\n")[1])
    write(tmp_path / "sources.list", "# nothing here\n")

    with pytest.raises(ImageBuildError) as info:
        find_mirror(str(tmp_path / "d"), str(tmp_path / "sources.list"))

    message = str(info.value)
    assert "bookworm" in message
    assert str(tmp_path / "sources.list") in message
    assert str(tmp_path / "d") in message


# -- recipe hash ----------------------------------------------------------


@pytest.fixture
def recipe(tmp_path):
    recipe_dir = tmp_path / "recipe"
    write(recipe_dir / "build", FAKE_RECIPE, mode=0o755)
    return recipe_dir


def test_recipe_hash_is_stable(recipe, tmp_path):
    first = BaseImage(str(tmp_path / "images"), str(recipe))
    second = BaseImage(str(tmp_path / "images"), str(recipe))

    assert first.name == second.name
    assert first.name.startswith("base-") and len(first.name) == 17
    assert first.path == str(tmp_path / "images" / first.name)
    assert first.python == "/usr/bin/python3"


@pytest.mark.parametrize("change", ["content", "mode", "new file", "rename"])
def test_recipe_hash_changes_with_any_file(recipe, tmp_path, change):
    before = BaseImage(str(tmp_path / "images"), str(recipe)).name
    extra = write(recipe / "extra" / "notes", "a\n")
    with_extra = BaseImage(str(tmp_path / "images"), str(recipe)).name

    if change == "content":
        extra.write_text("b\n")
    elif change == "mode":
        extra.chmod(0o600)
    elif change == "new file":
        write(recipe / "post", "true\n")
    else:
        extra.rename(recipe / "extra" / "notes2")
    after = BaseImage(str(tmp_path / "images"), str(recipe)).name

    assert len({before, with_extra, after}) == 3


def test_default_recipe_is_the_repository_base_recipe():
    assert image.RECIPE_DIR.name == "base"
    build = image.RECIPE_DIR / "build"
    assert build.is_file()
    assert os.stat(build).st_mode & stat.S_IXUSR


def test_missing_recipe_dir_is_a_clear_error(tmp_path):
    with pytest.raises(ImageBuildError, match="recipe .*nowhere"):
        BaseImage(str(tmp_path / "images"), str(tmp_path / "nowhere"))


# -- prerequisites --------------------------------------------------------


def test_missing_debootstrap_is_named(recipe, tmp_path, monkeypatch):
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    images_dir = tmp_path / "images"
    base = BaseImage(str(images_dir), str(recipe), mirror="http://m/debian")

    with pytest.raises(ImageBuildError) as info:
        base.ensure(progress=False)

    message = str(info.value)
    assert "debootstrap is not installed" in message
    assert "apt-get install debootstrap" in message
    assert base.name in message
    assert not images_dir.exists()


def test_low_disk_is_named(recipe, tmp_path, monkeypatch):
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(
        image.shutil, "disk_usage", lambda path: usage(10**9, 0, 2**20)
    )
    base = BaseImage(str(tmp_path / "images"), str(recipe), mirror="http://m")

    with pytest.raises(ImageBuildError) as info:
        base.ensure(progress=False)

    message = str(info.value)
    assert "not enough disk space: 1 MB free" in message
    assert "needs about 600 MB" in message
    assert str(tmp_path) in message


def test_not_root_is_named(recipe, tmp_path, monkeypatch):
    monkeypatch.setattr(image.os, "geteuid", lambda: 1000)
    base = BaseImage(str(tmp_path / "images"), str(recipe), mirror="http://m")

    with pytest.raises(ImageBuildError, match="not running as root"):
        base.ensure(progress=False)


# -- the build, with a fake recipe ----------------------------------------


@pytest.fixture
def fake_build(recipe, tmp_path, monkeypatch):
    """A BaseImage whose recipe is FAKE_RECIPE, with the prerequisites
    met: root pretended, a debootstrap on PATH, enough disk."""
    fake_bin = tmp_path / "fake-bin"
    write(fake_bin / "debootstrap", "#!/bin/sh\nexit 99\n", mode=0o755)
    monkeypatch.setenv("PATH", f"{fake_bin}:{os.environ['PATH']}")
    monkeypatch.setattr(image.os, "geteuid", lambda: 0)
    runs = tmp_path / "runs"
    monkeypatch.setenv("FAKE_RECIPE_RUNS", str(runs))

    def make(mirror="http://mirror.example/debian"):
        return BaseImage(str(tmp_path / "images"), str(recipe), mirror)

    make.runs = runs
    return make


def test_build_renames_into_place_and_writes_marker(fake_build, capsys):
    base = fake_build()
    assert not base.is_ready()

    path = base.ensure(progress=True)

    assert path == base.path and base.is_ready()
    assert os.path.isfile(os.path.join(path, "usr/bin/python3"))
    marker = json.loads(open(base.marker_path).read())
    assert marker["recipe_hash"] == base.recipe_hash
    assert marker["mirror"] == "http://mirror.example/debian"
    build_log = open(base.log_path).read()
    assert "I: Configuring adduser..." in build_log
    assert "detail of the run for http://mirror.example" in build_log
    assert sorted(os.listdir(base.images_dir)) == [
        ".lock",
        base.name,
        base.name + ".build.log",
        base.name + ".ready",
    ]
    # Not a terminal under pytest: one line per phase, in order.
    lines = capsys.readouterr().err.splitlines()
    phases = [line.split(": ")[1].split(" (")[0] for line in lines[1:-1]]
    assert phases == ["download", "extract", "install", "finish"]
    assert lines[-1].startswith(f"{base.name}: finished after")


def test_second_ensure_does_not_rebuild(fake_build):
    base = fake_build()
    base.ensure(progress=False)
    marker_mtime = os.stat(base.marker_path).st_mtime_ns

    again = fake_build()
    assert again.is_ready()
    assert again.ensure(progress=False) == base.path

    assert len(fake_build.runs.read_text().split()) == 1
    assert os.stat(base.marker_path).st_mtime_ns == marker_mtime


def test_changed_recipe_builds_a_new_image(fake_build, recipe):
    old = fake_build()
    old.ensure(progress=False)
    write(recipe / "build", FAKE_RECIPE + "# changed\n", mode=0o755)

    new = fake_build()
    new.ensure(progress=False)

    assert new.name != old.name
    assert new.is_ready() and old.is_ready()
    new.remove_stale()
    assert not old.is_ready() and not os.path.lexists(old.path)
    assert not os.path.lexists(old.log_path)
    assert new.is_ready()


def test_unreachable_mirror_fails_and_leaves_only_the_log(fake_build):
    base = fake_build(mirror="http://unreachable.example/debian")

    with pytest.raises(ImageBuildError) as info:
        base.ensure(progress=False)

    message = str(info.value)
    assert "mirror http://unreachable.example/debian is unreachable" in message
    assert "Failed getting release file" in message
    assert base.log_path in message
    assert not base.is_ready()
    assert sorted(os.listdir(base.images_dir)) == [
        ".lock",
        base.name + ".build.log",
    ]
    assert "detail of the run" in open(base.log_path).read()


def test_crashed_build_leftovers_are_removed(fake_build):
    base = fake_build()
    os.makedirs(base.images_dir)
    crashed = os.path.join(base.images_dir, f".build-{base.name}-4242")
    os.makedirs(os.path.join(crashed, "usr/bin"))
    write_detail = crashed + ".detail"
    open(write_detail, "w").close()
    # Renamed but never marked: not proven complete, so rebuilt.
    os.makedirs(os.path.join(base.path, "half"))

    base.ensure(progress=False)

    assert not os.path.lexists(crashed)
    assert not os.path.lexists(write_detail)
    assert not os.path.lexists(os.path.join(base.path, "half"))
    assert base.is_ready()


def test_ready_image_still_sweeps_temp_builds(fake_build):
    base = fake_build()
    base.ensure(progress=False)
    crashed = os.path.join(base.images_dir, ".build-base-0123456789ab-7")
    os.makedirs(crashed)

    base.ensure(progress=False)

    assert not os.path.lexists(crashed)
    assert len(fake_build.runs.read_text().split()) == 1


def test_failing_recipe_reports_its_last_error(fake_build, recipe):
    write(
        recipe / "build",
        "#!/bin/sh\necho 'I: Retrieving InRelease '\n"
        "echo 'E: /usr/bin/python3 does not run in a chroot' >&2\nexit 3\n",
        mode=0o755,
    )
    base = fake_build()

    with pytest.raises(ImageBuildError) as info:
        base.ensure(progress=False)

    message = str(info.value)
    assert "recipe exited with status 3" in message
    assert "does not run in a chroot" in message
    assert not any(
        e.startswith(".build-") for e in os.listdir(base.images_dir)
    )


def test_unexecutable_recipe_is_a_clear_error(fake_build, recipe):
    (recipe / "build").chmod(0o644)
    base = fake_build()

    with pytest.raises(ImageBuildError, match="build base image .*denied"):
        base.ensure(progress=False)


def test_remove_stale_keeps_current_and_foreign_files(fake_build):
    base = fake_build()
    base.ensure(progress=False)
    images_dir = base.images_dir
    for name in ("base-aaaaaaaaaaaa", "base-bbbbbbbbbbbb"):
        os.makedirs(os.path.join(images_dir, name, "etc"))
        open(os.path.join(images_dir, name + ".ready"), "w").close()
    open(os.path.join(images_dir, "base-bbbbbbbbbbbb.build.log"), "w").close()
    open(os.path.join(images_dir, "README"), "w").close()

    base.remove_stale()

    assert sorted(os.listdir(images_dir)) == sorted(
        [
            ".lock",
            "README",
            base.name,
            base.name + ".ready",
            base.name + ".build.log",
        ]
    )


# -- progress parsing -----------------------------------------------------


@pytest.mark.parametrize(
    "line, step",
    [
        ("I: Retrieving adduser 3.134\n", ("Retrieving", "adduser")),
        ("I: Validating libc6 2.36-9+deb12u10", ("Validating", "libc6")),
        ("I: Extracting base-files...", ("Extracting", "base-files")),
        ("I: Unpacking libc6:amd64...", ("Unpacking", "libc6:amd64")),
        ("I: Configuring python3...", ("Configuring", "python3")),
        ("I: Finishing check-python", ("Finishing", "check-python")),
        ("I: Retrieving InRelease ", None),
        ("I: Retrieving Packages ", None),
        ("I: Base system installed successfully.", None),
        ("E: Failed getting release file http://x/Release", None),
    ],
)
def test_parse_step(line, step):
    assert image.parse_step(line) == step


def test_line_reporter_prints_each_phase_once(capsys):
    reporter = image._LineReporter("base-x")
    log = textwrap.dedent(
        """\
        I: Retrieving a 1
        I: Validating a 1
        I: Retrieving b 1
        I: Validating b 1
        I: Extracting a...
        I: Unpacking a...
        I: Configuring a...
        I: Unpacking b...
        I: Configuring b...
        I: Finishing done
        """
    )
    for line in log.splitlines(keepends=True):
        reporter.feed(line)
    reporter.close()

    lines = capsys.readouterr().err.splitlines()
    assert [line.split(" (")[0] for line in lines[:-1]] == [
        "base-x: download",
        "base-x: extract",
        "base-x: install",
        "base-x: finish",
    ]
    assert "2 packages" in lines[2]
    assert lines[-1].startswith("base-x: finished after")
    assert reporter.steps == 10


def test_bar_reporter_total_follows_package_count(monkeypatch):
    pytest.importorskip("tqdm")
    reporter = image._BarReporter("base-x")
    assert reporter.bar.total == round(110 * 4.7) + 8
    for package in range(3):
        reporter.feed(f"I: Retrieving p{package} 1\n")
    reporter.feed("I: Extracting p0...\n")
    assert reporter.bar.total == round(3 * 4.7) + 8
    reporter.feed("I: Finishing done\n")
    reporter.close()
    assert reporter.bar.n == reporter.bar.total == 5


def test_image_name_of_entries():
    assert image._image_name("base-0123abcd") == "base-0123abcd"
    assert image._image_name("base-0123abcd.ready") == "base-0123abcd"
    assert image._image_name("base-0123abcd.build.log") == "base-0123abcd"
    assert image._image_name(".build-base-0123abcd-5") is None
    assert image._image_name("other") is None


def test_main_check_reports_readiness(fake_build, monkeypatch):
    base = fake_build()
    monkeypatch.setattr(image, "RECIPE_DIR", base.recipe_dir)

    assert image.main(["--images-dir", base.images_dir, "--check"]) == 1
    base.ensure(progress=False)
    assert image.main(["--images-dir", base.images_dir, "--check"]) == 0


def test_main_reports_errors_without_traceback(
    fake_build, tmp_path, monkeypatch, capsys
):
    base = fake_build()
    monkeypatch.setattr(image, "RECIPE_DIR", base.recipe_dir)
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))

    code = image.main(
        ["--images-dir", base.images_dir, "--mirror", "http://m"]
    )

    assert code == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot build base image {base.name}")
    assert "apt-get install debootstrap" in err
