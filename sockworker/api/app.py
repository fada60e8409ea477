"""The WSGI application: routes, error handlers and the access log."""

import time

import falcon

from sockworker.api.accesslog import LoggingSink
from sockworker.api.errors import register_error_handlers
from sockworker.api.resources import (
    RunResource,
    StatsResource,
    StatusResource,
)

__all__ = ["AccessLog", "create_app"]


class AccessLog:
    """Falcon middleware: one access line per request, recorded in
    process_response so that errors, unknown routes and 405s are logged
    in the same place as successes; `sink` decides how it is written."""

    def __init__(self, sink):
        self.sink = sink

    def process_request(self, req, resp):
        req.context.started = time.perf_counter()

    def process_response(self, req, resp, resource, req_succeeded):
        ms = (time.perf_counter() - req.context.started) * 1000.0
        data = resp.data
        self.sink.record(
            req.method,
            req.path,
            resp.status_code,
            len(data) if data is not None else 0,
            ms,
        )


def create_app(manager, config, access_sink=None):
    """Build the Falcon WSGI app serving `manager` under `config`.

    Routes: POST /runLambda/{name} and POST /run/{name} run a lambda; GET
    /status and GET /stats report. Every error is JSON {"error": kind,
    "message": ...}.
    """
    app = falcon.App(middleware=[AccessLog(access_sink or LoggingSink())])

    run = RunResource(manager, config.max_body_bytes)
    app.add_route("/runLambda/{name}", run)
    app.add_route("/run/{name}", run)
    app.add_route("/status", StatusResource(manager))
    app.add_route("/stats", StatsResource(manager))

    register_error_handlers(app)
    return app
