"""The buffered access-log sink writes whole lines, in the log's layout,
through the handler it was given, and loses none at close."""

import io
import logging
import os
import re
import threading

from sockworker.api.accesslog import BufferedSink, LoggingSink

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
