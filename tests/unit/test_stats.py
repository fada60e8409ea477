import json
import threading
import time

import pytest

from sockworker.stats import OTHER, Stats


def test_empty_snapshot():
    snap = Stats().snapshot()
    assert snap["lambdas"] == {}
    assert snap["totals"]["requests"] == 0
    assert snap["totals"]["latency_ms"]["warm"] == {
        "samples": 0,
        "p50": None,
        "p90": None,
        "p99": None,
    }
    json.dumps(snap)


def test_counts_per_lambda_and_totals():
    stats = Stats()
    stats.record("a", cold=True, seconds=0.010, status=200)
    stats.record("a", cold=False, seconds=0.001, status=200)
    stats.record("a", cold=False, seconds=0.002, status=500)
    stats.record("b", cold=False, seconds=0.001, status=404)
    stats.record("b", cold=False, seconds=0.001, status=399)

    snap = stats.snapshot()
    a = snap["lambdas"]["a"]
    assert (a["requests"], a["errors"], a["cold"], a["warm"]) == (3, 1, 1, 2)
    b = snap["lambdas"]["b"]
    assert (b["requests"], b["errors"], b["cold"], b["warm"]) == (2, 1, 0, 2)
    t = snap["totals"]
    assert (t["requests"], t["errors"], t["cold"], t["warm"]) == (5, 2, 1, 4)


def test_cold_and_warm_percentiles_are_separate():
    stats = Stats()
    for ms in range(1, 101):  # warm: 1..100 ms
        stats.record("f", cold=False, seconds=ms / 1000, status=200)
    for ms in (200, 300):
        stats.record("f", cold=True, seconds=ms / 1000, status=200)

    latency = stats.snapshot()["lambdas"]["f"]["latency_ms"]
    assert latency["warm"] == {
        "samples": 100,
        "p50": 50.0,
        "p90": 90.0,
        "p99": 99.0,
    }
    assert latency["cold"] == {
        "samples": 2,
        "p50": 200.0,
        "p90": 300.0,
        "p99": 300.0,
    }


def test_errors_are_counted_but_not_in_latency():
    stats = Stats()
    stats.record("f", cold=False, seconds=5.0, status=504)
    stats.record("f", cold=False, seconds=0.001, status=200)
    warm = stats.snapshot()["lambdas"]["f"]["latency_ms"]["warm"]
    assert warm["samples"] == 1
    assert warm["p99"] == 1.0


def test_window_keeps_only_recent_samples():
    stats = Stats(window=10)
    for _ in range(100):
        stats.record("f", cold=False, seconds=1.0, status=200)
    for _ in range(10):
        stats.record("f", cold=False, seconds=0.002, status=200)
    snap = stats.snapshot()
    warm = snap["lambdas"]["f"]["latency_ms"]["warm"]
    assert warm["samples"] == 10
    assert warm["p99"] == 2.0
    assert snap["lambdas"]["f"]["requests"] == 110
    assert snap["window"] == 10


def test_totals_percentiles_merge_lambdas():
    stats = Stats()
    stats.record("a", cold=False, seconds=0.001, status=200)
    stats.record("b", cold=False, seconds=0.003, status=200)
    warm = stats.snapshot()["totals"]["latency_ms"]["warm"]
    assert (warm["samples"], warm["p50"], warm["p99"]) == (2, 1.0, 3.0)


def test_distinct_names_are_bounded():
    stats = Stats(max_lambdas=3)
    for i in range(10):
        stats.record(f"n{i}", cold=False, seconds=0.001, status=404)
    lambdas = stats.snapshot()["lambdas"]
    assert set(lambdas) == {"n0", "n1", "n2", OTHER}
    assert lambdas[OTHER]["requests"] == 7
    # A name seen before the bound was reached keeps its own entry.
    stats.record("n1", cold=False, seconds=0.001, status=200)
    assert stats.snapshot()["lambdas"]["n1"]["requests"] == 2


def test_bad_window():
    with pytest.raises(ValueError, match="window must be >= 1"):
        Stats(window=0)


def test_concurrent_records_lose_nothing():
    stats = Stats()
    threads_n, per_thread = 8, 5000
    start = threading.Barrier(threads_n)

    def worker(i):
        start.wait()
        for j in range(per_thread):
            stats.record(
                f"f{i % 2}", cold=j % 10 == 0, seconds=0.001, status=200
            )

    threads = [
        threading.Thread(target=worker, args=(i,)) for i in range(threads_n)
    ]
    for t in threads:
        t.start()
    # Snapshots while recording must not fail or see torn counts.
    while any(t.is_alive() for t in threads):
        snap = stats.snapshot()
        for entry in snap["lambdas"].values():
            assert entry["cold"] + entry["warm"] == entry["requests"]
    for t in threads:
        t.join()

    totals = stats.snapshot()["totals"]
    assert totals["requests"] == threads_n * per_thread
    assert totals["cold"] == threads_n * per_thread // 10


def test_record_is_cheap():
    # record runs on every request: it must stay O(1) and not grow with
    # the number of samples already held.
    stats = Stats()
    n = 20000
    begin = time.perf_counter()
    for _ in range(n):
        stats.record("f", cold=False, seconds=0.001, status=200)
    per_call_us = (time.perf_counter() - begin) / n * 1e6
    assert per_call_us < 20, f"record took {per_call_us:.1f} us per call"
