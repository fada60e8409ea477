"""The lambda registry over HTTP, against real servers on 127.0.0.1."""

import hashlib
import http.server
import io
import os
import socket
import tarfile
import threading
import time

import pytest

from sockworker import registry
from sockworker.errors import (
    LambdaInvalid,
    LambdaNotFound,
    RegistryUnavailable,
)
from sockworker.registry import Registry

HANDLER = b"def f(event):\n    return event\n"


def tar_gz(files):
    """A gzip tarball of {name: bytes} regular files."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return raw.getvalue()


def read(path):
    with open(path, "rb") as f:
        return f.read()


class Server:
    """A ThreadingHTTPServer on an ephemeral loopback port, in a thread,
    recording (method, path, status) of every request."""

    def __init__(self, handler_class):
        self.requests = []
        server = self

        class Recording(handler_class):
            def log_request(self, code="-", size="-"):
                server.requests.append((self.command, self.path, int(code)))

            def log_message(self, format, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), Recording
        )
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, args=(0.05,)
        )
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.httpd.server_address[1]

    def statuses(self):
        return [status for _, _, status in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    """Talk to 127.0.0.1 directly even if the environment has a proxy."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def clock(monkeypatch):
    class Clock:
        now = 1000.0

        def __call__(self):
            return self.now

    fake = Clock()
    monkeypatch.setattr(registry, "_now", fake)
    return fake


@pytest.fixture
def served(tmp_path):
    """A directory served by http.server's SimpleHTTPRequestHandler."""
    root = tmp_path / "served"
    root.mkdir()

    class DirectoryHandler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(root), **kwargs)

    server = Server(DirectoryHandler)
    server.root = root
    yield server
    server.close()


class Store:
    """What the in-memory server serves: path -> bytes, plus behaviour."""

    def __init__(self):
        self.files = {}
        self.status = None  # force this status for every request
        self.etag = False
        self.content_length = True


@pytest.fixture
def store():
    state = Store()

    class StoreHandler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if state.status is not None:
                self.send_error(state.status)
                return
            data = state.files.get(self.path)
            if data is None:
                self.send_error(404)
                return
            tag = '"%s"' % hashlib.sha256(data).hexdigest()[:16]
            if state.etag and self.headers.get("If-None-Match") == tag:
                self.send_response(304)
                self.end_headers()
                return
            self.send_response(200)
            if state.etag:
                self.send_header("ETag", tag)
            if state.content_length:
                self.send_header("Content-Length", str(len(data)))
            else:
                self.close_connection = True
            self.end_headers()
            self.wfile.write(data)

    server = Server(StoreHandler)
    server.store = state
    yield server
    server.close()


@pytest.fixture
def cache(tmp_path):
    return tmp_path / "cache"


# --- forms and errors ----------------------------------------------------


def test_tarball_form(served, cache):
    data = tar_gz({"f.py": HANDLER, "requirements.txt": b"six\n"})
    (served.root / "add.tar.gz").write_bytes(data)
    code = Registry(served.url, str(cache)).get("add")

    assert read(os.path.join(code.code_dir, "f.py")) == HANDLER
    assert code.requirements == ("six",)
    assert served.requests == [("GET", "/add.tar.gz", 200)]


def test_single_file_form(served, cache):
    (served.root / "hello.py").write_bytes(HANDLER)
    code = Registry(served.url + "/", str(cache)).get("hello")

    assert sorted(os.listdir(code.code_dir)) == ["__pycache__", "f.py"]
    assert served.requests == [
        ("GET", "/hello.tar.gz", 404),
        ("GET", "/hello.py", 200),
    ]


def test_registry_under_a_path(served, cache):
    (served.root / "lambdas").mkdir()
    (served.root / "lambdas" / "hello.py").write_bytes(HANDLER)
    code = Registry(served.url + "/lambdas", str(cache)).get("hello")

    assert read(os.path.join(code.code_dir, "f.py")) == HANDLER


def test_folder_form_is_not_used_over_http(served, cache):
    (served.root / "echo").mkdir()
    (served.root / "echo" / "f.py").write_bytes(HANDLER)
    with pytest.raises(LambdaNotFound):
        Registry(served.url, str(cache)).get("echo")


def test_every_form_missing_is_not_found(served, cache):
    with pytest.raises(LambdaNotFound) as caught:
        Registry(served.url, str(cache)).get("nope")
    assert caught.value.message == (
        f"lambda 'nope' not found in registry {served.url}"
    )
    assert served.statuses() == [404, 404]
    assert os.listdir(cache) == []


def test_server_error_is_unavailable(store, cache):
    store.store.status = 500
    with pytest.raises(RegistryUnavailable, match="HTTP 500"):
        Registry(store.url, str(cache)).get("add")
    assert os.listdir(cache) == []


def test_forbidden_is_unavailable(store, cache):
    store.store.status = 403
    with pytest.raises(RegistryUnavailable, match="HTTP 403"):
        Registry(store.url, str(cache)).get("add")


def test_server_not_listening_is_unavailable(cache):
    # A bound socket that does not listen answers connects with RST, and
    # holding it keeps anyone else from taking the port meanwhile.
    with socket.socket() as bound:
        bound.bind(("127.0.0.1", 0))
        url = "http://127.0.0.1:%d" % bound.getsockname()[1]
        with pytest.raises(RegistryUnavailable, match="refused"):
            Registry(url, str(cache)).get("add")


def test_silent_server_times_out(cache):
    with socket.socket() as mute:
        mute.bind(("127.0.0.1", 0))
        mute.listen(4)  # connections complete, nobody ever answers
        url = "http://127.0.0.1:%d" % mute.getsockname()[1]
        reg = Registry(url, str(cache), timeout=0.3)
        started = time.monotonic()
        with pytest.raises(RegistryUnavailable, match="timed out"):
            reg.get("add")
        assert time.monotonic() - started < 5


def test_unsafe_tarball_over_http(store, cache):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        tar.addfile(tarfile.TarInfo("f.py"))
        link = tarfile.TarInfo("p")
        link.type = tarfile.SYMTYPE
        link.linkname = "../../etc/passwd"
        tar.addfile(link)
    store.store.files["/bad.tar.gz"] = raw.getvalue()

    with pytest.raises(LambdaInvalid, match="leaves the lambda's tree"):
        Registry(store.url, str(cache)).get("bad")
    assert os.listdir(cache) == []


@pytest.mark.parametrize("content_length", [True, False])
def test_download_limit(content_length, store, cache):
    store.store.content_length = content_length
    store.store.files["/big.py"] = b"#" * 5000
    reg = Registry(store.url, str(cache), max_bytes=4096)

    with pytest.raises(LambdaInvalid, match="download is .*over the limit"):
        reg.get("big")
    assert os.listdir(cache) == []


# --- caching and updates -----------------------------------------------


def test_update_detected_with_last_modified(clock, served, cache):
    path = served.root / "u.tar.gz"
    path.write_bytes(tar_gz({"f.py": b"def f(e): return 1\n"}))
    os.utime(path, (1_700_000_000, 1_700_000_000))
    reg = Registry(served.url, str(cache), refresh_seconds=5)
    old = reg.get("u")

    clock.now += 1
    assert reg.get("u") is old
    assert len(served.requests) == 1  # a cache hit asks nobody

    clock.now += 5
    assert reg.get("u") is old
    assert served.requests[-1] == ("GET", "/u.tar.gz", 304)

    path.write_bytes(tar_gz({"f.py": b"def f(e): return 2\n"}))
    os.utime(path, (1_700_000_100, 1_700_000_100))
    clock.now += 5
    new = reg.get("u")
    assert new.version != old.version
    assert served.requests[-1] == ("GET", "/u.tar.gz", 200)
    assert read(os.path.join(new.code_dir, "f.py")) == b"def f(e): return 2\n"
    assert read(os.path.join(old.code_dir, "f.py")) == b"def f(e): return 1\n"


def test_update_detected_with_etag(clock, store, cache):
    store.store.etag = True
    store.store.files["/e.py"] = b"def f(e): return 1\n"
    reg = Registry(store.url, str(cache), refresh_seconds=5)
    old = reg.get("e")

    clock.now += 6
    assert reg.get("e") is old
    assert store.requests[-1] == ("GET", "/e.py", 304)

    store.store.files["/e.py"] = b"def f(e): return 2\n"
    clock.now += 6
    new = reg.get("e")
    assert new.version != old.version
    assert store.requests[-1] == ("GET", "/e.py", 200)


def test_update_detected_without_validators(clock, store, cache):
    store.store.files["/n.py"] = b"def f(e): return 1\n"
    reg = Registry(store.url, str(cache), refresh_seconds=5)
    old = reg.get("n")

    clock.now += 6
    assert reg.get("n") is old  # downloaded again, same hash
    assert store.statuses() == [404, 200, 404, 200]
    assert os.listdir(cache / "n") == [old.version]

    store.store.files["/n.py"] = b"def f(e): return 2\n"
    clock.now += 6
    new = reg.get("n")
    assert new.version != old.version
    assert sorted(os.listdir(cache / "n")) == sorted(
        [old.version, new.version]
    )


def test_new_tarball_wins_over_cached_single_file(clock, store, cache):
    store.store.files["/w.py"] = b"def f(e): return 'py'\n"
    reg = Registry(store.url, str(cache), refresh_seconds=5)
    old = reg.get("w")
    store.store.files["/w.tar.gz"] = tar_gz({"f.py": b"def f(e): 'tar'\n"})

    clock.now += 6
    new = reg.get("w")
    assert new.version != old.version
    assert read(os.path.join(new.code_dir, "f.py")) == b"def f(e): 'tar'\n"


def test_registry_down_on_recheck_keeps_cached(clock, store, cache):
    store.store.files["/k.py"] = HANDLER
    reg = Registry(store.url, str(cache), refresh_seconds=5)
    first = reg.get("k")
    store.store.status = 503

    clock.now += 6
    assert reg.get("k") is first
    requests = len(store.requests)
    clock.now += 1
    assert reg.get("k") is first
    assert len(store.requests) == requests  # not asked again before 5 s


def test_deleted_lambda_is_not_found_after_refresh(clock, store, cache):
    store.store.files["/d.py"] = HANDLER
    reg = Registry(store.url, str(cache), refresh_seconds=5)
    reg.get("d")
    del store.store.files["/d.py"]

    clock.now += 6
    with pytest.raises(LambdaNotFound):
        reg.get("d")


def test_concurrent_gets_download_once(store, cache):
    store.store.files["/c.tar.gz"] = tar_gz({"f.py": HANDLER})
    reg = Registry(store.url, str(cache))
    barrier = threading.Barrier(20)
    results, errors = [], []

    def worker():
        barrier.wait()
        try:
            results.append(reg.get("c"))
        except Exception as err:  # collected and asserted below
            errors.append(err)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)

    assert errors == []
    assert len(results) == 20 and len(set(results)) == 1
    assert store.requests == [("GET", "/c.tar.gz", 200)]
