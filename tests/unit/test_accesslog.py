"""The buffered access-log sink writes whole lines, in the log's layout,
through the handler it was given, and loses none at close."""

import io
import logging
import os
import re
import threading

from sockworker.api.accesslog import (
    BufferedSink,
    LoggingSink,
    buffered_sink_for_root_logger,
    unbuffer_root_logger,
)
from sockworker.cli import LOG_FORMAT

LINE = re.compile(
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} INFO sockworker.access "
    r"\[(\d+)\] (POST|GET) (\S+) (\d{3}) (\d+) (\d+\.\d\d)ms$"
)


def test_buffered_sink_writes_every_line_on_close():
    stream = io.StringIO()
    sink = BufferedSink(logging.StreamHandler(stream), interval=60)
    for i in range(500):
        sink.record("POST", f"/run/l{i}", 200, i, 0.5)
    sink.close()

    lines = stream.getvalue().splitlines()
    assert len(lines) == 500
    for i, line in enumerate(lines):
        match = LINE.match(line)
        assert match, line
        assert match.group(1) == str(os.getpid())
        assert match.group(3) == f"/run/l{i}"
        assert match.group(5) == str(i)


def test_buffered_sink_flushes_on_its_interval():
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    written = threading.Event()
    original = handler.flush

    def flush():
        original()
        written.set()

    handler.flush = flush
    sink = BufferedSink(handler, interval=0.01)
    try:
        sink.record("GET", "/status", 200, 10, 0.1)
        assert written.wait(5)
        assert "GET /status 200 10 0.10ms" in stream.getvalue()
    finally:
        sink.close()


def test_concurrent_records_are_not_lost():
    stream = io.StringIO()
    sink = BufferedSink(logging.StreamHandler(stream), interval=0.001)

    def hammer(n):
        for i in range(1000):
            sink.record("POST", f"/run/t{n}", 200, i, 0.1)

    threads = [threading.Thread(target=hammer, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sink.close()
    assert len(stream.getvalue().splitlines()) == 8000


def test_logging_sink_uses_the_access_logger(caplog):
    with caplog.at_level(logging.INFO, logger="sockworker.access"):
        LoggingSink().record("POST", "/run/x", 404, 7, 1.25)
    assert [r.getMessage() for r in caplog.records] == [
        "POST /run/x 404 7 1.25ms"
    ]


def buffered_root(stream, monkeypatch):
    """The root logger as the worker sets it up (a stream handler in the
    log's layout, INFO), then buffered; restored after the test."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", [handler])
    monkeypatch.setattr(root, "level", logging.INFO)
    sink = buffered_sink_for_root_logger()
    assert isinstance(sink, BufferedSink)
    return sink


def test_lines_below_warning_wait_for_the_writer(monkeypatch):
    stream = io.StringIO()
    sink = buffered_root(stream, monkeypatch)
    sink.stopped.set()  # no writes by the thread: only explicit ones
    sink.writer.join()
    log = logging.getLogger("sockworker.test")

    log.info("sandbox %s created", "sb-1")
    sink.record("POST", "/run/a", 200, 4, 1.0)
    log.debug("not at this level")
    assert stream.getvalue() == ""

    sink.flush()
    lines = stream.getvalue().splitlines()
    assert lines[0].endswith(
        f"INFO sockworker.test [{os.getpid()}] sandbox sb-1 created"
    )
    assert LINE.match(lines[1]) and len(lines) == 2


def test_warning_is_written_at_once_after_the_backlog(monkeypatch):
    stream = io.StringIO()
    sink = buffered_root(stream, monkeypatch)
    sink.stopped.set()
    sink.writer.join()
    log = logging.getLogger("sockworker.test")

    log.info("first")
    sink.record("GET", "/status", 200, 10, 0.1)
    log.warning("then %s", "this")
    lines = stream.getvalue().splitlines()
    assert [line.split(" ", 3)[3] for line in lines] == [
        "sockworker.test [%d] first" % os.getpid(),
        "sockworker.access [%d] GET /status 200 10 0.10ms" % os.getpid(),
        "sockworker.test [%d] then this" % os.getpid(),
    ]

    unbuffer_root_logger(sink)
    assert logging.getLogger().handlers == [sink.handler]
    log.info("direct")
    assert stream.getvalue().endswith("direct\n")


def test_forked_child_does_not_write_the_parents_backlog(monkeypatch):
    stream = io.StringIO()
    sink = buffered_root(stream, monkeypatch)
    sink.stopped.set()
    sink.writer.join()
    logging.getLogger("sockworker.test").info("the parent's")

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.write(write_end, str(len(sink.pending)).encode())
        os._exit(0)
    os.close(write_end)
    child_backlog = os.read(read_end, 16)
    os.close(read_end)
    os.waitpid(pid, 0)

    assert child_backlog == b"0"
    assert len(sink.pending) == 1
