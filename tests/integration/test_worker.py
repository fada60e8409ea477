"""The HTTP contract of DESIGN.md section 6, against a real worker: every
status code produced by a real cause, concurrency, code updates, registry
forms (folder, file, tarball, HTTP) and start-up errors."""

import concurrent.futures
import contextlib
import functools
import http.client
import http.server
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from tests.integration.conftest import (
    WORKER,
    LambdaRegistry,
    Reply,
    free_port,
    session_members,
    wait_until,
)

pytestmark = pytest.mark.integration

MIB = 1024 * 1024

ECHO = """
def f(event):
    return event
"""

DESCRIBE = """
def f(event):
    return {"type": type(event).__name__, "event": event}
"""

SLEEPER = """
import time

def f(event):
    time.sleep(event.get("seconds", 0))
    return {"id": event.get("id"), "slept": event.get("seconds", 0)}
"""

RAISER = """
def check(value):
    raise ValueError(f"value {value!r} is not acceptable")


def f(event):
    return check(event.get("value"))
"""

# Each mode makes the sandbox die a different way; "ok" answers.
DIER = """
import ctypes
import os


def f(event):
    how = event.get("how", "ok")
    if how == "memory":
        blocks = []
        for _ in range(event["mb"]):
            blocks.append(b"x" * (1 << 20))
        return len(blocks)
    if how == "exit":
        os._exit(3)
    if how == "kill":
        os.kill(os.getpid(), 9)
        return {"pid": os.getpid(), "survived": "kill"}
    if how == "segfault":
        ctypes.string_at(0)
    return {"pid": os.getpid(), "how": how}
"""

NESTED = {
    "dict": {"a": {"b": {"c": [1, 2, {"d": None}]}}},
    "list": [[], [[]], [1, [2, [3, [4]]]]],
    "unicode": 'héllo wörld ☃ 日本語 🎉 \u0000 "quoted" \\ back',
    "floats": [0.1, -2.5, 1e-300, 1.7976931348623157e308, 3.0],
    "ints": [0, -1, 2**53, -(2**62)],
    "null": None,
    "true": True,
    "false": False,
    "empty": {"dict": {}, "list": [], "string": ""},
}


# ---------------------------------------------------------------------
# 200: the round trip.


@pytest.mark.parametrize("route", ["run", "runLambda"])
def test_nested_json_round_trip(worker, registry, route):
    registry.add("echo", ECHO)

    reply = worker.run("echo", NESTED, route=route)

    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("application/json")
    assert reply.json() == NESTED


def test_empty_body_is_empty_event(worker, registry):
    registry.add("describe", DESCRIBE)

    reply = worker.run("describe", b"")

    assert reply.status == 200, reply
    assert reply.json() == {"type": "dict", "event": {}}


def test_top_level_json_values_reach_the_handler(worker, registry):
    registry.add("describe", DESCRIBE)

    for event, kind in [([1, "a"], "list"), ("text", "str"), (7, "int")]:
        reply = worker.run("describe", event)
        assert reply.status == 200, reply
        assert reply.json() == {"type": kind, "event": event}


# ---------------------------------------------------------------------
# 4xx: the client's mistakes.


def assert_error(reply, status, kind, *words):
    """reply is the JSON error of the contract, naming every word."""
    assert reply.status == status, reply
    assert reply.headers["content-type"].startswith("application/json")
    body = reply.json()
    assert body["error"] == kind, body
    for word in words:
        assert word in body["message"], body
    return body


@pytest.mark.parametrize(
    "body, words",
    [
        (b'{"a": ', ["not valid JSON"]),
        (b"{'single': 'quotes'}", ["not valid JSON"]),
        (b'{"a": 1} trailing', ["not valid JSON"]),
        (b'"\xff\xfe"', ["not UTF-8"]),
    ],
)
def test_bad_json_is_400(worker, registry, body, words):
    registry.add("echo", ECHO)

    reply = worker.run("echo", body)

    assert_error(reply, 400, "bad_request", *words)
    # The worker keeps serving the same lambda.
    assert worker.run("echo", {"ok": 1}).json() == {"ok": 1}


def test_unknown_lambda_is_404(worker, registry):
    registry.add("echo", ECHO)

    reply = worker.run("nosuchlambda", {})

    assert_error(reply, 404, "not_found", "nosuchlambda")


@pytest.mark.parametrize(
    "method, path",
    [("GET", "/nowhere"), ("POST", "/run"), ("POST", "/run/a/b")],
)
def test_unknown_route_is_404(worker, method, path):
    reply = worker.request(method, path, b"{}")

    assert_error(reply, 404, "not_found", path)


@pytest.mark.parametrize(
    "quoted, name",
    [
        ("bad%24name", "bad$name"),
        ("has%20space", "has space"),
        ("-leading-dash", "-leading-dash"),
        ("_underscore", "_underscore"),
        ("x" * 129, "x" * 129),
    ],
)
def test_bad_lambda_name_is_400(worker, registry, quoted, name):
    registry.add("echo", ECHO)

    reply = worker.run(quoted, {})

    assert_error(reply, 400, "bad_request", repr(name), "invalid")


def test_dotted_name_is_a_name_not_a_path(worker, registry):
    # "a..b" passes the name rule; it must be looked up as a name, never
    # resolve to a parent directory.
    registry.add("a..b", ECHO)

    assert worker.run("a..b", {"dots": 2}).json() == {"dots": 2}
    assert_error(worker.run("b..a", {}), 404, "not_found", "b..a")


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_wrong_method_on_run_is_405(worker, registry, method):
    registry.add("echo", ECHO)

    reply = worker.request(method, "/run/echo")

    assert_error(reply, 405, "method_not_allowed", method)
    assert "POST" in reply.headers["allow"]


def exact_body(size):
    """A JSON object body of exactly size bytes: {"blob": "xxx..."}."""
    frame = b'{"blob": ""}'
    return b'{"blob": "' + b"x" * (size - len(frame)) + b'"}'


def test_body_at_the_limit_passes_and_above_is_413(start_worker, registry):
    registry.add(
        "measure",
        """
        def f(event):
            return {"length": len(event["blob"]), "blob": event["blob"]}
        """,
    )
    worker = start_worker(max_body_bytes=MIB)

    at_limit = exact_body(MIB)
    reply = worker.run("measure", at_limit)
    assert reply.status == 200, reply
    result = reply.json()
    assert result["blob"] == json.loads(at_limit)["blob"]
    assert result["length"] == MIB - len(b'{"blob": ""}')

    above = exact_body(MIB + 1)
    assert_error(
        send_whole_body(worker.port, "/run/measure", above),
        413,
        "payload_too_large",
        str(MIB + 1),
        "max_body_bytes",
    )


def send_whole_body(port, path, body):
    """POST body, tolerating a server that answers and closes before
    reading it all (which is how a refused body is allowed to end)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    try:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        try:
            sock.sendall(head + body)
        except (BrokenPipeError, ConnectionResetError):
            pass
        data = b""
        try:
            while chunk := sock.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    head, _, payload = data.partition(b"\r\n\r\n")
    assert head, "no response before the connection closed"
    status = int(head.split()[1])
    headers = {}
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.decode().partition(":")
        headers[name.strip().lower()] = value.strip()
    return Reply(status, headers, payload)


def test_declared_length_above_limit_is_413_before_reading(
    start_worker, registry
):
    registry.add("echo", ECHO)
    worker = start_worker(max_body_bytes=MIB)

    # Only the headers go out: the worker must answer from the
    # Content-Length alone instead of waiting for a body.
    sock = socket.create_connection(("127.0.0.1", worker.port), timeout=10)
    with sock:
        sock.sendall(
            b"POST /run/echo HTTP/1.1\r\nHost: x\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        first = sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 413"), first[:200]


def test_overloaded_is_429(start_worker, registry):
    registry.add("sleeper", SLEEPER)
    worker = start_worker(max_instances_per_lambda=1, queue_per_lambda=0)
    # Warm the only instance so the slow request starts at once.
    assert worker.run("sleeper", {"seconds": 0}).status == 200

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        slow = pool.submit(worker.run, "sleeper", {"seconds": 2, "id": 1})
        time.sleep(0.5)
        refused = worker.run("sleeper", {"seconds": 0, "id": 2})
        assert not slow.done(), "the slow request ended too early"
        assert_error(refused, 429, "overloaded", "sleeper")
        assert slow.result().status == 200
    assert slow.result().json() == {"id": 1, "slept": 2}


# ---------------------------------------------------------------------
# 5xx: the handler's and the sandbox's failures.


def test_handler_exception_is_500_with_traceback(worker, registry):
    registry.add("raiser", RAISER)

    reply = worker.run("raiser", {"value": 42})

    body = assert_error(reply, 500, "handler_error", "ValueError", "42")
    trace = body["traceback"]
    assert "Traceback (most recent call last)" in trace
    assert 'f.py", line 2, in check' in trace
    assert 'raise ValueError(f"value {value!r} is not acceptable")' in (trace)
    assert 'f.py", line 6, in f' in trace
    # A handler that raised leaves its sandbox usable: the next request
    # is warm.
    assert worker.run("raiser", {"value": 1}).status == 500
    stats = worker.get("/stats").json()["lambdas"]["raiser"]
    assert (stats["cold"], stats["warm"], stats["errors"]) == (1, 1, 2)


def test_out_of_memory_is_502_then_fresh_sandbox(start_worker, registry):
    registry.add("dier", DIER)
    worker = start_worker(memory_mb=64)
    first = worker.run("dier", {})
    assert first.status == 200, first

    reply = worker.run("dier", {"how": "memory", "mb": 256})

    body = assert_error(reply, 502, "sandbox_died", "out of memory")
    assert body["reason"] == "out of memory"
    after = worker.run("dier", {})
    assert after.status == 200, after
    assert after.headers["x-sockworker-cold"] == "true"


def test_memory_under_the_limit_is_fine(start_worker, registry):
    registry.add("dier", DIER)
    worker = start_worker(memory_mb=64)

    reply = worker.run("dier", {"how": "memory", "mb": 16})

    assert reply.status == 200, reply
    assert reply.json() == 16


@pytest.mark.parametrize(
    "how, words",
    [
        ("exit", ["exited with status 3"]),
        ("segfault", ["crashed", "SIGSEGV"]),
    ],
)
def test_sandbox_death_is_502_then_fresh_sandbox(worker, registry, how, words):
    registry.add("dier", DIER)
    assert worker.run("dier", {}).status == 200

    reply = worker.run("dier", {"how": how})

    assert_error(reply, 502, "sandbox_died", *words)
    after = worker.run("dier", {})
    assert after.status == 200, after
    assert after.json() == {"pid": 1, "how": "ok"}
    assert after.headers["x-sockworker-cold"] == "true"


def test_handler_sigkill_to_itself_is_ignored(worker, registry):
    """The handler runs in the container's init, PID 1 of its PID
    namespace, and the kernel drops a signal with the default action that
    a namespace's init sends itself: os.kill(os.getpid(), 9) returns and
    the sandbox lives on. (A SIGKILL from outside does end it: see the
    memory and timeout tests.)"""
    registry.add("dier", DIER)

    reply = worker.run("dier", {"how": "kill"})

    assert reply.status == 200, reply
    assert reply.json() == {"pid": 1, "survived": "kill"}
    again = worker.run("dier", {})
    assert again.json() == {"pid": 1, "how": "ok"}
    stats = worker.get("/stats").json()["lambdas"]["dier"]
    assert (stats["cold"], stats["warm"]) == (1, 1)


def test_timeout_is_504_then_fresh_sandbox(start_worker, registry):
    registry.add("sleeper", SLEEPER)
    worker = start_worker(timeout_seconds=1.5)
    assert worker.run("sleeper", {"seconds": 0}).status == 200

    started = time.monotonic()
    reply = worker.run("sleeper", {"seconds": 30})
    elapsed = time.monotonic() - started

    assert_error(reply, 504, "timeout", "1.5 s")
    assert 1.5 <= elapsed < 10, elapsed
    after = worker.run("sleeper", {"seconds": 0, "id": "next"})
    assert after.status == 200, after
    assert after.json() == {"id": "next", "slept": 0}
    assert after.headers["x-sockworker-cold"] == "true"


def test_shutdown_drains_in_flight_and_refuses_new(worker, registry):
    registry.add("sleeper", SLEEPER)
    assert worker.run("sleeper", {"seconds": 0}).status == 200

    with draining(worker) as in_flight:
        late = late_request(worker)
        # The refusal is immediate: the late request is not held until
        # the drain ends.
        assert not in_flight.done(), "late request waited for the drain"
        reply = in_flight.result()

    assert reply.status == 200, reply
    assert reply.json() == {"id": "drained", "slept": 2}
    if isinstance(late, Exception):
        assert isinstance(late, ConnectionRefusedError), repr(late)
    else:
        assert_error(late, 503, "shutting_down")
    assert worker.wait() == 0


def test_request_on_open_connection_during_drain_is_503(worker, registry):
    # A connection kept alive from before SIGTERM stays open for a moment
    # of the drain; a request on it reaches the app, which refuses it.
    registry.add("sleeper", SLEEPER)
    kept = http.client.HTTPConnection("127.0.0.1", worker.port, timeout=10)
    kept.request("GET", "/status")
    assert kept.getresponse().read()

    with draining(worker) as in_flight:
        replies = []
        for method, path in (("POST", "/run/sleeper"), ("GET", "/status")):
            kept.request(
                method, path, body=b"{}" if method == "POST" else None
            )
            response = kept.getresponse()
            headers = {k.lower(): v for k, v in response.getheaders()}
            replies.append(Reply(response.status, headers, response.read()))
            if headers.get("connection") == "close":
                break
        assert in_flight.result().status == 200

    kept.close()
    body = assert_error(replies[0], 503, "shutting_down", "sleeper")
    assert "not run" in body["message"]
    for reply in replies[1:]:
        assert_error(reply, 503, "shutting_down")
    assert worker.wait() == 0


@contextlib.contextmanager
def draining(worker):
    """Runs its body while the worker drains: a 2 s request to the
    sleeper lambda is in flight and SIGTERM came 0.3 s ago. Yields that
    request's future."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        in_flight = pool.submit(
            worker.run, "sleeper", {"seconds": 2, "id": "drained"}
        )
        time.sleep(0.5)
        worker.send(signal.SIGTERM)
        time.sleep(0.3)
        yield in_flight


def late_request(worker):
    """A request sent after SIGTERM: its reply, or the connection error
    it ended with."""
    try:
        return worker.run("sleeper", {"seconds": 0}, timeout=10)
    except OSError as exc:
        return exc


# ---------------------------------------------------------------------
# Status and statistics.


def test_status_while_serving(worker):
    reply = worker.get("/status")

    assert reply.status == 200, reply
    assert reply.headers["content-type"].startswith("application/json")
    status = reply.json()
    assert status["state"] == "serving"
    assert status["instances"] == 0


def test_stats_count_cold_and_warm(worker, registry):
    registry.add("echo", ECHO)
    registry.add("raiser", RAISER)

    cold = worker.run("echo", {"n": 0})
    warm = [worker.run("echo", {"n": n}) for n in range(1, 4)]
    worker.run("raiser", {})
    stats = worker.get("/stats").json()

    assert cold.headers["x-sockworker-cold"] == "true"
    assert [r.headers["x-sockworker-cold"] for r in warm] == ["false"] * 3
    echo = stats["lambdas"]["echo"]
    assert echo["requests"] == 4
    assert echo["errors"] == 0
    assert (echo["cold"], echo["warm"]) == (1, 3)
    latency = echo["latency_ms"]
    assert latency["cold"]["samples"] == 1
    assert latency["warm"]["samples"] == 3
    assert 0 < latency["warm"]["p50"] <= latency["warm"]["p99"]
    assert latency["cold"]["p50"] > 0
    assert stats["lambdas"]["raiser"]["errors"] == 1
    assert stats["instances"]["echo"] == {"idle": 1, "busy": 0}
    assert worker.get("/status").json()["instances"] == 2


# ---------------------------------------------------------------------
# Concurrency.


def test_two_lambdas_in_parallel(worker, registry):
    for name in ("left", "right"):
        registry.add(
            name,
            f"""
            import time

            def f(event):
                time.sleep(0.05)
                return {{"lambda": {name!r}, "n": event["n"]}}
            """,
        )

    def call(name, n):
        reply = worker.run(name, {"n": n})
        return reply.status, reply.json()

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = {
            (name, n): pool.submit(call, name, n)
            for n in range(10)
            for name in ("left", "right")
        }
        results = {key: f.result(timeout=60) for key, f in futures.items()}

    for (name, n), (status, body) in results.items():
        assert status == 200, body
        assert body == {"lambda": name, "n": n}


def test_fifty_concurrent_requests_none_lost(start_worker, registry):
    registry.add("sleeper", SLEEPER)
    worker = start_worker(queue_per_lambda=64, timeout_seconds=20)
    count = 50
    barrier = threading.Barrier(count)

    def call(n):
        barrier.wait(30)
        reply = worker.run(
            "sleeper", {"id": f"req-{n}", "seconds": 0.05}, timeout=60
        )
        return reply.status, reply.json()

    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        results = list(pool.map(call, range(count), timeout=90))
    elapsed = time.monotonic() - started

    assert [status for status, _ in results] == [200] * count, results
    assert [body["id"] for _, body in results] == [
        f"req-{n}" for n in range(count)
    ]
    assert elapsed < 60, elapsed
    stats = worker.get("/stats").json()["lambdas"]["sleeper"]
    assert stats["requests"] == count
    assert stats["cold"] <= 4  # max_instances_per_lambda


def test_many_cold_starts_at_once(start_worker, registry):
    """Cold starts of many lambdas at the same moment: sandboxes are
    prepared and started by several threads at once, each forking, and
    none may wait on a pipe end another one's fork inherited."""
    names = [f"cold{n}" for n in range(12)]
    for name in names:
        registry.add(name, ECHO)
    worker = start_worker(max_instances=16, memory_budget_mb=2048)
    barrier = threading.Barrier(len(names))

    def call(name):
        barrier.wait(30)
        return worker.run(name, {"name": name}, timeout=30)

    with concurrent.futures.ThreadPoolExecutor(len(names)) as pool:
        replies = list(pool.map(call, names, timeout=90))

    for name, reply in zip(names, replies, strict=True):
        assert reply.status == 200, reply
        assert reply.json() == {"name": name}
        assert reply.headers["x-sockworker-cold"] == "true"


# ---------------------------------------------------------------------
# The registry.


def version_source(version):
    return f"""
    def f(event):
        return {{"version": {version!r}}}
    """


def test_code_update_seen_on_next_request(start_worker, registry):
    registry.add("versioned", version_source("v1"))
    worker = start_worker(registry_refresh_seconds=0)
    assert worker.run("versioned").json() == {"version": "v1"}
    assert worker.run("versioned").json() == {"version": "v1"}

    registry.add("versioned", version_source("v2"))

    assert worker.run("versioned").json() == {"version": "v2"}
    assert worker.run("versioned").json() == {"version": "v2"}


def test_code_update_seen_within_refresh_interval(start_worker, registry):
    interval = 1.0
    registry.add("versioned", version_source("v1"))
    worker = start_worker(registry_refresh_seconds=interval)
    assert worker.run("versioned").json() == {"version": "v1"}

    registry.add("versioned", version_source("v2"))
    changed = time.monotonic()
    answers = []

    def updated():
        answers.append(worker.run("versioned").json()["version"])
        return answers[-1] == "v2"

    assert wait_until(updated, interval + 3, interval=0.1), answers
    assert time.monotonic() - changed <= interval + 1.0
    # Once v2 answered, v1 never answers again.
    assert all(
        worker.run("versioned").json() == {"version": "v2"} for _ in range(3)
    )


@pytest.mark.parametrize("form", ["folder", "file", "tarball"])
def test_registry_forms(worker, registry, form):
    registry.add(
        "formed",
        f"""
        def f(event):
            return {{"form": {form!r}, "x": event["x"]}}
        """,
        form=form,
    )

    reply = worker.run("formed", {"x": [1, "two"]})

    assert reply.status == 200, reply
    assert reply.json() == {"form": form, "x": [1, "two"]}


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_registry(tmp_path):
    """A real HTTP server on 127.0.0.1 serving a registry folder."""
    served = LambdaRegistry(str(tmp_path / "served"))
    handler = functools.partial(QuietHandler, directory=served.path)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    served.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_registry_over_http(start_worker, http_registry):
    http_registry.add(
        "remote",
        """
        def f(event):
            return {"remote": True, "echo": event}
        """,
        form="tarball",
    )
    http_registry.add("single", version_source("single"), form="file")
    worker = start_worker(registry=http_registry.url)

    reply = worker.run("remote", {"k": "v"})
    single = worker.run("single")
    missing = worker.run("absent")

    assert reply.status == 200, reply
    assert reply.json() == {"remote": True, "echo": {"k": "v"}}
    assert single.json() == {"version": "single"}
    assert_error(missing, 404, "not_found", "absent")


# ---------------------------------------------------------------------
# Start-up errors: run bin/worker directly and expect a quick exit.


def run_worker_command(config_path, timeout=30):
    """Run bin/worker to its exit; a worker that starts serving instead
    is stopped (its whole session, by pid) and the test fails."""
    proc = subprocess.Popen(
        [sys.executable, WORKER, "--config", str(config_path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for pid in session_members(proc.pid):
            os.kill(pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"worker with {config_path} did not exit in {timeout} s")
    return proc.returncode, out, err


def write_config(path, text):
    path.write_text(text)
    return path


def valid_config(tmp_path):
    return {
        "sandbox": "sock",
        "worker_host": "127.0.0.1",
        "worker_port": free_port(),
        "state_dir": str(tmp_path / "state"),
        "images_dir": str(tmp_path / "images-unused"),
        "log_output": str(tmp_path / "worker.log"),
        "registry": str(tmp_path / "registry"),
    }


def config_with(tmp_path, **changes):
    config = valid_config(tmp_path)
    config.update(changes)
    return json.dumps(config)


@pytest.mark.parametrize(
    "case, text, words",
    [
        ("missing", None, ["missing.json", "cannot read config"]),
        ("bad_json", '{"worker_port": 80,', ["invalid JSON", "line 1"]),
        ("not_object", "[1, 2]", ["JSON object"]),
        (
            "unknown_key",
            lambda tmp: config_with(tmp, worker_prot=80),
            ['unknown field "worker_prot"', '"worker_port"'],
        ),
        (
            "wrong_type",
            lambda tmp: config_with(tmp, worker_port="8080"),
            ['field "worker_port"', "integer", '"8080"'],
        ),
        (
            "out_of_range",
            lambda tmp: config_with(tmp, memory_mb=1),
            ['field "memory_mb"', ">= 16"],
        ),
        (
            "bad_choice",
            lambda tmp: config_with(tmp, sandbox="lxc"),
            ['field "sandbox"', '"lxc"'],
        ),
        (
            "duplicate",
            '{"memory_mb": 64, "memory_mb": 128}',
            ['"memory_mb"', "more than once"],
        ),
    ],
)
def test_config_error_exits_2_with_one_line(tmp_path, case, text, words):
    path = tmp_path / f"{case}.json"
    if callable(text):
        text = text(tmp_path)
    if text is not None:
        write_config(path, text)

    started = time.monotonic()
    status, out, err = run_worker_command(path)
    elapsed = time.monotonic() - started

    assert status == 2, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("worker: "), err
    assert str(path) in lines[0], err
    for word in words:
        assert word in lines[0], err
    assert "listening" not in out
    assert elapsed < 15, elapsed
    assert not (tmp_path / "state").exists()


def docker_answers():
    with socket.socket(socket.AF_UNIX) as sock:
        sock.settimeout(1)
        try:
            sock.connect("/var/run/docker.sock")
        except OSError:
            return False
    return True


@pytest.mark.skipif(docker_answers(), reason="a Docker daemon answers here")
def test_docker_sandbox_without_daemon_exits_2(tmp_path):
    path = write_config(
        tmp_path / "docker.json", config_with(tmp_path, sandbox="docker")
    )

    status, out, err = run_worker_command(path)

    assert status == 2, (status, out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "docker" in lines[0] and "/var/run/docker.sock" in lines[0]
    assert '"sandbox": "sock"' in lines[0]


def test_second_worker_on_same_state_dir_refuses(
    start_worker, registry, tmp_path
):
    registry.add("echo", ECHO)
    first = start_worker()
    assert first.run("echo", {"first": 1}).json() == {"first": 1}
    second = dict(first.config)
    second["worker_port"] = free_port()
    second["log_output"] = str(tmp_path / "second.log")
    path = write_config(tmp_path / "second.json", json.dumps(second))

    status, out, err = run_worker_command(path)

    assert status != 0, (status, out, err)
    assert "another worker" in err and str(first.pid) in err, err
    assert first.state_dir in err, err
    assert "listening" not in out
    assert first.running()
    assert first.run("echo", {"still": 1}).json() == {"still": 1}
    assert first.get("/status").status == 200


def test_worker_keeps_serving_after_every_error(worker, registry):
    """One worker through every error kind in a row, then a good
    request: no error leaves it unable to serve."""
    registry.add("echo", ECHO)
    registry.add("raiser", RAISER)
    registry.add("dier", DIER)

    statuses = [
        worker.run("echo", b"{").status,
        worker.run("nope", {}).status,
        worker.run("bad%24", {}).status,
        worker.get("/run/echo").status,
        worker.run("raiser", {}).status,
        worker.run("dier", {"how": "exit"}).status,
    ]

    assert statuses == [400, 404, 400, 405, 500, 502]
    assert worker.run("echo", {"fine": True}).json() == {"fine": True}
    assert worker.get("/status").json()["state"] == "serving"


def test_long_state_dir_serves(start_worker, registry, tmp_path):
    """Sandbox sockets live under state_dir, and a Unix socket address
    holds at most 107 bytes; a state_dir longer than that still serves
    (sockets are bound and reached through a directory fd)."""
    registry.add("echo", ECHO)
    state_dir = str(tmp_path / ("s" * 100))

    worker = start_worker(state_dir=state_dir)
    reply = worker.run("echo", {"long": True})

    assert reply.status == 200, reply
    assert reply.json() == {"long": True}


def test_log_has_lifecycle_and_one_access_line_per_request(worker, registry):
    registry.add("echo", ECHO)
    for i in range(5):
        assert worker.run("echo", {"i": i}).status == 200
    assert worker.run("missing", {}).status == 404

    worker.stop()
    log = worker.log_text()

    access = [line for line in log.splitlines() if "sockworker.access" in line]
    assert sum("POST /run/echo 200" in line for line in access) == 5
    assert sum("POST /run/missing 404" in line for line in access) == 1
    assert "instance of echo created in sandbox" in log
    assert "destroyed: worker shutting down" in log


def test_eviction_under_concurrency_loses_nothing(start_worker, registry):
    """More lambdas than instance slots, four clients at once: every
    request is answered while idle instances are evicted to make room."""
    names = [f"echo{i}" for i in range(48)]
    for name in names:
        registry.add(name, ECHO)
    worker = start_worker(
        max_instances=3, memory_budget_mb=4096, queue_per_lambda=8
    )
    replies = {}

    def client(part):
        for name in part:
            replies[name] = worker.run(name, {"name": name})

    threads = [
        threading.Thread(target=client, args=(names[i::4],)) for i in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert sorted(replies) == sorted(names)
    for name, reply in replies.items():
        assert reply.status == 200, reply
        assert reply.json() == {"name": name}
