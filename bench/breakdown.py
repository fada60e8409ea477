"""Where a cold start's time goes, inside the worker: the lambda manager,
registry and sandbox backend of a real worker (the parts bin/worker
runs, without HTTP), in this process, with a timer around each step.

Each run asks for a no-op lambda never run before, after a pause, as the
HTTP cold-start rows do; the table gives each step's median. Steps nest:
"zygote cache: create" holds the steps indented under it, and "manager:
run" holds them all.

    .venv/bin/python bench/breakdown.py --runs 50 --pause 0.2
"""

import collections
import functools
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
sys.path.insert(0, os.path.dirname(__file__))

from cold_http import lambda_names, worker_config, write_lambdas  # noqa: E402
from peers import cold_start_parser  # noqa: E402

from sockworker import manager, registry  # noqa: E402
from sockworker.config import load_config  # noqa: E402
from sockworker.image import BaseImage  # noqa: E402
from sockworker.runtime import Runtime  # noqa: E402
from sockworker.sandbox import mounts  # noqa: E402
from sockworker.zygote import cache  # noqa: E402

# (owner, attribute, label, depth): the steps timed, in path order.
STEPS = (
    (manager.LambdaManager, "run", "manager: run", 0),
    (registry.Registry, "get", "registry: pull the code", 1),
    (registry._LocalSource, "probe", "read the registry folder", 2),
    (registry.Registry, "_unpack", "unpack into the code cache", 2),
    (manager.LambdaManager, "acquire", "manager: get an instance", 1),
    (cache.ZygoteCache, "create", "zygote cache: create", 2),
    (cache.ZygoteCache, "take_prepared", "take the prepared child", 3),
    (cache.ForkedSandbox, "await_ready", "child says ready", 3),
    (mounts, "mount_detached_overlay", "mount the root", 3),
    (cache.ForkedSandbox, "send_go", "send go (with the mount)", 3),
    (cache.ForkedSandbox, "connect", "connect to the sandbox", 3),
    (cache.ForkedSandbox, "request", "first request, start included", 1),
)
WARMUP = 2


def install_timers(times):
    """Wrap every step so that its duration is appended to times[label];
    returns a function that undoes it."""
    originals = []
    for owner, name, label, _ in STEPS:
        original = getattr(owner, name)
        originals.append((owner, name, original))
        setattr(owner, name, timed(original, times[label]))

    def undo():
        for owner, name, original in originals:
            setattr(owner, name, original)

    return undo


def timed(function, into):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            into.append(time.perf_counter() - started)

    return wrapper


def measure(images_dir, runs, pause):
    """{label: [seconds]} over `runs` cold starts."""
    times = collections.defaultdict(list)
    with tempfile.TemporaryDirectory(prefix="sockworker-bench-") as tmp:
        folder = os.path.join(tmp, "registry")
        names = write_lambdas(folder, lambda_names("noop", WARMUP + runs))
        config_path = os.path.join(tmp, "config.json")
        with open(config_path, "w", encoding="utf-8") as f:
            json.dump(
                worker_config(
                    tmp,
                    folder,
                    images_dir,
                    memory_mb=64,
                    max_instances=len(names),
                    memory_budget_mb=64 * len(names)
                    + manager.ZYGOTE_RESERVE_MB,
                    keep_warm_seconds=3600,
                ),
                f,
            )
        config = load_config(config_path)
        image = BaseImage(config.images_path).ensure(progress=True)
        runtime = Runtime(config, image)
        runtime.start()
        try:
            for name in names[:WARMUP]:
                runtime.manager.run(name, b"{}")
            undo = install_timers(times)
            try:
                for name in names[WARMUP:]:
                    time.sleep(pause)
                    runtime.manager.run(name, b"{}")
            finally:
                undo()
        finally:
            runtime.stop()
    return times


def print_table(times):
    print(f"{'step':<44} {'runs':>4} {'median ms':>10}")
    for _, _, label, depth in STEPS:
        samples = times.get(label)
        if not samples:
            continue
        median = statistics.median(samples) * 1000
        name = "  " * depth + label
        print(f"{name:<44} {len(samples):>4} {median:>10.3f}")


def main(argv=None):
    parser = cold_start_parser(__doc__)
    args = parser.parse_args(argv)
    print_table(measure(args.images_dir, args.runs, args.pause))
    return 0


if __name__ == "__main__":
    sys.exit(main())
