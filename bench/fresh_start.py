"""Benchmark: create a fresh SOCK container and get its first response.

Each run creates a new container for a no-op handler, sends one request,
and destroys it, with a pause between runs so that every start is cold
(idle CPUs, no warm caches of the previous run's processes). The same run
measures `crun run` and `runc run` of `python3 -c pass` on the same base
image, so the ratio is not skewed by a noisy machine.

    .venv/bin/python bench/fresh_start.py --runs 50 --pause 0.2
"""

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.dirname(__file__))

from peers import cold_start_parser, measure  # noqa: E402

from sockworker.image import BaseImage  # noqa: E402
from sockworker.sandbox.backend import SockBackend  # noqa: E402
from sockworker.sandbox.cgroups import Limits  # noqa: E402

NOOP = "def f(event):\n    return None\n"


def make_code_layer(root):
    handler = os.path.join(root, "handler")
    os.makedirs(handler)
    with open(os.path.join(handler, "f.py"), "w") as f:
        f.write(NOOP)
    return root


def measure_sock(image, runs, pause, network):
    """Seconds from create() to the first reply, one fresh container per
    run; destruction is outside the timed part."""
    with tempfile.TemporaryDirectory(prefix="sockworker-bench-") as tmp:
        state = os.path.join(tmp, "state")
        code = make_code_layer(os.path.join(tmp, "code"))
        backend = SockBackend(
            state,
            image,
            Limits(memory_bytes=256 << 20, pids=64),
            network=network,
        )
        backend.start()
        times = []
        try:
            for _ in range(runs):
                time.sleep(pause)
                started = time.perf_counter()
                container = backend.create(code)
                container.request(b"{}", 10)
                times.append(time.perf_counter() - started)
                container.destroy()
        finally:
            backend.close()
        return times


def summary(times):
    ordered = sorted(times)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    return {
        "runs": len(times),
        "median_ms": round(statistics.median(times) * 1e3, 2),
        "p95_ms": round(p95 * 1e3, 2),
    }


def parse_args(argv):
    parser = cold_start_parser(__doc__)
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    image = BaseImage(args.images_dir).ensure(progress=True)
    results = {}
    for name, network in (("sock", "none"), ("sock (host net)", "host")):
        results[name] = summary(
            measure_sock(image, args.runs, args.pause, network)
        )
    for peer in ("crun", "runc"):
        measured = measure(peer, image, args.runs, args.pause)
        results[f"{peer} run"] = (
            summary(measured)
            if isinstance(measured, list)
            else {"skipped": measured}
        )
    print_table(results)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def print_table(results):
    crun = results.get("crun run", {}).get("median_ms")
    print(f"{'runtime':<18} {'median ms':>10} {'p95 ms':>8} {'vs crun':>8}")
    for name, row in results.items():
        if "skipped" in row:
            print(f"{name:<18} skipped: {row['skipped']}")
            continue
        ratio = f"{crun / row['median_ms']:.2f}x" if crun else "-"
        print(
            f"{name:<18} {row['median_ms']:>10.2f} {row['p95_ms']:>8.2f} "
            f"{ratio:>8}"
        )


if __name__ == "__main__":
    main()
