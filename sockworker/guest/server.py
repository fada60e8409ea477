"""The handler server that runs inside a sandbox.

Started by the container as the image's `python3 -I -S server.py --code
DIR --listen-fd N`, with the listening Unix socket already open as fd N
(the worker bound it on the host side, so no host path is visible in
here). It imports `f` from the code directory once, then answers requests
one at a time: each request is the event JSON, each reply the JSON of
f(event) or a structured error.

Standard library only: it runs under the image's interpreter, not the
worker's. The handler's own stdout and stderr are fds 1 and 2, which the
worker pointed at the sandbox's log file, so nothing a handler prints can
corrupt the protocol.

PERF: every import here is paid on each fresh start, so the server uses
the C modules _socket and _json directly (see codec.py) and imports
traceback only when a handler fails.
"""

import _socket
import sys

if __package__:
    from . import codec, protocol
else:
    # -I leaves the script's own directory off sys.path.
    sys.path.insert(0, __file__.rpartition("/")[0])
    import codec
    import protocol


PACKAGES_DIR = "/opt/sockworker/packages"


class Handler:
    """The lambda's entry point, or the reason it could not be loaded."""

    def __init__(self, code_dir, module_name="f", function_name="f"):
        self.function = None
        self.load_error = None
        sys.path.insert(0, code_dir)
        # The lambda's declared packages, merged by the overlay.
        sys.path.insert(1, PACKAGES_DIR)
        try:
            module = __import__(module_name)
            self.function = getattr(module, function_name)
        except BaseException as exc:
            self.load_error = error_reply(
                f"loading handler {module_name}.{function_name} from "
                f"{code_dir} failed: {type(exc).__name__}: {exc}",
                format_traceback(),
            )

    def call(self, body):
        """Run the handler on one request body; returns a reply frame."""
        if self.load_error is not None:
            return self.load_error
        try:
            event = codec.loads(body) if body else {}
        except ValueError as exc:
            return error_reply(
                f"event is not JSON: {exc}", None, "bad_request"
            )
        try:
            result = self.function(event)
        except BaseException as exc:
            return error_reply(
                f"handler raised {type(exc).__name__}: {exc}",
                format_traceback(),
            )
        finally:
            flush_output()
        try:
            payload = codec.dumps(result).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            return error_reply(f"handler result is not JSON: {exc}", None)
        return protocol.encode_reply(protocol.REPLY_OK, payload)


def format_traceback():
    import traceback

    return traceback.format_exc()


def error_reply(message, trace, kind="handler_error"):
    body = {"error": kind, "message": message}
    if trace:
        body["traceback"] = trace
    return protocol.encode_reply(
        protocol.REPLY_ERROR, codec.dumps(body).encode()
    )


def flush_output():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass


def serve_connection(conn, handler):
    """Answer requests on conn until the peer closes it."""
    try:
        while True:
            body = protocol.recv_request(conn)
            if body is None:
                return
            conn.sendall(handler.call(body))
    except (OSError, protocol.ProtocolError):
        return


def serve(listener, handler):
    """Serve connections one after another.

    NOTE: one connection at a time is enough: the worker keeps a single
    connection per sandbox and sends it one request at a time; a second
    connection waits in the backlog until the first closes.
    """
    while True:
        fd, _ = listener._accept()
        conn = _socket.socket(fileno=fd)
        try:
            serve_connection(conn, handler)
        finally:
            conn.close()


def parse_args(argv):
    """--code DIR and --listen-fd N (argparse costs a fresh start ~2 ms)."""
    options = {"--code": "/handler", "--listen-fd": "3"}
    pairs = iter(argv)
    for name in pairs:
        if name not in options:
            sys.exit(f"server.py: unknown argument {name!r}")
        value = next(pairs, None)
        if value is None:
            sys.exit(f"server.py: {name} needs a value")
        options[name] = value
    return options["--code"], int(options["--listen-fd"])


def main(argv=None):
    code_dir, listen_fd = parse_args(sys.argv[1:] if argv is None else argv)
    listener = _socket.socket(fileno=listen_fd)
    handler = Handler(code_dir)
    serve(listener, handler)


if __name__ == "__main__":
    main()
