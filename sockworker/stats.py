"""Request counters and latency percentiles per lambda.

`Stats.record` runs once per request on the hot path, so it does only O(1)
work: a dictionary lookup, three integer additions and a deque append under
a per-lambda lock. Sorting for percentiles happens in `snapshot`, which
runs when someone asks for /stats.
"""

import collections
import threading

__all__ = ["Stats"]

# Requests for names beyond this many distinct lambdas are counted under
# OTHER, so that a client sending random names cannot grow memory.
DEFAULT_MAX_LAMBDAS = 4096
OTHER = "(other)"
PERCENTILES = (50, 90, 99)


class _LambdaStats:
    """Counters and latency windows of one lambda. Guarded by `lock`."""

    __slots__ = ("lock", "requests", "errors", "cold", "warm", "latency")

    def __init__(self, window):
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.cold = 0
        self.warm = 0
        # Seconds per successful request, kept separately for cold and warm
        # starts: mixed together, rare cold starts would hide in the p99.
        self.latency = {
            True: collections.deque(maxlen=window),
            False: collections.deque(maxlen=window),
        }

    def copy(self):
        with self.lock:
            return (
                self.requests,
                self.errors,
                self.cold,
                self.warm,
                list(self.latency[True]),
                list(self.latency[False]),
            )


class Stats:
    """Thread-safe request statistics.

    Counts every request per lambda (requests, errors with status >= 400,
    cold and warm starts) and keeps the latencies of the last `window`
    successful requests of each kind (cold, warm) per lambda. Percentiles
    are computed by `snapshot()`, never when recording.
    """

    def __init__(self, window=1024, max_lambdas=DEFAULT_MAX_LAMBDAS):
        if window < 1:
            raise ValueError(f"Stats window must be >= 1, got {window}")
        self._window = window
        self._max_lambdas = max_lambdas
        self._lambdas = {}
        self._lock = threading.Lock()

    def record(self, name, cold, seconds, status):
        """Count one finished request for lambda `name`."""
        entry = self._lambdas.get(name)
        if entry is None:
            entry = self._add(name)

        with entry.lock:
            entry.requests += 1
            if cold:
                entry.cold += 1
            else:
                entry.warm += 1
            if status >= 400:
                entry.errors += 1
            else:
                # An error's latency says how fast it failed, not how long
                # the lambda takes; keep it out of the percentiles.
                entry.latency[bool(cold)].append(seconds)

    def _add(self, name):
        # Only the first request of a lambda takes the global lock.
        with self._lock:
            entry = self._lambdas.get(name)
            if entry is not None:
                return entry
            if len(self._lambdas) >= self._max_lambdas:
                name = OTHER
                entry = self._lambdas.get(name)
                if entry is not None:
                    return entry
            entry = _LambdaStats(self._window)
            self._lambdas[name] = entry
            return entry

    def snapshot(self):
        """A JSON-able dict: per lambda and in total, the counts and the
        p50/p90/p99 latency in ms of cold and of warm requests (None when
        there is no sample)."""
        with self._lock:
            entries = list(self._lambdas.items())

        lambdas = {}
        totals = [0, 0, 0, 0]
        all_cold = []
        all_warm = []
        for name, entry in entries:
            requests, errors, cold, warm, cold_s, warm_s = entry.copy()
            lambdas[name] = _summary(
                requests, errors, cold, warm, cold_s, warm_s
            )
            totals[0] += requests
            totals[1] += errors
            totals[2] += cold
            totals[3] += warm
            all_cold.extend(cold_s)
            all_warm.extend(warm_s)

        return {
            "lambdas": lambdas,
            "totals": _summary(*totals, all_cold, all_warm),
            "window": self._window,
        }


def _summary(requests, errors, cold, warm, cold_samples, warm_samples):
    return {
        "requests": requests,
        "errors": errors,
        "cold": cold,
        "warm": warm,
        "latency_ms": {
            "cold": _percentiles_ms(cold_samples),
            "warm": _percentiles_ms(warm_samples),
        },
    }


def _percentiles_ms(samples):
    """Nearest-rank percentiles of `samples` (seconds) in milliseconds."""
    result = {"samples": len(samples)}
    if not samples:
        result.update({f"p{p}": None for p in PERCENTILES})
        return result
    ordered = sorted(samples)
    n = len(ordered)
    for p in PERCENTILES:
        # Nearest rank: the smallest sample with at least p% of samples at
        # or below it.
        rank = max(1, -(-p * n // 100))
        result[f"p{p}"] = round(ordered[rank - 1] * 1000.0, 3)
    return result
