"""Turning every failure into the JSON error body of the HTTP contract.

Three handlers cover everything Falcon can see, chosen by Falcon from the
exception's class (most specific first):

- WorkerError: raised by the manager and by our resources; its `status`
  and `to_dict()` are the response as they are.
- falcon.HTTPError: Falcon's own errors (no route, wrong method, a bad
  Content-Length header); mapped to the same {"error", "message"} shape.
- Exception: a bug. The client gets 500 "internal" with a reference; the
  traceback goes to the log only.
"""

import json
import logging
import uuid

import falcon

from sockworker.errors import WorkerError

__all__ = ["error_body", "register_error_handlers"]

log = logging.getLogger(__name__)

JSON = falcon.MEDIA_JSON

# Kinds for Falcon's own errors, matching the kinds of sockworker.errors
# where the meaning is the same.
_FALCON_KINDS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    429: "overloaded",
    503: "shutting_down",
    504: "timeout",
}


def error_body(kind, message, **details):
    """The JSON bytes of an error response."""
    body = {"error": kind, "message": message}
    body.update(details)
    return _dumps(body)


def _dumps(body):
    # default=str: a detail that is not JSON (an exception, a path object)
    # must not turn an error response into a second, unrelated error.
    return json.dumps(body, default=str).encode()


def _set_error(resp, status, data):
    resp.status = status
    resp.content_type = JSON
    resp.data = data


def handle_worker_error(req, resp, ex, params):
    log.debug("%s %s failed: %s %s", req.method, req.path, ex.kind, ex.message)
    _set_error(resp, ex.status, _dumps(ex.to_dict()))


def handle_http_error(req, resp, ex, params):
    status = ex.status_code
    kind = _FALCON_KINDS.get(status) or _kind_from_title(ex.title, status)
    message = ex.description or _falcon_message(req, ex, status)
    if ex.headers:
        # Keeps Allow on 405 and whatever else Falcon attached.
        resp.set_headers(ex.headers)
    _set_error(resp, status, error_body(kind, message))


def _kind_from_title(title, status):
    if not title:
        return f"http_{status}"
    return title.lower().replace(" ", "_").replace("-", "_")


def _falcon_message(req, ex, status):
    if status == 404:
        return (
            f"no route for {req.method} {req.path}; lambdas run at "
            "POST /run/<name> or POST /runLambda/<name>"
        )
    if status == 405:
        allowed = (ex.headers or {}).get("Allow", "")
        return (
            f"method {req.method} is not allowed on {req.path}; "
            f"allowed: {allowed}"
        )
    return f"{ex.title} for {req.method} {req.path}"


def handle_unexpected(req, resp, ex, params):
    # The traceback may name files, hosts or secrets of the worker: it
    # goes to the log, and the client gets a reference to find it there.
    ref = uuid.uuid4().hex[:12]
    log.error(
        "internal error %s in %s %s",
        ref,
        req.method,
        req.path,
        exc_info=ex,
    )
    message = (
        f"internal error while handling {req.method} {req.path} "
        f"(ref {ref}); the worker log has the details"
    )
    _set_error(resp, 500, error_body("internal", message, ref=ref))


def register_error_handlers(app):
    """Install the three handlers; Falcon picks the most specific."""
    app.add_error_handler(Exception, handle_unexpected)
    app.add_error_handler(falcon.HTTPError, handle_http_error)
    app.add_error_handler(WorkerError, handle_worker_error)
