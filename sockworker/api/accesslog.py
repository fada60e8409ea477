"""Where access lines go: straight to the logging module, or through a
buffer that a background thread formats and writes in batches; and the
same buffer for the worker's other log lines below WARNING.

PERF: a logging call per request (a LogRecord, a formatted time, a lock
and a flush) took a quarter of the worker's interpreter time on the warm
path, and the three lifecycle lines of a cold start cost it about 0.2 ms
when written at once. The buffered sink costs the request thread one
deque append; its thread writes the lines, in the log's usual layout,
through the log handler's own stream and lock, so they interleave whole
with every other log line. A line reaches the log at most `interval`
seconds late; a WARNING or worse is written at once, after every line
buffered before it.
"""

import collections
import logging
import os
import threading
import time
import weakref

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
        # Access lines as tuples, other log lines as LogRecords, in the
        # order they came.
        self.pending = collections.deque()
        self.pid = os.getpid()
        self.flush_lock = threading.Lock()
        self.stopped = threading.Event()
        _sinks.add(self)
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

    def record_log(self, record):
        self.pending.append(record)

    def flush(self):
        # One flusher at a time: the writer thread, or a thread logging a
        # warning; two could otherwise write their batches out of order.
        with self.flush_lock:
            self.flush_locked()

    def flush_locked(self):
        lines = []
        stamp_second, stamp = None, ""
        while self.pending:
            item = self.pending.popleft()
            if isinstance(item, logging.LogRecord):
                lines.append(self.format_record(item))
                continue
            when, method, path, status, size, ms = item
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

    def format_record(self, record):
        try:
            return self.handler.format(record) + "\n"
        except Exception:
            return f"(unformattable log record {record.msg!r})\n"

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


class BufferingHandler(logging.Handler):
    """A root logger handler that hands records below WARNING to a
    BufferedSink and writes the others at once, after the sink's
    backlog, through the sink's handler."""

    def __init__(self, sink):
        super().__init__()
        self.sink = sink

    def emit(self, record):
        if record.levelno < logging.WARNING:
            self.sink.record_log(record)
            return
        self.sink.flush()
        self.sink.handler.handle(record)

    def flush(self):
        self.sink.flush()


# A forked child has a copy of each sink's backlog, which the parent
# writes: a child that logged would write it twice.
_sinks = weakref.WeakSet()


def _forget_backlogs():
    for sink in list(_sinks):
        sink.pending.clear()


os.register_at_fork(after_in_child=_forget_backlogs)


def buffered_sink_for_root_logger():
    """A BufferedSink over the root logger's stream handler when access
    lines would reach it at INFO, with the root logger's other lines
    below WARNING buffered in it too; else a LoggingSink."""
    if not access_log.isEnabledFor(logging.INFO):
        return LoggingSink()
    root = logging.getLogger()
    for index, handler in enumerate(root.handlers):
        if isinstance(handler, logging.StreamHandler):
            sink = BufferedSink(handler)
            root.handlers[index] = BufferingHandler(sink)
            return sink
    return LoggingSink()


def unbuffer_root_logger(sink):
    """Undo buffered_sink_for_root_logger: lines logged from now on are
    written at once. Call before closing the sink."""
    root = logging.getLogger()
    for index, handler in enumerate(root.handlers):
        if isinstance(handler, BufferingHandler) and handler.sink is sink:
            root.handlers[index] = sink.handler
