"""Falcon resources: run a lambda, report status and statistics.

The resources translate HTTP into calls on the manager and back; they hold
no state of their own. The manager's interface, as used here:

    manager.run(name, body) -> (result JSON bytes, cold)   raises WorkerError
    manager.status() -> dict
    manager.stats() -> dict
    manager.accepting -> bool    False once the worker refuses requests
"""

import json

import falcon

from sockworker.errors import BadRequest, PayloadTooLarge, ShuttingDown

__all__ = [
    "RunResource",
    "StatsResource",
    "StatusResource",
    "read_body",
    "check_json",
]

JSON = falcon.MEDIA_JSON
EMPTY_EVENT = b"{}"
COLD_HEADER = "X-Sockworker-Cold"


class RunResource:
    """POST /run/{name} and POST /runLambda/{name}."""

    def __init__(self, manager, max_body_bytes):
        self._manager = manager
        self._max_body_bytes = max_body_bytes

    # PERF: this is the hot path of every request. It is kept flat on
    # purpose: one attribute check, one read, one parse to validate, one
    # call into the manager, and the result bytes go out as they came
    # back (no decode, no re-encode, no resp.media machinery).
    def on_post(self, req, resp, name):
        if not self._manager.accepting:
            raise ShuttingDown(
                f"worker is shutting down; lambda {name!r} was not run"
            )

        body = read_body(req, self._max_body_bytes) or EMPTY_EVENT
        check_json(body)

        result, cold = self._manager.run(name, body)

        resp.content_type = JSON
        resp.data = result
        # Lets a benchmark tell cold starts from warm ones without
        # asking /stats.
        resp.set_header(COLD_HEADER, "true" if cold else "false")


class StatusResource:
    """GET /status: 200 while serving, 503 once shutdown has begun."""

    def __init__(self, manager):
        self._manager = manager

    def on_get(self, req, resp):
        if not self._manager.accepting:
            raise ShuttingDown("worker is shutting down")
        resp.content_type = JSON
        resp.data = json.dumps(self._manager.status()).encode()


class StatsResource:
    """GET /stats: the manager's statistics as JSON."""

    def __init__(self, manager):
        self._manager = manager

    def on_get(self, req, resp):
        resp.content_type = JSON
        resp.data = json.dumps(self._manager.stats()).encode()


def read_body(req, limit):
    """The request body, at most `limit` bytes, else PayloadTooLarge.

    A Content-Length above the limit is refused before reading anything.
    A chunked body has no length up front: read limit + 1 bytes at most,
    which is enough to know it is too large.
    """
    length = req.content_length
    if length is not None:
        if length > limit:
            raise PayloadTooLarge(
                f"request body of {length} bytes is larger than the limit "
                f"of {limit} bytes (max_body_bytes)"
            )
        body = _read_up_to(req.stream, length)
        if len(body) < length:
            raise BadRequest(
                f"request body ended after {len(body)} of the {length} "
                "bytes announced by Content-Length"
            )
        return body

    # With neither Content-Length nor chunked encoding there is no body;
    # reading wsgi.input then could block on some servers.
    encoding = req.get_header("Transfer-Encoding") or ""
    if "chunked" not in encoding.lower():
        return b""
    body = _read_up_to(req.stream, limit + 1)
    if len(body) > limit:
        raise PayloadTooLarge(
            f"chunked request body is larger than the limit of {limit} "
            "bytes (max_body_bytes)"
        )
    return body


def _read_up_to(stream, size):
    """Read until `size` bytes or end of input; servers may return short
    reads."""
    data = stream.read(size)
    if len(data) == size or not data:
        return data
    parts = [data]
    remaining = size - len(data)
    while remaining > 0:
        chunk = stream.read(remaining)
        if not chunk:
            break
        parts.append(chunk)
        remaining -= len(chunk)
    return b"".join(parts)


def check_json(body):
    """Raise BadRequest unless `body` is UTF-8 encoded JSON."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise BadRequest(
            f"request body is not UTF-8: {e.reason} at byte {e.start}"
        ) from e
    try:
        json.loads(text)
    except json.JSONDecodeError as e:
        # str(e) carries the parser's message and the position:
        # "Expecting value: line 1 column 5 (char 4)".
        raise BadRequest(f"request body is not valid JSON: {e}") from e
    except RecursionError as e:
        raise BadRequest("request body is JSON nested too deeply") from e
