"""The lambda registry with local registries: a folder path and file://."""

import errno
import gzip
import importlib.util
import io
import marshal
import os
import runpy
import socket
import stat
import subprocess
import sys
import tarfile
import threading

import pytest

from sockworker import registry
from sockworker.errors import (
    BadRequest,
    CodeCacheFull,
    LambdaInvalid,
    LambdaNotFound,
    RegistryUnavailable,
)
from sockworker.registry import LambdaCode, Registry, check_name

REPO = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
EXAMPLES = os.path.join(REPO, "examples")

HANDLER = b"def f(event):\n    return event\n"


def tar_gz(entries, fmt=tarfile.GNU_FORMAT):
    """A gzip tarball of (name, kind[, payload]) entries, written exactly
    as given: no name cleaning, so unsafe archives can be made."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz", format=fmt) as tar:
        for name, kind, *rest in entries:
            payload = rest[0] if rest else ""
            info = tarfile.TarInfo(name)
            info.mode = 0o755 if kind in ("exec", "dir") else 0o644
            if kind in ("file", "exec"):
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
                continue
            info.type = {
                "dir": tarfile.DIRTYPE,
                "symlink": tarfile.SYMTYPE,
                "hardlink": tarfile.LNKTYPE,
                "chr": tarfile.CHRTYPE,
                "blk": tarfile.BLKTYPE,
                "fifo": tarfile.FIFOTYPE,
            }[kind]
            info.linkname = payload
            tar.addfile(info)
    return raw.getvalue()


class Clock:
    """Stands in for the registry's monotonic clock."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(registry, "_now", fake)
    return fake


@pytest.fixture
def reg_dir(tmp_path):
    path = tmp_path / "registry"
    path.mkdir()
    return path


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


def read(path):
    with open(path, "rb") as f:
        return f.read()


def put_folder(reg_dir, name, files):
    top = reg_dir / name
    for rel, data in files.items():
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        (top / rel).write_bytes(data)
    return top


@pytest.fixture(params=["path", "file_url", "file_localhost"])
def location(request, reg_dir):
    if request.param == "path":
        return str(reg_dir)
    if request.param == "file_url":
        return "file://" + str(reg_dir)
    return "file://localhost" + str(reg_dir)


# --- formats -----------------------------------------------------------


def test_folder_form(location, reg_dir, cache):
    put_folder(
        reg_dir,
        "echo",
        {
            "f.py": HANDLER,
            "requirements.txt": b"requests==2.31\n# pinned\n\nsix\n",
            "ol.yaml": b"triggers: {}\n",
            "lib/util.py": b"X = 1\n",
        },
    )
    code = Registry(location, str(cache)).get("echo")

    assert isinstance(code, LambdaCode)
    assert code.name == "echo"
    assert len(code.version) == 32
    int(code.version, 16)
    assert code.root == os.path.join(cache, "echo", code.version, "layer")
    assert code.code_dir == code.root + "/handler"
    assert read(os.path.join(code.code_dir, "f.py")) == HANDLER
    assert read(os.path.join(code.code_dir, "lib/util.py")) == b"X = 1\n"
    assert read(os.path.join(code.code_dir, "ol.yaml")) == b"triggers: {}\n"
    assert code.requirements == ("requests==2.31", "six")


def test_tarball_form(location, reg_dir, cache):
    data = tar_gz(
        [
            ("f.py", "file", HANDLER),
            ("requirements.txt", "file", b"numpy\n"),
            ("pkg", "dir"),
            ("pkg/mod.py", "file", b"Y = 2\n"),
        ]
    )
    (reg_dir / "add.tar.gz").write_bytes(data)
    code = Registry(location, str(cache)).get("add")

    assert read(os.path.join(code.code_dir, "f.py")) == HANDLER
    assert read(os.path.join(code.code_dir, "pkg/mod.py")) == b"Y = 2\n"
    assert code.requirements == ("numpy",)


def test_single_file_form(location, reg_dir, cache):
    (reg_dir / "hello.py").write_bytes(HANDLER)
    code = Registry(location, str(cache)).get("hello")

    assert sorted(os.listdir(code.code_dir)) == ["__pycache__", "f.py"]
    assert read(os.path.join(code.code_dir, "f.py")) == HANDLER
    assert code.requirements == ()


def test_tarball_top_folder_is_stripped(reg_dir, cache):
    data = tar_gz(
        [
            ("add", "dir"),
            ("add/f.py", "file", HANDLER),
            ("add/lib/x.py", "file", b"x\n"),
            ("add/again.py", "hardlink", "add/f.py"),
        ]
    )
    (reg_dir / "add.tar.gz").write_bytes(data)
    code = Registry(str(reg_dir), str(cache)).get("add")

    assert sorted(os.listdir(code.code_dir)) == [
        "__pycache__",
        "again.py",
        "f.py",
        "lib",
    ]
    assert read(os.path.join(code.code_dir, "again.py")) == HANDLER


def test_tarball_with_other_top_folder_lacks_handler(reg_dir, cache):
    data = tar_gz([("other/f.py", "file", HANDLER)])
    (reg_dir / "add.tar.gz").write_bytes(data)
    with pytest.raises(LambdaInvalid, match="no f.py at the top"):
        Registry(str(reg_dir), str(cache)).get("add")
    assert os.listdir(cache) == []


def test_forms_are_tried_in_order(reg_dir, cache):
    put_folder(reg_dir, "x", {"f.py": b"def f(e): return 'folder'\n"})
    (reg_dir / "x.tar.gz").write_bytes(
        tar_gz([("f.py", "file", b"def f(e): return 'tar'\n")])
    )
    (reg_dir / "x.py").write_bytes(b"def f(e): return 'py'\n")
    (reg_dir / "y.tar.gz").write_bytes(
        tar_gz([("f.py", "file", b"def f(e): return 'tar'\n")])
    )
    (reg_dir / "y.py").write_bytes(b"def f(e): return 'py'\n")
    reg = Registry(str(reg_dir), str(cache))

    x = read(os.path.join(reg.get("x").code_dir, "f.py"))
    y = read(os.path.join(reg.get("y").code_dir, "f.py"))
    assert b"folder" in x
    assert b"tar" in y


def test_same_tree_has_same_version_in_every_form(tmp_path, cache):
    one, two, three = (tmp_path / n for n in ("one", "two", "three"))
    put_folder(one, "x", {"f.py": HANDLER})
    two.mkdir()
    (two / "x.tar.gz").write_bytes(tar_gz([("f.py", "file", HANDLER)]))
    three.mkdir()
    (three / "x.py").write_bytes(HANDLER)

    versions = {
        Registry(str(d), str(cache)).get("x").version
        for d in (one, two, three)
    }
    assert len(versions) == 1


def test_modes_are_readable_by_everyone(reg_dir, cache):
    data = tar_gz(
        [
            ("f.py", "file", HANDLER),
            ("bin/tool", "exec", b"#!/bin/sh\n"),
            ("secret", "file", b"s"),
        ]
    )
    (reg_dir / "m.tar.gz").write_bytes(data)
    old = os.umask(0o077)
    try:
        code = Registry(str(reg_dir), str(cache)).get("m")
    finally:
        os.umask(old)

    def mode(*parts):
        return stat.S_IMODE(os.lstat(os.path.join(*parts)).st_mode)

    version_dir = os.path.dirname(code.root)
    for directory in (
        os.path.dirname(version_dir),
        version_dir,
        code.root,
        code.code_dir,
        os.path.join(code.code_dir, "bin"),
    ):
        assert mode(directory) == 0o755, directory
    assert mode(code.code_dir, "f.py") == 0o644
    assert mode(code.code_dir, "secret") == 0o644
    assert mode(code.code_dir, "bin/tool") == 0o755


def test_in_tree_links_are_kept(reg_dir, cache):
    data = tar_gz(
        [
            ("f.py", "file", HANDLER),
            ("sub/real.py", "file", b"r\n"),
            ("sub/deeper", "dir"),
            ("alias.py", "symlink", "sub/real.py"),
            ("sub/deeper/up", "symlink", "../real.py"),
            ("subdir", "symlink", "sub"),
            ("via", "symlink", "subdir/deeper/../real.py"),
            ("dangling", "symlink", "not/here"),
            ("copy.py", "hardlink", "sub/real.py"),
        ]
    )
    (reg_dir / "links.tar.gz").write_bytes(data)
    code = Registry(str(reg_dir), str(cache)).get("links")

    handler = code.code_dir
    assert os.readlink(os.path.join(handler, "alias.py")) == "sub/real.py"
    assert read(os.path.join(handler, "sub/deeper/up")) == b"r\n"
    assert read(os.path.join(handler, "via")) == b"r\n"
    copy = os.stat(os.path.join(handler, "copy.py"))
    real = os.stat(os.path.join(handler, "sub/real.py"))
    assert copy.st_ino == real.st_ino


def test_folder_in_tree_symlink_is_kept(reg_dir, cache):
    top = put_folder(reg_dir, "s", {"f.py": HANDLER, "lib/a.py": b"a\n"})
    os.symlink("lib/a.py", top / "a.py")
    code = Registry(str(reg_dir), str(cache)).get("s")

    assert os.readlink(os.path.join(code.code_dir, "a.py")) == "lib/a.py"
    assert read(os.path.join(code.code_dir, "a.py")) == b"a\n"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", ()),
        ("# only a comment\n\n   \n", ()),
        ("a==1\nb>=2 # why\n", ("a==1", "b>=2")),
        ("  spaced  \r\n", ("spaced",)),
        (
            "pkg @ https://x/p.zip#egg=pkg\n",
            ("pkg @ https://x/p.zip#egg=pkg",),
        ),
        ("long \\\n  -name\n", ("long   -name",)),
        ("\ufeffbom\n", ("\ufeffbom",)),
    ],
)
def test_parse_requirements(text, expected):
    assert registry._parse_requirements(text) == expected


def test_requirements_with_bom_and_bad_encoding(reg_dir, cache):
    put_folder(reg_dir, "b", {"f.py": HANDLER, "requirements.txt": b"\xff"})
    put_folder(
        reg_dir,
        "c",
        {"f.py": HANDLER, "requirements.txt": b"\xef\xbb\xbfsix\n"},
    )
    reg = Registry(str(reg_dir), str(cache))

    with pytest.raises(LambdaInvalid, match="requirements.txt is not UTF-8"):
        reg.get("b")
    assert reg.get("c").requirements == ("six",)


# --- unsafe or broken code -----------------------------------------------

UNSAFE_ARCHIVES = {
    "absolute": (
        [("f.py", "file", HANDLER), ("/etc/evil", "file", b"x")],
        "'/etc/evil' has an absolute path",
    ),
    "dotdot": (
        [("f.py", "file", HANDLER), ("a/../../evil", "file", b"x")],
        "'a/../../evil' contains '..'",
    ),
    "symlink_absolute": (
        [("f.py", "file", HANDLER), ("p", "symlink", "/etc/passwd")],
        "symlink 'p' -> '/etc/passwd' has an absolute target",
    ),
    "symlink_up": (
        [("f.py", "file", HANDLER), ("a/p", "symlink", "../../etc")],
        "symlink 'a/p' -> '../../etc' leaves the lambda's tree",
    ),
    "symlink_chain": (
        [
            ("f.py", "file", HANDLER),
            ("b", "symlink", "."),
            ("x", "symlink", "b/.."),
        ],
        "symlink 'x' -> 'b/..' leaves the lambda's tree",
    ),
    "symlink_through_absolute": (
        [
            ("f.py", "file", HANDLER),
            ("d", "dir"),
            ("d/x", "symlink", "../y/z"),
            ("y", "symlink", "/"),
        ],
        "'d/x' -> '../y/z' goes through a symlink with an absolute target",
    ),
    "symlink_loop": (
        [
            ("f.py", "file", HANDLER),
            ("a", "symlink", "b/x"),
            ("b", "symlink", "a/y"),
        ],
        "loops",
    ),
    "write_through_symlink": (
        [
            ("f.py", "file", HANDLER),
            ("lib", "symlink", "sub"),
            ("lib/x.py", "file", b"x"),
        ],
        "'lib/x.py' sits under 'lib', which is a symlink",
    ),
    "hardlink_absolute": (
        [("f.py", "file", HANDLER), ("h", "hardlink", "/etc/shadow")],
        "hard link target '/etc/shadow' has an absolute path",
    ),
    "hardlink_up": (
        [("f.py", "file", HANDLER), ("h", "hardlink", "../x")],
        "hard link target '../x' contains '..'",
    ),
    "hardlink_unknown": (
        [("f.py", "file", HANDLER), ("h", "hardlink", "nothere")],
        "hard link 'h' points to 'nothere', which is not an earlier",
    ),
    "hardlink_to_dir": (
        [("f.py", "file", HANDLER), ("d", "dir"), ("h", "hardlink", "d")],
        "which is not an earlier regular file",
    ),
    "char_device": (
        [("f.py", "file", HANDLER), ("null", "chr")],
        "'null' is a character device",
    ),
    "block_device": (
        [("f.py", "file", HANDLER), ("sda", "blk")],
        "'sda' is a block device",
    ),
    "fifo": (
        [("f.py", "file", HANDLER), ("pipe", "fifo")],
        "'pipe' is a fifo",
    ),
    "duplicate": (
        [("f.py", "file", HANDLER), ("f.py", "file", b"again")],
        "'f.py' appears twice",
    ),
    "under_a_file": (
        [("f.py", "file", HANDLER), ("f.py/x", "file", b"x")],
        "'f.py/x' sits under 'f.py', which is a file",
    ),
    "file_over_dir": (
        [("a/b", "file", b"b"), ("a", "file", b"a"), ("f.py", "file", b"")],
        "'a' is a file but other members sit under it",
    ),
    "no_handler": (
        [("main.py", "file", HANDLER)],
        "no f.py at the top",
    ),
    "handler_symlink": (
        [("main.py", "file", HANDLER), ("f.py", "symlink", "main.py")],
        "f.py must be a regular file, not a symlink",
    ),
    "long_name": (
        [("f.py", "file", HANDLER), ("x" * 256, "file", b"")],
        "longer than 255 bytes",
    ),
    "empty": ([], "no f.py at the top"),
}


@pytest.mark.parametrize("kind", sorted(UNSAFE_ARCHIVES))
def test_unsafe_archive_is_refused(kind, reg_dir, cache):
    entries, message = UNSAFE_ARCHIVES[kind]
    (reg_dir / "bad.tar.gz").write_bytes(tar_gz(entries))
    reg = Registry(str(reg_dir), str(cache))

    with pytest.raises(LambdaInvalid) as caught:
        reg.get("bad")
    assert message in str(caught.value)
    assert "lambda 'bad' from " in str(caught.value)
    assert os.listdir(cache) == []


def corrupt_variants():
    good = tar_gz([("f.py", "file", HANDLER * 200)])
    flipped = bytearray(good)
    flipped[-6] ^= 0xFF  # inside the CRC trailer
    yield "random", os.urandom(300)
    yield "truncated", good[: len(good) // 2]
    yield "bad_crc", bytes(flipped)
    yield "plain_tar", _plain_tar([("f.py", HANDLER)])


def _plain_tar(files):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


@pytest.mark.parametrize("kind, data", list(corrupt_variants()))
def test_corrupt_archive_is_refused(kind, data, reg_dir, cache):
    (reg_dir / "bad.tar.gz").write_bytes(data)
    with pytest.raises(LambdaInvalid, match="corrupt archive"):
        Registry(str(reg_dir), str(cache)).get("bad")
    assert os.listdir(cache) == []


def test_unpacked_size_limit(reg_dir, cache):
    entries = [("f.py", "file", HANDLER), ("big", "file", b"0" * 5000)]
    (reg_dir / "big.tar.gz").write_bytes(tar_gz(entries))
    reg = Registry(str(reg_dir), str(cache), max_bytes=4096)

    with pytest.raises(LambdaInvalid, match="unpacks to more than 4096"):
        reg.get("big")
    assert os.listdir(cache) == []
    assert Registry(str(reg_dir), str(cache), max_bytes=8192).get("big")


def test_member_count_limit(reg_dir, cache):
    entries = [("f.py", "file", HANDLER)]
    entries += [(f"m{i}", "file", b"") for i in range(5)]
    (reg_dir / "many.tar.gz").write_bytes(tar_gz(entries))
    reg = Registry(str(reg_dir), str(cache), max_members=5)

    with pytest.raises(LambdaInvalid, match="more than 5 members"):
        reg.get("many")
    assert os.listdir(cache) == []
    assert Registry(str(reg_dir), str(cache), max_members=6).get("many")


def test_compressed_size_limit(reg_dir, cache):
    entries = [("f.py", "file", HANDLER), ("noise", "file", os.urandom(9000))]
    (reg_dir / "noisy.tar.gz").write_bytes(tar_gz(entries))
    reg = Registry(str(reg_dir), str(cache), max_bytes=8192)

    with pytest.raises(LambdaInvalid, match=r"the file is \d+ bytes, over"):
        reg.get("noisy")
    assert os.listdir(cache) == []


def test_single_file_size_limit(reg_dir, cache):
    (reg_dir / "big.py").write_bytes(b"#" * 5000)
    with pytest.raises(LambdaInvalid, match="over the limit of 4096"):
        Registry(str(reg_dir), str(cache), max_bytes=4096).get("big")
    assert os.listdir(cache) == []


def test_decompression_bomb_is_stopped(reg_dir, cache):
    entries = [("f.py", "file", HANDLER), ("zeros", "file", bytes(8 << 20))]
    data = tar_gz(entries)
    assert len(data) < 64 << 10
    (reg_dir / "bomb.tar.gz").write_bytes(data)

    with pytest.raises(LambdaInvalid, match="unpacks to more than"):
        Registry(str(reg_dir), str(cache), max_bytes=1 << 20).get("bomb")
    assert os.listdir(cache) == []


def test_header_bomb_is_stopped(reg_dir, cache):
    """A huge pax header is no file data, but must not be read whole."""
    raw = io.BytesIO()
    with tarfile.open(
        fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT
    ) as t:
        info = tarfile.TarInfo("f.py")
        info.size = len(HANDLER)
        info.pax_headers = {"comment": "z" * (4 << 20)}
        t.addfile(info, io.BytesIO(HANDLER))
    (reg_dir / "hdr.tar.gz").write_bytes(raw.getvalue())
    reg = Registry(str(reg_dir), str(cache), max_bytes=1 << 20, max_members=8)

    with pytest.raises(LambdaInvalid, match="decompresses to more than"):
        reg.get("hdr")
    assert os.listdir(cache) == []


def test_folder_symlinks_leaving_are_refused(reg_dir, cache):
    top = put_folder(reg_dir, "abs", {"f.py": HANDLER})
    os.symlink("/etc/passwd", top / "p")
    top = put_folder(reg_dir, "up", {"f.py": HANDLER, "d/x": b""})
    os.symlink("../../up.py", top / "d" / "out")
    reg = Registry(str(reg_dir), str(cache))

    with pytest.raises(LambdaInvalid, match="'p' -> '/etc/passwd' has an"):
        reg.get("abs")
    with pytest.raises(LambdaInvalid, match="'d/out' -> '../../up.py' leav"):
        reg.get("up")
    assert os.listdir(cache) == []


def test_folder_special_files_are_refused(reg_dir, cache):
    top = put_folder(reg_dir, "fifo", {"f.py": HANDLER})
    os.mkfifo(top / "pipe")
    top = put_folder(reg_dir, "sock", {"f.py": HANDLER})
    server = socket.socket(socket.AF_UNIX)
    try:
        server.bind(str(top / "s"))
        reg = Registry(str(reg_dir), str(cache))
        with pytest.raises(LambdaInvalid, match="'pipe' is a fifo"):
            reg.get("fifo")
        with pytest.raises(LambdaInvalid, match="'s' is a socket"):
            reg.get("sock")
    finally:
        server.close()
    assert os.listdir(cache) == []


def test_folder_limits_and_missing_handler(reg_dir, cache):
    put_folder(reg_dir, "big", {"f.py": HANDLER, "data": b"0" * 5000})
    put_folder(reg_dir, "many", {f"m{i}": b"" for i in range(6)})
    put_folder(reg_dir, "nof", {"main.py": HANDLER})
    reg = Registry(str(reg_dir), str(cache), max_bytes=4096, max_members=5)

    with pytest.raises(LambdaInvalid, match="unpacks to more than 4096"):
        reg.get("big")
    with pytest.raises(LambdaInvalid, match="more than 5 members"):
        reg.get("many")
    with pytest.raises(LambdaInvalid, match="no f.py at the top"):
        reg.get("nof")
    assert os.listdir(cache) == []


# --- names and lookups -------------------------------------------------

BAD_NAMES = [
    "",
    ".",
    "..",
    "a/b",
    "../x",
    "-x",
    ".hidden",
    "_x",
    "a b",
    "a\n",
    "\u00e9",
    "a" * 129,
    None,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_are_refused(name, reg_dir, cache):
    with pytest.raises(BadRequest) as caught:
        check_name(name)
    assert repr(name) in caught.value.message
    assert "must match" in caught.value.message
    with pytest.raises(BadRequest):
        Registry(str(reg_dir), str(cache)).get(name)


@pytest.mark.parametrize("name", ["a", "A.b_c-1", "9", "a" * 128, "x.."])
def test_good_names_pass(name):
    check_name(name)


def test_unknown_lambda(reg_dir, cache):
    with pytest.raises(LambdaNotFound) as caught:
        Registry(str(reg_dir), str(cache)).get("nope")
    assert caught.value.message == (
        f"lambda 'nope' not found in registry {reg_dir}"
    )


def test_wrong_kind_of_entry_is_not_a_form(reg_dir, cache):
    (reg_dir / "x").write_bytes(HANDLER)  # a file without a suffix
    (reg_dir / "x.py").mkdir()  # a directory named like a file
    with pytest.raises(LambdaNotFound):
        Registry(str(reg_dir), str(cache)).get("x")


def test_lock_table_does_not_grow(reg_dir, cache):
    (reg_dir / "a.py").write_bytes(HANDLER)
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=0)
    reg.get("a")
    for i in range(100):
        with pytest.raises(LambdaNotFound):
            reg.get(f"unknown{i}")
    assert reg._locks._slots == {}


def test_no_registry_configured(cache):
    with pytest.raises(LambdaNotFound, match="no registry is configured"):
        Registry("", str(cache)).get("echo")


def test_missing_registry_is_unavailable(tmp_path, cache):
    reg = Registry(str(tmp_path / "absent"), str(cache))
    with pytest.raises(RegistryUnavailable, match="absent"):
        reg.get("echo")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"location": "ftp://host/x"}, "unsupported"),
        ({"location": "file://otherhost/x"}, "unsupported"),
        ({"max_bytes": 0}, "max_bytes must be > 0"),
        ({"max_members": -1}, "max_members must be > 0"),
        ({"timeout": 0}, "timeout must be > 0"),
        ({"refresh_seconds": -1}, "refresh_seconds must be >= 0"),
        ({"cache_dir": ""}, "cache_dir must not be empty"),
    ],
)
def test_bad_settings(kwargs, message, reg_dir, cache):
    args = {"location": str(reg_dir), "cache_dir": str(cache)}
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        Registry(**args)


# --- caching and updates -----------------------------------------------


def count_reads(monkeypatch):
    calls = []
    real = registry._read_bounded

    def counting(path, *args, **kwargs):
        calls.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(registry, "_read_bounded", counting)
    return calls


def test_cache_hit_does_not_touch_registry(clock, monkeypatch, reg_dir, cache):
    (reg_dir / "hello.py").write_bytes(HANDLER)
    reads = count_reads(monkeypatch)
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=5)
    first = reg.get("hello")
    assert len(reads) == 1

    os.remove(reg_dir / "hello.py")
    clock.now += 4.9
    assert reg.get("hello") is first
    assert len(reads) == 1

    clock.now += 0.2
    with pytest.raises(LambdaNotFound):
        reg.get("hello")


def test_unchanged_stamp_is_not_reread(clock, monkeypatch, reg_dir, cache):
    put_folder(reg_dir, "echo", {"f.py": HANDLER, "lib/a.py": b"a"})
    (reg_dir / "hello.py").write_bytes(HANDLER)
    reads = count_reads(monkeypatch)
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=1)
    echo, hello = reg.get("echo"), reg.get("hello")
    assert len(reads) == 3

    clock.now += 10
    assert reg.get("echo") is echo
    assert reg.get("hello") is hello
    assert len(reads) == 3


def test_touched_but_same_content_keeps_version(clock, reg_dir, cache):
    (reg_dir / "hello.py").write_bytes(HANDLER)
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=1)
    first = reg.get("hello")
    os.utime(reg_dir / "hello.py", (1, 1))

    clock.now += 2
    assert reg.get("hello") == first
    assert os.listdir(cache / "hello") == [first.version]


@pytest.mark.parametrize("form", ["folder", "tar", "py"])
def test_update_makes_new_version(form, clock, reg_dir, cache):
    def publish(text):
        if form == "folder":
            put_folder(reg_dir, "u", {"f.py": text})
        elif form == "tar":
            data = tar_gz([("f.py", "file", text)])
            (reg_dir / "u.tar.gz").write_bytes(data)
        else:
            (reg_dir / "u.py").write_bytes(text)

    publish(b"def f(e): return 1\n")
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=5)
    old = reg.get("u")
    publish(b"def f(e): return 2\n")

    clock.now += 1
    assert reg.get("u") is old
    clock.now += 5
    new = reg.get("u")
    assert new.version != old.version
    assert read(os.path.join(new.code_dir, "f.py")) == b"def f(e): return 2\n"
    assert read(os.path.join(old.code_dir, "f.py")) == b"def f(e): return 1\n"

    reg.remove_unused({("u", old.version)})
    assert sorted(os.listdir(cache / "u")) == sorted(
        [old.version, new.version]
    )
    reg.remove_unused(set())
    assert os.listdir(cache / "u") == [new.version]
    assert read(os.path.join(new.code_dir, "f.py")) == b"def f(e): return 2\n"
    assert not [n for n in os.listdir(cache) if n.startswith(".")]


def test_refresh_zero_checks_every_time(reg_dir, cache):
    (reg_dir / "z.py").write_bytes(b"def f(e): return 1\n")
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=0)
    first = reg.get("z")
    (reg_dir / "z.py").write_bytes(b"def f(e): return 22\n")
    assert reg.get("z").version != first.version


def test_lambda_turned_invalid_stops_being_current(clock, reg_dir, cache):
    (reg_dir / "t.tar.gz").write_bytes(tar_gz([("f.py", "file", HANDLER)]))
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=1)
    old = reg.get("t")
    (reg_dir / "t.tar.gz").write_bytes(b"not a tarball")

    clock.now += 2
    with pytest.raises(LambdaInvalid, match="corrupt archive"):
        reg.get("t")
    reg.remove_unused({("t", old.version)})
    assert os.path.isdir(old.code_dir)
    reg.remove_unused(set())
    assert not os.path.exists(cache / "t")


def test_registry_gone_during_recheck_keeps_cached(
    clock, tmp_path, reg_dir, cache
):
    (reg_dir / "k.py").write_bytes(HANDLER)
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=1)
    first = reg.get("k")
    os.chmod(reg_dir, 0o000)
    try:
        clock.now += 2
        if os.access(reg_dir, os.R_OK | os.X_OK):
            # root ignores the mode: take the registry away instead
            os.rename(reg_dir, tmp_path / "elsewhere")
        assert reg.get("k") is first
    finally:
        if os.path.exists(reg_dir):
            os.chmod(reg_dir, 0o755)
        else:
            os.rename(tmp_path / "elsewhere", reg_dir)
            os.chmod(reg_dir, 0o755)


def test_remove_unused_leaves_foreign_entries(reg_dir, cache):
    (reg_dir / "a.py").write_bytes(HANDLER)
    reg = Registry(str(reg_dir), str(cache))
    code = reg.get("a")
    (cache / "a" / "notaversion").mkdir()
    (cache / "lost+found").mkdir()

    reg.remove_unused(set())
    assert sorted(os.listdir(cache / "a")) == sorted(
        [code.version, "notaversion"]
    )
    assert (cache / "lost+found").is_dir()


def test_cached_version_survives_restart(monkeypatch, reg_dir, cache):
    (reg_dir / "r.py").write_bytes(HANDLER)
    first = Registry(str(reg_dir), str(cache)).get("r")
    unpacks = []
    monkeypatch.setattr(
        Registry, "_unpack", lambda *args: unpacks.append(args)
    )

    again = Registry(str(reg_dir), str(cache)).get("r")
    assert again == first
    assert unpacks == []


# --- threads, crashes, sweep -------------------------------------------


def test_concurrent_gets_pull_once(monkeypatch, reg_dir, cache):
    put_folder(reg_dir, "echo", {"f.py": HANDLER})
    probes, unpacks = [], []
    real_probe = registry._LocalSource.probe
    real_unpack = Registry._unpack
    gate = threading.Event()

    def slow_probe(self, name, entry):
        probes.append(name)
        gate.wait(5)  # hold the pull until every thread is waiting
        return real_probe(self, name, entry)

    def counted_unpack(self, *args):
        unpacks.append(args[0])
        return real_unpack(self, *args)

    monkeypatch.setattr(registry._LocalSource, "probe", slow_probe)
    monkeypatch.setattr(Registry, "_unpack", counted_unpack)
    reg = Registry(str(reg_dir), str(cache))
    results, errors = [], []
    barrier = threading.Barrier(20)

    def worker():
        barrier.wait()
        try:
            results.append(reg.get("echo"))
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    while len(probes) < 1:
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)
    gate.set()
    for thread in threads:
        thread.join(10)

    assert errors == []
    assert len(results) == 20
    assert len(set(results)) == 1
    assert probes == ["echo"]
    assert unpacks == ["echo"]


@pytest.mark.parametrize(
    "err, expected",
    [
        (errno.ENOSPC, CodeCacheFull),
        (errno.EDQUOT, CodeCacheFull),
        (errno.EIO, OSError),
    ],
)
def test_failed_unpack_leaves_nothing(
    err, expected, monkeypatch, reg_dir, cache
):
    (reg_dir / "w.tar.gz").write_bytes(
        tar_gz([("f.py", "file", HANDLER), ("g.py", "file", b"")])
    )

    def failing_write(path, member):
        raise OSError(err, os.strerror(err), path)

    monkeypatch.setattr(registry, "_write_file", failing_write)
    with pytest.raises(expected, match="unpack lambda 'w' version") as info:
        Registry(str(reg_dir), str(cache)).get("w")
    assert os.listdir(cache) == []
    if expected is CodeCacheFull:
        assert info.value.status == 507
        assert str(cache) in info.value.message


def test_remove_unused_can_take_current_versions(reg_dir, cache):
    for name in ("kept", "idle"):
        put_folder(reg_dir, name, {"f.py": HANDLER})
    reg = Registry(str(reg_dir), str(cache), refresh_seconds=3600)
    kept, idle = reg.get("kept"), reg.get("idle")

    reg.remove_unused(set())
    assert sorted(os.listdir(cache)) == ["idle", "kept"]

    reg.remove_unused({("kept", kept.version)}, keep_current=False)
    assert os.listdir(cache) == ["kept"]
    assert os.path.isdir(kept.code_dir)
    # The idle lambda's entry went with its code: the next get pulls it
    # again, though its refresh interval has not passed.
    again = reg.get("idle")
    assert again == idle and os.path.isdir(again.code_dir)


def test_crash_mid_unpack_leaves_temp_dir_for_sweep(reg_dir, cache):
    (reg_dir / "c.tar.gz").write_bytes(
        tar_gz([("f.py", "file", HANDLER), ("g.py", "file", b"")])
    )
    script = (
        "import os, sys\n"
        "from sockworker import registry\n"
        "def crash(path, member):\n"
        "    os._exit(3)\n"
        "registry._write_file = crash\n"
        "registry.Registry(sys.argv[1], sys.argv[2]).get('c')\n"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", script, str(reg_dir), str(cache)], cwd=REPO
    )
    assert child.wait(60) == 3
    leftovers = os.listdir(cache)
    assert len(leftovers) == 1
    assert leftovers[0].startswith(f".tmp-{child.pid}-c-")
    assert os.listdir(cache / leftovers[0] / "layer" / "handler") == []

    reg = Registry(str(reg_dir), str(cache))
    reg.sweep()
    assert os.listdir(cache) == []
    code = reg.get("c")
    assert read(os.path.join(code.code_dir, "f.py")) == HANDLER


def test_sweep_keeps_live_processes_and_versions(reg_dir, cache):
    (reg_dir / "a.py").write_bytes(HANDLER)
    reg = Registry(str(reg_dir), str(cache))
    code = reg.get("a")
    dead = cache / f".tmp-{_reaped_pid()}-a-x1"
    mine = cache / f".tmp-{os.getpid()}-a-x2"
    live = cache / ".tmp-1-a-x3"  # pid 1 is always alive
    for path in (dead, mine, live):
        (path / "layer").mkdir(parents=True)
        (path / "layer" / "junk").write_bytes(b"junk")

    reg.sweep()
    assert sorted(os.listdir(cache)) == sorted([live.name, "a"])
    assert os.path.isfile(os.path.join(code.code_dir, "f.py"))


def _reaped_pid():
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


# --- the example registry ------------------------------------------------


def test_example_registry(cache):
    reg = Registry(os.path.join(EXAMPLES, "registry"), str(cache))

    def run(name, event):
        code = reg.get(name)
        handler = runpy.run_path(os.path.join(code.code_dir, "f.py"))
        return handler["f"](event)

    assert run("echo", {"x": [1, 2]}) == {"x": [1, 2]}
    assert run("hello", {"name": "sock"}) == "hello, sock"
    assert run("add", {"a": 2, "b": 3}) == {"sum": 5}


def test_example_tarball_is_what_the_script_builds():
    script = runpy.run_path(os.path.join(EXAMPLES, "make_registry.py"))
    committed = read(os.path.join(EXAMPLES, "registry", "add.tar.gz"))
    assert script["build_add_tarball"]() == committed
    assert gzip.decompress(committed)  # a valid gzip stream


def test_code_is_compiled_once_at_unpack(reg_dir, cache):
    (reg_dir / "hello.py").write_bytes(HANDLER)
    code = Registry(str(reg_dir), str(cache)).get("hello")

    cached = os.listdir(os.path.join(code.code_dir, "__pycache__"))
    assert len(cached) == 1 and cached[0].startswith("f.")
    pyc = os.path.join(code.code_dir, "__pycache__", cached[0])
    # Unchecked-hash bytecode: flags word 0b01 (hash-based, not checked).
    with open(pyc, "rb") as f:
        assert int.from_bytes(f.read(8)[4:8], "little") == 0b01
    assert os.stat(pyc).st_mode & 0o777 == 0o644


def load_bytecode(path):
    """The code object in an unchecked-hash .pyc, after its header."""
    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == importlib.util.MAGIC_NUMBER
    return marshal.loads(data[16:])


def test_bytecode_is_the_source_compiled(reg_dir, cache):
    library = HANDLER.replace(b"f(", b"g(")
    put_folder(
        reg_dir,
        "pkg",
        {"f.py": b"from lib import g\nf = g\n", "lib.py": library},
    )
    code = Registry(str(reg_dir), str(cache)).get("pkg")

    namespace = {}
    pyc = importlib.util.cache_from_source(
        os.path.join(code.code_dir, "lib.py")
    )
    compiled = load_bytecode(pyc)
    # Named as a sandbox sees it, with no host path in it.
    assert compiled.co_filename == "/handler/lib.py"
    exec(compiled, namespace)
    assert namespace["g"]({"n": 1}) == {"n": 1}
    with open(pyc, "rb") as f:
        stored_hash = f.read(16)[8:16]
    assert stored_hash == importlib.util.source_hash(
        read(os.path.join(code.code_dir, "lib.py"))
    )


def test_shipped_bytecode_is_replaced(reg_dir, cache):
    # Bytecode from the registry need not match its source; the worker
    # writes its own over it, and leaves a module that does not compile
    # without bytecode for the sandbox to report.
    tag = sys.implementation.cache_tag
    fake = importlib.util.MAGIC_NUMBER + b"\x01\0\0\0" + b"\0" * 8
    fake += marshal.dumps(
        compile("def f(event):\n    return 'x'\n", "", "exec")
    )
    (reg_dir / "shipped.tar.gz").write_bytes(
        tar_gz(
            [
                ("f.py", "file", HANDLER),
                (f"__pycache__/f.{tag}.pyc", "file", fake),
                ("broken.py", "file", b"def (\n"),
            ]
        )
    )
    code = Registry(str(reg_dir), str(cache)).get("shipped")

    namespace = {}
    exec(
        load_bytecode(
            os.path.join(code.code_dir, "__pycache__", f"f.{tag}.pyc")
        ),
        namespace,
    )
    assert namespace["f"]("same") == "same"
    assert sorted(os.listdir(os.path.join(code.code_dir, "__pycache__"))) == [
        f"f.{tag}.pyc"
    ]
