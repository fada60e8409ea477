"""Errors that reach a caller of the worker, each with its HTTP meaning.

Every layer below the API raises one of these (or lets OSError through with
context added); the API maps `status` and `kind` to the JSON error body of
the HTTP contract. `kind` is a short stable word; the message says what and
why.
"""


class WorkerError(Exception):
    """Base class: `status` is the HTTP status, `kind` the error word."""

    status = 500
    kind = "internal"

    def __init__(self, message, **details):
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self):
        body = {"error": self.kind, "message": self.message}
        body.update(self.details)
        return body


class BadRequest(WorkerError):
    status = 400
    kind = "bad_request"


class LambdaNotFound(WorkerError):
    status = 404
    kind = "not_found"


class PayloadTooLarge(WorkerError):
    status = 413
    kind = "payload_too_large"


class Overloaded(WorkerError):
    status = 429
    kind = "overloaded"


class HandlerError(WorkerError):
    """The handler raised; details carry its traceback."""

    status = 500
    kind = "handler_error"


class LambdaInvalid(WorkerError):
    """The lambda's code exists but cannot be used (unsafe archive, no
    handler, bad requirements)."""

    status = 500
    kind = "lambda_invalid"


class SandboxDied(WorkerError):
    """The sandbox ended mid-request; details carry the reason
    ("out of memory", "crashed", "killed")."""

    status = 502
    kind = "sandbox_died"


class RegistryUnavailable(WorkerError):
    """The registry could not be reached or answered with an error."""

    status = 502
    kind = "registry_unavailable"


class CodeCacheFull(WorkerError):
    """The code cache has no room left to unpack a lambda, even after the
    versions no instance uses were removed."""

    status = 507
    kind = "code_cache_full"


class ShuttingDown(WorkerError):
    status = 503
    kind = "shutting_down"


class HandlerTimeout(WorkerError):
    status = 504
    kind = "timeout"
