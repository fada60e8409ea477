"""The WSGI application: routes, error handlers and the access log."""

import logging
import time

import falcon

from sockworker.api.errors import register_error_handlers
from sockworker.api.resources import (
    RunResource,
    StatsResource,
    StatusResource,
)

__all__ = ["AccessLog", "create_app"]

access_log = logging.getLogger("sockworker.access")


class AccessLog:
    """Falcon middleware: one log line per request, written in
    process_response so that errors, unknown routes and 405s are logged
    in the same place as successes.

    PERF: a middleware rather than a WSGI wrapper because Falcon already
    knows the status and body by then; the cost is two method calls and a
    clock read per request, and the line is formatted only when the logger
    is enabled for INFO.
    """

    def process_request(self, req, resp):
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded):
        if not access_log.isEnabledFor(logging.INFO):
            return
        ms = (time.perf_counter() - req.context.started) * 1000.0
        data = resp.data
        access_log.info(
            "%s %s %d %d %.2fms",
            req.method,
            req.path,
            resp.status_code,
            len(data) if data is not None else 0,
            ms,
        )


def create_app(manager, config):
    """Build the Falcon WSGI app serving `manager` under `config`.

    Routes: POST /runLambda/{name} and POST /run/{name} run a lambda; GET
    /status and GET /stats report. Every error is JSON {"error": kind,
    "message": ...}.
    """
    app = falcon.App(middleware=[AccessLog()])

    run = RunResource(manager, config.max_body_bytes)
    app.add_route("/runLambda/{name}", run)
    app.add_route("/run/{name}", run)
    app.add_route("/status", StatusResource(manager))
    app.add_route("/stats", StatsResource(manager))

    register_error_handlers(app)
    return app
