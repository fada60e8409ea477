"""Scale: cold starts per second under concurrent clients, and how many
idle sandboxes fit in a memory budget.

Cold-start rate: for each client count, a fresh worker and a fresh set of
lambdas; the clients start together and each sends its share of the
requests back to back, every one to a lambda never run before. The rate
is requests over the wall time from the start to the last reply. Each
level gets its own worker so that no level runs beside the idle
instances an earlier level left.

Idle density: a worker whose memory budget is 4 GiB and whose sandboxes
are limited to 16 MiB each, so its accounting admits 256 instances.
Distinct lambdas are run once each until that many instances exist (or a
cap), and then, with all of them idle, the proportional set size (PSS) of
every sandbox is read from /proc/<pid>/smaps_rollup of the processes in
its cgroup. PSS charges shared pages (the image's Python, the page
cache) in shares, so the sum over sandboxes is what their processes
really cost; the memory their cgroups are charged is reported beside
it, since it also holds kernel memory and the page cache a sandbox read
first.

    /work/main/.venv/bin/python bench/scale.py --clients 1 2 4 8 16
"""

import argparse
import logging
import os
import statistics
import sys
import tempfile
import threading
import time

from cold_http import (
    BenchError,
    Worker,
    lambda_names,
    timed_run,
    worker_config,
    worker_facts,
    write_lambdas,
)
from peers import add_images_dir, summarize

from sockworker.manager import ZYGOTE_RESERVE_MB
from sockworker.sandbox.backend import tree_name
from sockworker.sandbox.cgroups import CgroupLayout

log = logging.getLogger(__name__)

MIB = 1 << 20
CLIENTS = (1, 2, 4, 8, 16)
BUDGET_MB = 4096
SANDBOX_MB = 16
# Clients that fill the worker with idle instances: enough to keep both
# CPUs busy, few enough not to queue behind each other.
FILL_CLIENTS = 4
# Let a new worker's pool of prepared sandboxes fill before timing.
SETTLE_SECONDS = 1.0


# -- cold starts per second -------------------------------------------------


def measure_rate(images_dir, clients=CLIENTS, requests=64):
    """{clients: figures} for each client count, or a reason string."""
    levels = {}
    for count in clients:
        result = measure_level(images_dir, count, requests)
        if isinstance(result, str):
            return f"{count} clients: {result}"
        levels[str(count)] = result
    return levels


def measure_level(images_dir, clients, requests):
    # Every client gets the same number of requests, at least one.
    per_client = max(1, requests // clients)
    total = per_client * clients
    with tempfile.TemporaryDirectory(prefix="sockworker-bench-") as tmp:
        registry = os.path.join(tmp, "registry")
        names = write_lambdas(registry, lambda_names("noop", total))
        instances = total + 4
        # As in the cold-start rows: room for every instance beside the
        # memory the worker sets aside for zygotes, so none is evicted.
        budget_mb = 64 * instances + ZYGOTE_RESERVE_MB
        config = worker_config(
            tmp,
            registry,
            images_dir,
            memory_mb=64,
            max_instances=instances,
            max_instances_per_lambda=max(clients, 4),
            memory_budget_mb=budget_mb,
            keep_warm_seconds=3600,
            http_threads=max(32, 2 * clients),
        )
        worker = Worker(tmp, config)
        try:
            worker.start()
            time.sleep(SETTLE_SECONDS)
            shares = [names[i::clients] for i in range(clients)]
            wall, times = run_together(worker.port, shares)
        except (BenchError, OSError) as e:
            return str(e)
        finally:
            leftovers = worker.stop()
    figures = summarize(times)
    figures.update(
        clients=clients,
        requests=total,
        wall_s=round(wall, 3),
        cold_starts_per_s=round(total / wall, 2),
        leftovers=leftovers,
        **worker_facts(config),
    )
    return figures


def run_together(port, shares):
    """Run one client thread per share of lambda names, started at the
    same moment; returns (wall seconds, per-request seconds). Any failed
    request fails the level."""
    barrier = threading.Barrier(len(shares) + 1)
    times = []
    errors = []
    lock = threading.Lock()

    def client(names):
        barrier.wait()
        try:
            mine = [timed_run(port, name) for name in names]
        except (BenchError, OSError) as e:
            with lock:
                errors.append(e)
            return
        with lock:
            times.extend(mine)

    threads = [
        threading.Thread(target=client, args=(share,), daemon=True)
        for share in shares
    ]
    for thread in threads:
        thread.start()
    barrier.wait()
    started = time.perf_counter()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    if errors:
        raise BenchError(str(errors[0]))
    return wall, times


# -- idle density -----------------------------------------------------------


def measure_density(
    images_dir, budget_mb=BUDGET_MB, sandbox_mb=SANDBOX_MB, cap=None
):
    """Idle sandboxes created within the budget, and their PSS; or a
    reason string."""
    admitted = budget_mb // sandbox_mb
    target = min(admitted, cap) if cap else admitted
    with tempfile.TemporaryDirectory(prefix="sockworker-bench-") as tmp:
        registry = os.path.join(tmp, "registry")
        names = write_lambdas(registry, lambda_names("noop", target))
        config = worker_config(
            tmp,
            registry,
            images_dir,
            memory_mb=sandbox_mb,
            memory_budget_mb=budget_mb,
            max_instances=target,
            keep_warm_seconds=3600,
        )
        worker = Worker(tmp, config)
        try:
            worker.start()
            started = time.perf_counter()
            shares = [names[i::FILL_CLIENTS] for i in range(FILL_CLIENTS)]
            run_together(worker.port, [s for s in shares if s])
            fill_seconds = time.perf_counter() - started
            figures = density_figures(
                sandbox_memory(worker.state_dir),
                worker.status(),
                target,
                admitted,
                budget_mb,
                sandbox_mb,
            )
        except (BenchError, OSError) as e:
            return str(e)
        finally:
            leftovers = worker.stop()
    figures.update(
        fill_s=round(fill_seconds, 2),
        leftovers=leftovers,
        **worker_facts(config),
    )
    return figures


def density_figures(sandboxes, status, target, admitted, budget_mb, mb):
    if not sandboxes:
        raise BenchError("idle density: no running sandbox found in cgroups")
    pss = sorted(s["pss_kb"] for s in sandboxes)
    median_kb = statistics.median(pss)
    charged = [s["charged_kb"] for s in sandboxes]
    if None in charged:
        median_charged = None
    else:
        median_charged = round(statistics.median(charged) / 1024, 2)
    return {
        "created": len(sandboxes),
        "target": target,
        "admitted_by_budget": admitted,
        "worker_instances": status.get("instances"),
        "budget_mb": budget_mb,
        "memory_mb": mb,
        "median_pss_mib": round(median_kb / 1024, 2),
        "max_pss_mib": round(pss[-1] / 1024, 2),
        "total_pss_mib": round(sum(pss) / 1024, 1),
        "median_charged_mib": median_charged,
        # What the budget would hold if it were charged by real use.
        "fit_by_pss": int(budget_mb * 1024 // median_kb),
        "pss_mib": [round(kb / 1024, 2) for kb in pss],
    }


def sandbox_memory(state_dir):
    """[{id, pids, pss_kb}] for each sandbox of the worker on state_dir
    that runs a container: prepared sandboxes, whose cgroup holds only a
    setup child waiting for a lambda, are not idle instances."""
    layout = CgroupLayout.detect()
    hierarchy = layout.hierarchy("memory") or layout.hierarchies()[0]
    tree = os.path.join(hierarchy.start, tree_name(state_dir))
    found = []
    for sandbox_id in sorted(os.listdir(tree)):
        path = os.path.join(tree, sandbox_id)
        if not sandbox_id.startswith("sb-") or not os.path.isdir(path):
            continue
        pids = read_pids(os.path.join(path, "cgroup.procs"))
        if not any(is_namespace_init(pid) for pid in pids):
            continue
        found.append(
            {
                "id": sandbox_id,
                "pids": pids,
                "pss_kb": sum(pss_kb(pid) for pid in pids),
                "charged_kb": charged_kb(path),
            }
        )
    return found


def charged_kb(cgroup_dir):
    """Memory the kernel charges to the sandbox's cgroup (its pages,
    page cache it touched first, kernel memory), in kB; None where the
    hierarchy has no memory controller."""
    for name in ("memory.usage_in_bytes", "memory.current"):
        try:
            with open(os.path.join(cgroup_dir, name), encoding="ascii") as f:
                return int(f.read()) // 1024
        except FileNotFoundError:
            continue
    return None


def read_pids(path):
    with open(path, encoding="ascii") as f:
        return [int(line) for line in f if line.strip()]


def is_namespace_init(pid):
    """Whether pid is PID 1 of a PID namespace below ours."""
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    ids = line.split()[1:]
                    return len(ids) > 1 and ids[-1] == "1"
    except (FileNotFoundError, ProcessLookupError):
        pass
    return False


def pss_kb(pid):
    """Pss of pid in kB from smaps_rollup; 0 if it has exited."""
    try:
        with open(f"/proc/{pid}/smaps_rollup", encoding="utf-8") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError):
        return 0
    raise BenchError(f"read /proc/{pid}/smaps_rollup: no Pss line")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=CLIENTS)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--density-cap", type=int, default=None)
    add_images_dir(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    rate = measure_rate(args.images_dir, args.clients, args.requests)
    if isinstance(rate, str):
        print(f"cold starts per second: unavailable: {rate}")
    else:
        for count, level in rate.items():
            print(
                f"{count:>3} clients: {level['cold_starts_per_s']:7.1f} cold "
                f"starts/s, median {level['median_ms']:.1f} ms"
            )
    density = measure_density(args.images_dir, cap=args.density_cap)
    if isinstance(density, str):
        print(f"idle density: unavailable: {density}")
    else:
        print(
            f"idle sandboxes: {density['created']} in "
            f"{density['budget_mb']} MiB, median PSS "
            f"{density['median_pss_mib']} MiB"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
