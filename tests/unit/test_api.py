import io
import json
import logging

import falcon
import falcon.testing
import pytest

from sockworker.api import create_app
from sockworker.config import Config
from sockworker.errors import (
    HandlerError,
    HandlerTimeout,
    LambdaNotFound,
    Overloaded,
    SandboxDied,
    ShuttingDown,
)

LIMIT = 1000


class FakeManager:
    """Stands in for the lead's Manager: records calls, answers with
    `result` or raises `error`."""

    def __init__(self):
        self.accepting = True
        self.calls = []
        self.result = b'{"ok": true}'
        self.cold = False
        self.error = None

    def run(self, name, body):
        self.calls.append((name, body))
        if self.error is not None:
            raise self.error
        return self.result, self.cold

    def status(self):
        return {"state": "serving", "instances": 2}

    def stats(self):
        return {"lambdas": {"f": {"requests": 3}}, "totals": {"requests": 3}}


@pytest.fixture
def manager():
    return FakeManager()


@pytest.fixture
def app(manager):
    return create_app(manager, Config(max_body_bytes=LIMIT))


@pytest.fixture
def client(app):
    return falcon.testing.TestClient(app)


def assert_error(result, status, kind):
    assert result.status_code == status
    assert result.headers["content-type"] == "application/json"
    body = result.json
    assert body["error"] == kind
    assert isinstance(body["message"], str) and body["message"]
    return body


def call_wsgi(app, env):
    """Call the app with a hand-made environ, bypassing the test client's
    WSGI lint (which refuses the malformed requests tested here)."""
    start = falcon.testing.StartResponseMock()
    body = b"".join(app(env, start))
    code = int(start.status.split()[0])
    return code, dict(start.headers), json.loads(body)


class Stream:
    """A wsgi.input that counts what is read and can forbid reading."""

    def __init__(self, data, readable=True):
        self._data = io.BytesIO(data)
        self.readable = readable
        self.bytes_read = 0

    def read(self, size=-1):
        assert self.readable, "the body must not be read"
        chunk = self._data.read(size)
        self.bytes_read += len(chunk)
        return chunk


def chunked_environ(data, readable=True):
    env = falcon.testing.create_environ("/run/f", method="POST")
    env.pop("CONTENT_LENGTH", None)
    env["HTTP_TRANSFER_ENCODING"] = "chunked"
    env["wsgi.input"] = Stream(data, readable)
    return env


# Success


@pytest.mark.parametrize("path", ["/run/f", "/runLambda/f"])
def test_run_returns_result_bytes_as_they_are(client, manager, path):
    manager.result = b'{"x":  1,"y":"\\u00e9"}'
    result = client.simulate_post(path, body=b'{"a": 1}')
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/json"
    assert result.content == manager.result
    assert manager.calls == [("f", b'{"a": 1}')]


def test_cold_header(client, manager):
    manager.cold = True
    assert client.simulate_post("/run/f").headers["x-sockworker-cold"] == (
        "true"
    )
    manager.cold = False
    assert client.simulate_post("/run/f").headers["x-sockworker-cold"] == (
        "false"
    )


def test_empty_body_is_an_empty_object(client, manager):
    result = client.simulate_post("/run/f", body=b"")
    assert result.status_code == 200
    assert manager.calls == [("f", b"{}")]


def test_one_megabyte_body_passes_through(manager):
    big = json.dumps({"data": "x" * (1024 * 1024)}).encode()
    client = falcon.testing.TestClient(
        create_app(manager, Config(max_body_bytes=2 * 1024 * 1024))
    )
    result = client.simulate_post("/run/f", body=big)
    assert result.status_code == 200
    assert manager.calls == [("f", big)]


def test_nested_json_round_trip(client, manager):
    event = {"a": [1, 2.5, {"b": None, "c": [True, False]}], "é": "ü"}
    body = json.dumps(event, ensure_ascii=False).encode()
    manager.result = body
    result = client.simulate_post("/run/f", body=body)
    assert result.status_code == 200
    assert manager.calls[0][1] == body
    assert result.json == event


def test_body_of_exactly_the_limit_is_accepted(client, manager):
    body = b'"' + b"x" * (LIMIT - 2) + b'"'
    assert client.simulate_post("/run/f", body=body).status_code == 200
    assert manager.calls == [("f", body)]


def test_chunked_body_within_limit(app, manager):
    status, _, body = call_wsgi(app, chunked_environ(b'{"chunked": 1}'))
    assert status == 200
    assert body == {"ok": True}
    assert manager.calls == [("f", b'{"chunked": 1}')]


def test_no_length_and_not_chunked_means_empty(app, manager):
    env = falcon.testing.create_environ("/run/f", method="POST")
    env.pop("CONTENT_LENGTH", None)
    env["wsgi.input"] = Stream(b"", readable=False)
    status, _, _ = call_wsgi(app, env)
    assert status == 200
    assert manager.calls == [("f", b"{}")]


# 400


def test_bad_json_is_400_with_position(client, manager):
    result = client.simulate_post("/run/f", body=b'{"a": 1,}')
    body = assert_error(result, 400, "bad_request")
    assert body["message"] == (
        "request body is not valid JSON: Expecting property name enclosed "
        "in double quotes: line 1 column 9 (char 8)"
    )
    assert manager.calls == []


def test_non_utf8_body_is_400(client, manager):
    result = client.simulate_post("/run/f", body=b'{"a": "\xff"}')
    body = assert_error(result, 400, "bad_request")
    assert body["message"] == (
        "request body is not UTF-8: invalid start byte at byte 7"
    )
    assert manager.calls == []


def test_utf16_json_is_not_accepted(client, manager):
    # json.loads(bytes) would detect UTF-16; the contract says UTF-8.
    result = client.simulate_post("/run/f", body='{"a": 1}'.encode("utf-16"))
    assert_error(result, 400, "bad_request")
    assert manager.calls == []


def test_deeply_nested_json_is_400(manager):
    body = b"[" * 100000 + b"]" * 100000
    app = create_app(manager, Config(max_body_bytes=len(body)))
    result = falcon.testing.TestClient(app).simulate_post("/run/f", body=body)
    assert_error(result, 400, "bad_request")
    assert manager.calls == []


def test_bad_content_length_is_400(app):
    env = falcon.testing.create_environ("/run/f", method="POST", body="{}")
    env["CONTENT_LENGTH"] = "12abc"
    status, _, body = call_wsgi(app, env)
    assert status == 400
    assert body["error"] == "bad_request"
    assert "Content-Length" in body["message"]


def test_body_shorter_than_content_length_is_400(app, manager):
    env = falcon.testing.create_environ("/run/f", method="POST")
    env["CONTENT_LENGTH"] = "10"
    env["wsgi.input"] = Stream(b"{}")
    status, _, body = call_wsgi(app, env)
    assert status == 400
    assert body["message"] == (
        "request body ended after 2 of the 10 bytes announced by "
        "Content-Length"
    )
    assert manager.calls == []


# 404, 405


def test_unknown_route_is_404(client):
    body = assert_error(client.simulate_get("/nowhere"), 404, "not_found")
    assert "GET /nowhere" in body["message"]


def test_unknown_lambda_is_404(client, manager):
    manager.error = LambdaNotFound("lambda 'nope' is not in the registry")
    result = client.simulate_post("/run/nope")
    body = assert_error(result, 404, "not_found")
    assert body["message"] == "lambda 'nope' is not in the registry"


@pytest.mark.parametrize(
    "method, path, allowed",
    [
        ("GET", "/run/f", "POST"),
        ("PUT", "/runLambda/f", "POST"),
        ("POST", "/status", "GET"),
        ("DELETE", "/stats", "GET"),
    ],
)
def test_wrong_method_is_405_with_allow(client, method, path, allowed):
    result = client.simulate_request(method, path)
    body = assert_error(result, 405, "method_not_allowed")
    assert allowed in result.headers["allow"].split(", ")
    assert f"method {method} is not allowed on {path}" in body["message"]


# 413


def test_content_length_over_limit_is_413_without_reading(app, manager):
    env = falcon.testing.create_environ("/run/f", method="POST")
    env["CONTENT_LENGTH"] = str(LIMIT + 1)
    env["wsgi.input"] = Stream(b"x" * (LIMIT + 1), readable=False)
    status, headers, body = call_wsgi(app, env)
    assert status == 413
    assert headers["content-type"] == "application/json"
    assert body == {
        "error": "payload_too_large",
        "message": f"request body of {LIMIT + 1} bytes is larger than the "
        f"limit of {LIMIT} bytes (max_body_bytes)",
    }
    assert manager.calls == []


def test_chunked_body_over_limit_is_413_after_limit_plus_one(app, manager):
    env = chunked_environ(b"x" * (LIMIT * 50))
    status, _, body = call_wsgi(app, env)
    assert status == 413
    assert body["error"] == "payload_too_large"
    assert env["wsgi.input"].bytes_read == LIMIT + 1
    assert manager.calls == []


# Errors from the manager


def test_overloaded_is_429(client, manager):
    manager.error = Overloaded("lambda 'f' has 64 requests queued")
    assert_error(client.simulate_post("/run/f"), 429, "overloaded")


def test_handler_error_is_500_with_traceback(client, manager):
    tb = 'Traceback (most recent call last):\n  File "f.py"\nKeyError: 1\n'
    manager.error = HandlerError("handler raised KeyError: 1", traceback=tb)
    body = assert_error(client.simulate_post("/run/f"), 500, "handler_error")
    assert body["message"] == "handler raised KeyError: 1"
    assert body["traceback"] == tb


def test_unexpected_exception_is_500_without_traceback(
    client, manager, caplog
):
    manager.error = RuntimeError("secret /etc/sockworker/token")
    with caplog.at_level(logging.ERROR, logger="sockworker.api.errors"):
        result = client.simulate_post("/run/f")
    body = assert_error(result, 500, "internal")
    text = result.text
    assert "secret" not in text
    assert "Traceback" not in text
    assert "RuntimeError" not in text
    assert "POST /run/f" in body["message"]
    # The log has what the client does not, findable by the reference.
    record = next(r for r in caplog.records if body["ref"] in r.getMessage())
    assert record.exc_info[0] is RuntimeError


def test_sandbox_died_is_502_with_reason(client, manager):
    manager.error = SandboxDied(
        "sandbox of 'f' was killed", reason="out of memory"
    )
    body = assert_error(client.simulate_post("/run/f"), 502, "sandbox_died")
    assert body["reason"] == "out of memory"


def test_manager_shutting_down_is_503(client, manager):
    manager.error = ShuttingDown("worker is shutting down")
    assert_error(client.simulate_post("/run/f"), 503, "shutting_down")


def test_not_accepting_is_503_before_reading(app, manager):
    manager.accepting = False
    env = falcon.testing.create_environ("/run/f", method="POST")
    env["CONTENT_LENGTH"] = "2"
    env["wsgi.input"] = Stream(b"{}", readable=False)
    status, _, body = call_wsgi(app, env)
    assert status == 503
    assert body["error"] == "shutting_down"
    assert manager.calls == []


def test_timeout_is_504(client, manager):
    manager.error = HandlerTimeout("handler of 'f' ran longer than 30 s")
    assert_error(client.simulate_post("/run/f"), 504, "timeout")


# /status and /stats


def test_status_while_serving(client):
    result = client.simulate_get("/status")
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/json"
    assert result.json == {"state": "serving", "instances": 2}


def test_status_while_shutting_down(client, manager):
    manager.accepting = False
    assert_error(client.simulate_get("/status"), 503, "shutting_down")


def test_stats(client, manager):
    result = client.simulate_get("/stats")
    assert result.status_code == 200
    assert result.headers["content-type"] == "application/json"
    assert result.json == manager.stats()


# Access log


def test_access_log_one_line_per_request(client, manager, caplog):
    manager.result = b'{"r": 1}'
    with caplog.at_level(logging.INFO, logger="sockworker.access"):
        client.simulate_post("/run/f", body=b"{}")
        client.simulate_get("/missing")
    lines = [
        r.getMessage() for r in caplog.records if r.name == "sockworker.access"
    ]
    assert len(lines) == 2
    method, path, status, size, ms = lines[0].split()
    assert (method, path, status, size) == ("POST", "/run/f", "200", "8")
    assert ms.endswith("ms") and float(ms[:-2]) >= 0
    assert lines[1].startswith("GET /missing 404 ")
