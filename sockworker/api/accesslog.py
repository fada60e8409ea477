"""Where access lines go: straight to the logging module, or through a
buffer that a background thread formats and writes in batches.

PERF: a logging call per request (a LogRecord, a formatted time, a lock
and a flush) took a quarter of the worker's interpreter time on the warm
path. The buffered sink costs the request thread one deque append; its
thread writes the lines, in the log's usual layout, through the log
handler's own stream and lock, so they interleave whole with every other
log line. A line reaches the log at most `interval` seconds late.
"""

import collections
import logging
import os
import threading
import time

access_log = logging.getLogger("sockworker.access")


class LoggingSink:
    """One logging call per request; used where no handler is known."""

    def record(self, method, path, status, size, ms):
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(
                "%s %s %d %d %.2fms", method, path, status, size, ms
            )

    def close(self):
        pass


class BufferedSink:
    """Collects access lines and writes them every `interval` seconds
    through `handler` (a logging.StreamHandler)."""

    def __init__(self, handler, interval=0.2):
        self.handler = handler
        self.interval = interval
        self.pending = collections.deque()
        self.pid = os.getpid()
        self.stopped = threading.Event()
        self.writer = threading.Thread(
            target=self.run, name="sockworker-access-log", daemon=True
        )
        self.writer.start()

    def record(self, method, path, status, size, ms):
        self.pending.append((time.time(), method, path, status, size, ms))

    def run(self):
        while not self.stopped.wait(self.interval):
            self.flush()
        self.flush()

    def flush(self):
        lines = []
        stamp_second, stamp = None, ""
        while self.pending:
            when, method, path, status, size, ms = self.pending.popleft()
            second = int(when)
            if second != stamp_second:
                stamp_second = second
                stamp = time.strftime(
                    "%Y-%m-%d %H:%M:%S", time.localtime(second)
                )
            millis = int((when - second) * 1000)
            lines.append(
                f"{stamp},{millis:03d} INFO sockworker.access [{self.pid}] "
                f"{method} {path} {status} {size} {ms:.2f}ms\n"
            )
        if lines:
            self.write("".join(lines))

    def write(self, text):
        handler = self.handler
        handler.acquire()
        try:
            handler.stream.write(text)
            handler.flush()
        except (OSError, ValueError):
            handler.handleError(None)
        finally:
            handler.release()

    def close(self):
        self.stopped.set()
        self.writer.join()


def buffered_sink_for_root_logger():
    """A BufferedSink over the root logger's stream handler when access
    lines would reach it at INFO, else a LoggingSink."""
    if not access_log.isEnabledFor(logging.INFO):
        return LoggingSink()
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            return BufferedSink(handler)
    return LoggingSink()
