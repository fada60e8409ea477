"""The bundled benchmark suite: cold starts of sockworker and its peers,
the warm path, and scale, all measured in one run so that every ratio
compares figures taken on the same machine at the same time.

Run it through bench/run, which picks the project's interpreter:

    bench/run                 the full suite (a few minutes)
    bench/run --quick         every part once, briefly (under two minutes)
    bench/run --skip docker   leave a row out (repeatable)
    bench/run --out DIR       write into DIR, not bench/results/<time>/

It prints a table and writes results.json, table.txt and PNG figures. A
row that cannot be measured here (a peer not installed, a feature not
built yet, a flag that skipped it) carries the reason instead of numbers,
in the table, the JSON and the figures alike.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
TOP = os.path.dirname(BENCH)
# The benchmarks import each other as top-level modules (bench/ is not a
# package); the project itself comes from the venv's editable install.
sys.path[:0] = [BENCH, TOP]

import cold_http  # noqa: E402
import docker_peer  # noqa: E402
import peers  # noqa: E402
import plots  # noqa: E402
import scale  # noqa: E402
import warm_path  # noqa: E402
from fresh_start import measure_sock  # noqa: E402

from sockworker.image import BaseImage, ImageBuildError  # noqa: E402
from sockworker.sandbox.backend import tree_name  # noqa: E402

log = logging.getLogger("bench")

RESULTS_DIR = os.path.join(BENCH, "results")

NUMPY_REQUIREMENT = "numpy==1.26.4"

# The cold-start rows in table order: key, label, the --skip name.
COLD_ROWS = (
    ("sockworker", "sockworker HTTP, import cache off", "cold-http"),
    ("sockworker_cache", "sockworker HTTP, import cache on", "cold-http"),
    ("numpy", "numpy handler, import cache on", "cold-http"),
    ("numpy_fresh", "numpy handler, import cache off", "cold-http"),
    ("sandbox", "sockworker sandbox, no HTTP", "sandbox"),
    ("http_floor", "bare falcon, HTTP only", "cold-http"),
    ("crun", "crun run", "crun"),
    ("runc", "runc run", "runc"),
    ("docker", "docker run --rm", "docker"),
)
# What --skip accepts: the cold-start rows' names, then the sections.
SECTIONS = (
    "cold-http",
    "sandbox",
    "crun",
    "runc",
    "docker",
    "warm",
    "scale",
    "density",
)

# Defaults of a full run and of --quick; flags override either.
FULL = {
    "runs": 100,
    "pause": 0.2,
    "warm_seconds": 10,
    "connections": [1, 8, 64],
    "clients": [1, 2, 4, 8, 16],
    "scale_requests": 64,
    "density_cap": None,
}
QUICK = FULL | {
    "runs": 8,
    "warm_seconds": 1,
    "scale_requests": 16,
    "density_cap": 16,
}


def say(message):
    print(f"bench: {message}", file=sys.stderr, flush=True)


# -- cold-start rows --------------------------------------------------------


def measure_cold_rows(settings, image, skip):
    rows = {}
    for key, label, section in COLD_ROWS:
        if section in skip:
            rows[key] = {
                "label": label,
                "reason": f"skipped (--skip {section})",
            }
            continue
        say(f"cold start: {label}")
        started = time.monotonic()
        rows[key] = cold_row(key, label, settings, image)
        rows[key]["seconds"] = round(time.monotonic() - started, 1)
    add_ratios(rows)
    return rows


def cold_row(key, label, settings, image):
    details = {}
    if image is None:
        result = settings["image_error"]
    else:
        result = run_guarded(
            label, cold_measurement(key), settings, image, details
        )
    return make_row(label, result, details)


def cold_measurement(key):
    """The function that measures one row: (settings, image, details) ->
    list of seconds or a reason string."""
    return {
        "sockworker": measure_http,
        "sockworker_cache": measure_http_import_cache,
        "numpy": measure_numpy,
        "numpy_fresh": lambda s, image, d: measure_numpy(
            s, image, d, import_cache=False
        ),
        "sandbox": measure_sandbox,
        "http_floor": lambda s, image, d: cold_http.measure_floor(
            s["runs"], s["pause"]
        ),
        "crun": lambda s, image, d: peers.measure(
            "crun", image, s["runs"], s["pause"]
        ),
        "runc": lambda s, image, d: peers.measure(
            "runc", image, s["runs"], s["pause"]
        ),
        "docker": lambda s, image, d: docker_peer.measure(
            image, s["runs"], s["pause"], details=d
        ),
    }[key]


def run_guarded(label, measure, settings, image, details):
    """Run one measurement; a failure becomes the row's reason.

    NOTE: any exception, not a list of expected ones: a row that breaks
    must not cost the rows after it, and the reason names the exception
    so the failure is reported, not hidden.
    """
    try:
        return measure(settings, image, details)
    except Exception as e:
        log.debug("%s failed", label, exc_info=True)
        return f"failed: {type(e).__name__}: {e}"


def measure_http(settings, image, details, import_cache=False):
    times, extra = cold_http.measure(
        settings["images_dir"],
        settings["runs"],
        settings["pause"],
        import_cache=import_cache,
    )
    details.update(extra)
    return times


def measure_http_import_cache(settings, image, details):
    """The same measurement with the import cache on."""
    return measure_http(settings, image, details, import_cache=True)


def measure_numpy(settings, image, details, import_cache=True):
    """A handler that imports numpy (pinned, so every run of the suite
    measures the same package), with the import cache on: what the
    zygotes are for; or off, for the ratio."""
    times, extra = cold_http.measure(
        settings["images_dir"],
        settings["runs"],
        settings["pause"],
        import_cache=import_cache,
        source=cold_http.NUMPY,
        requirements=[NUMPY_REQUIREMENT],
    )
    details.update(extra)
    return times


def measure_sandbox(settings, image, details):
    """A SOCK container created in-process and asked once: the floor
    under the HTTP row (no HTTP, no manager, no registry)."""
    details["network"] = "none"
    return measure_sock(image, settings["runs"], settings["pause"], "none")


def make_row(label, result, details):
    if isinstance(result, str):
        row = {"label": label, "reason": result}
    else:
        row = {"label": label} | round_figures(peers.summarize(result))
        row["times_ms"] = [round(t * 1000, 3) for t in result]
    if details:
        row["details"] = details
    return row


def round_figures(figures):
    return {
        k: round(v, 3) if isinstance(v, float) else v
        for k, v in figures.items()
    }


def add_ratios(rows):
    """vs_<peer>: the peer's median over the row's median, both from this
    run (above 1: the row is that many times faster)."""
    for peer in ("docker", "crun"):
        base = rows.get(peer, {})
        for row in rows.values():
            if "median_ms" not in row:
                continue
            if "median_ms" in base:
                row[f"vs_{peer}"] = round(
                    base["median_ms"] / row["median_ms"], 3
                )
            else:
                row[f"vs_{peer}"] = None


# -- warm path --------------------------------------------------------------


def measure_warm(settings, image, skip):
    if "warm" in skip:
        return {"reason": "skipped (--skip warm)"}
    if image is None:
        return {"reason": settings["image_error"]}
    if shutil.which("wrk") is None:
        return {"reason": "wrk is not installed (apt-get install wrk)"}
    say("warm path: bare falcon and sockworker under wrk")
    started = time.monotonic()
    try:
        servers, leftovers, tree = run_warm(settings)
    except (RuntimeError, OSError, subprocess.CalledProcessError) as e:
        return {"reason": f"failed: {type(e).__name__}: {e}"}
    return {
        "connections": settings["connections"],
        "seconds_per_point": settings["warm_seconds"],
        "servers": servers,
        "leftovers": leftovers,
        "cgroup_tree": tree,
        "seconds": round(time.monotonic() - started, 1),
    }


def run_warm(settings):
    servers = {}
    leftovers = []
    with tempfile.TemporaryDirectory(prefix="sockworker-bench-") as tmp:
        script = os.path.join(tmp, "post.lua")
        with open(script, "w", encoding="utf-8") as f:
            f.write(warm_path.WRK_SCRIPT)
        for name, start in (
            ("bare falcon", warm_path.start_bare),
            (
                "sockworker",
                lambda: warm_path.start_worker(tmp, settings["images_dir"]),
            ),
        ):
            proc, port = start()
            try:
                servers[name] = drive_wrk(port, script, settings)
            finally:
                # Taken last: by now the server has forked everything
                # it will (gunicorn's worker process, the sandboxes).
                family = [proc.pid] + descendants(proc.pid)
                warm_path.stop(proc)
                leftovers += kill_left(family)
        state = os.path.join(tmp, "state")
        leftovers += [
            f"cgroup {p} left" for p in cold_http.tree_cgroups(state)
        ]
    add_share_of_bare(servers)
    return servers, leftovers, tree_name(state)


def drive_wrk(port, script, settings):
    # One request first, so that the lambda's instance exists.
    warm_path.run_wrk(port, 1, 1, script)
    return {
        str(c): warm_path.run_wrk(port, c, settings["warm_seconds"], script)
        for c in settings["connections"]
    }


def add_share_of_bare(servers):
    bare = servers.get("bare falcon", {})
    for rows in servers.values():
        for conns, row in rows.items():
            if bare.get(conns, {}).get("rps"):
                row["of_bare"] = round(row["rps"] / bare[conns]["rps"], 3)


def descendants(pid):
    found = []
    for child in cold_http.children_of(pid):
        found += [child] + descendants(child)
    return found


def kill_left(pids):
    """Kill those of pids (all started by this run) still alive after
    their server stopped; returns what was left."""
    time.sleep(0.2)
    left = [pid for pid in pids if alive(pid)]
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [
        f"process {pid} still running after its server stopped" for pid in left
    ]


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rpartition(")")[2].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


# -- scale ------------------------------------------------------------------


def measure_scale(settings, image, skip):
    return {
        "cold_start_rate": measure_rate(settings, image, skip),
        "idle_density": measure_density(settings, image, skip),
    }


def measure_rate(settings, image, skip):
    if "scale" in skip:
        return {"reason": "skipped (--skip scale)"}
    if image is None:
        return {"reason": settings["image_error"]}
    say(f"scale: cold starts/s with {settings['clients']} clients")
    result = run_guarded(
        "scale",
        lambda s, i, d: scale.measure_rate(
            s["images_dir"], s["clients"], s["scale_requests"]
        ),
        settings,
        image,
        {},
    )
    if isinstance(result, str):
        return {"reason": result}
    return {"levels": {k: round_figures(v) for k, v in result.items()}}


def measure_density(settings, image, skip):
    if "density" in skip:
        return {"reason": "skipped (--skip density)"}
    if image is None:
        return {"reason": settings["image_error"]}
    say("scale: idle sandboxes in 4 GiB")
    result = run_guarded(
        "density",
        lambda s, i, d: scale.measure_density(
            s["images_dir"], cap=s["density_cap"]
        ),
        settings,
        image,
        {},
    )
    if isinstance(result, str):
        return {"reason": result}
    return result


# -- the report -------------------------------------------------------------


def format_table(results):
    meta = results["meta"]
    lines = [
        f"sockworker bench: {meta['mode']} run, {meta['started_utc']}, "
        f"{meta['duration_s']:.0f} s; {meta['host']['cpus']} CPUs, "
        f"kernel {meta['host']['kernel']}",
        "",
    ]
    lines += cold_table(results["cold_start"], meta["settings"])
    lines.append("")
    lines += warm_table(results["warm_path"])
    lines.append("")
    lines += scale_table(results["scale"])
    leftovers = collect_leftovers(results)
    if leftovers:
        lines += ["", "left behind and removed by force:"]
        lines += [f"  {item}" for item in leftovers]
    return "\n".join(lines) + "\n"


def cold_table(rows, settings):
    title = f"cold start (pause {settings['pause']} s)"
    lines = [
        f"{title:<36}"
        f" {'runs':>4} {'median ms':>9} {'p95 ms':>8} {'vs docker':>9}"
        f" {'vs crun':>8}"
    ]
    for row in rows.values():
        if "reason" in row:
            lines.append(f"{row['label']:<36} {'-':>4}  {row['reason']}")
            continue
        lines.append(
            f"{row['label']:<36} {row['runs']:>4} {row['median_ms']:>9.1f}"
            f" {row['p95_ms']:>8.1f} {ratio(row.get('vs_docker')):>9}"
            f" {ratio(row.get('vs_crun')):>8}"
        )
    lines.append(
        "vs X: X's median over the row's median, same run (above 1: faster)"
    )
    lines += cache_gains(rows)
    return lines


def cache_gains(rows):
    """How much faster the import cache made each handler, same run."""
    lines = []
    for handler, off, on in (
        ("no-op", "sockworker", "sockworker_cache"),
        ("numpy", "numpy_fresh", "numpy"),
    ):
        off_ms = rows.get(off, {}).get("median_ms")
        on_ms = rows.get(on, {}).get("median_ms")
        if off_ms and on_ms:
            lines.append(
                f"import cache: {handler} handler {off_ms / on_ms:.1f}x "
                f"faster with it ({off_ms:.1f} -> {on_ms:.1f} ms median)"
            )
    return lines


def ratio(value):
    return "-" if value is None else f"{value:.2f}x"


def warm_table(warm):
    if "reason" in warm:
        return [f"warm path: {warm['reason']}"]
    title = f"warm path ({warm['seconds_per_point']} s per point)"
    lines = [
        f"{title:<26}"
        f" {'conns':>5} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8}"
        f" {'of bare':>8}"
    ]
    for name, rows in warm["servers"].items():
        for conns, row in rows.items():
            share = row.get("of_bare")
            lines.append(
                f"{name:<26} {conns:>5} {row['rps']:>8} {row['p50_ms']:>8.2f}"
                f" {row['p99_ms']:>8.2f}"
                f" {'-' if share is None else f'{share:.0%}':>8}"
            )
            if row.get("non_2xx"):
                lines.append(f"  {row['non_2xx']} answers were not 2xx")
    return lines


def scale_table(result):
    rate = result["cold_start_rate"]
    if "reason" in rate:
        lines = [f"cold starts/s: {rate['reason']}"]
    else:
        lines = [
            f"{'cold starts/s':<26} {'clients':>7} {'requests':>8}"
            f" {'per s':>7} {'median ms':>9} {'p95 ms':>8}"
        ]
        for level in rate["levels"].values():
            lines.append(
                f"{'':<26} {level['clients']:>7} {level['requests']:>8}"
                f" {level['cold_starts_per_s']:>7.1f}"
                f" {level['median_ms']:>9.1f} {level['p95_ms']:>8.1f}"
            )
    density = result["idle_density"]
    if "reason" in density:
        lines.append(f"idle sandboxes: {density['reason']}")
    else:
        lines.append(
            f"idle sandboxes: {density['created']} created in "
            f"{density['budget_mb']} MiB at {density['memory_mb']} MiB each "
            f"(budget admits {density['admitted_by_budget']}, cap "
            f"{density['target']})"
        )
        lines.append(
            f"  per sandbox: PSS median {density['median_pss_mib']} MiB, "
            f"max {density['max_pss_mib']} MiB; cgroup charge median "
            f"{density['median_charged_mib']} MiB; by PSS the budget "
            f"would hold {density['fit_by_pss']}"
        )
    return lines


def collect_leftovers(results):
    found = []
    for row in results["cold_start"].values():
        found += row.get("details", {}).get("leftovers", [])
    found += results["warm_path"].get("leftovers", [])
    rate = results["scale"]["cold_start_rate"]
    for level in rate.get("levels", {}).values():
        found += level.get("leftovers", [])
    found += results["scale"]["idle_density"].get("leftovers", [])
    return found


def host_facts():
    with open("/proc/meminfo", encoding="ascii") as f:
        mem_kb = int(f.readline().split()[1])
    return {
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "mem_total_mb": mem_kb // 1024,
        "python": platform.python_version(),
        "commit": git_commit(),
        "crun": first_line(["crun", "--version"]),
        "runc": first_line(["runc", "--version"]),
        "dockerd": first_line(["dockerd", "--version"]),
    }


def git_commit():
    return first_line(["git", "-C", TOP, "rev-parse", "HEAD"])


def first_line(argv):
    try:
        result = subprocess.run(argv, capture_output=True, text=True)
    except FileNotFoundError:
        return None
    lines = result.stdout.strip().splitlines()
    return lines[0] if result.returncode == 0 and lines else None


def write_outputs(results, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    table = format_table(results)
    results["files"] = ["results.json", "table.txt", *plots.FIGURE_FILES]
    with open(os.path.join(out_dir, "table.txt"), "w", encoding="utf-8") as f:
        f.write(table)
    plots.write_all(results, out_dir)
    with open(
        os.path.join(out_dir, "results.json"), "w", encoding="utf-8"
    ) as f:
        json.dump(results, f, indent=1)
        f.write("\n")
    return table


# -- the command ------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="bench/run",
        description="Cold-start, warm-path and scale benchmarks of "
        "sockworker and its peers, in one run.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="check the whole harness in under two minutes (few runs)",
    )
    parser.add_argument(
        "--skip",
        action="append",
        default=[],
        choices=SECTIONS,
        help="leave out a row or section (repeatable)",
    )
    parser.add_argument("--out", help="output folder")
    parser.add_argument(
        "--runs", type=int, help="runs per cold-start row (full: 100)"
    )
    parser.add_argument(
        "--pause", type=float, help="seconds between cold starts (0.2)"
    )
    parser.add_argument(
        "--warm-seconds", type=int, help="wrk seconds per point (full: 10)"
    )
    parser.add_argument(
        "--connections", type=int, nargs="+", help="wrk connections"
    )
    parser.add_argument(
        "--clients", type=int, nargs="+", help="scale client counts"
    )
    parser.add_argument(
        "--scale-requests",
        type=int,
        help="cold starts per client count (full: 64)",
    )
    parser.add_argument(
        "--density-cap", type=int, help="most idle sandboxes to create"
    )
    peers.add_images_dir(parser)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    settings = dict(QUICK if args.quick else FULL)
    for key in settings:
        value = getattr(args, key)
        if value is not None:
            settings[key] = value
    settings["images_dir"] = os.path.abspath(args.images_dir)
    check_settings(parser, settings)
    return args, settings


def check_settings(parser, settings):
    if settings["runs"] < 1:
        parser.error("--runs must be at least 1")
    if settings["pause"] < 0:
        parser.error("--pause must not be negative")
    if settings["warm_seconds"] < 1:
        parser.error("--warm-seconds must be at least 1")
    for key in ("connections", "clients"):
        if min(settings[key]) < 1:
            parser.error(f"--{key} must all be at least 1")
    if settings["scale_requests"] < 1:
        parser.error("--scale-requests must be at least 1")
    if settings["density_cap"] is not None and settings["density_cap"] < 1:
        parser.error("--density-cap must be at least 1")


def ensure_image(settings):
    """The base image's path, or None with the reason in settings."""
    try:
        return BaseImage(settings["images_dir"]).ensure(progress=True)
    except (ImageBuildError, OSError) as e:
        settings["image_error"] = f"base image: {e}"
        return None


def default_out_dir(started):
    return os.path.join(RESULTS_DIR, started.strftime("%Y%m%dT%H%M%SZ"))


def stop_on_sigterm():
    """SIGTERM ends the run as Ctrl-C does, through every finally block,
    so the workers, dockerd and temporary folders it started go too."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)


def main(argv=None):
    args, settings = parse_args(argv)
    stop_on_sigterm()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="bench: %(levelname)s %(name)s: %(message)s",
    )
    if os.geteuid() != 0:
        say("not root: the sockworker and peer rows will say why they fail")
    started = datetime.datetime.now(datetime.timezone.utc)
    clock = time.monotonic()
    out_dir = os.path.abspath(args.out or default_out_dir(started))
    skip = set(args.skip)

    image = ensure_image(settings)
    results = {
        "meta": {
            "mode": "quick" if args.quick else "full",
            "started_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
            "settings": settings,
            "skipped": sorted(skip),
            "image": image,
            "host": host_facts(),
        }
    }
    results["cold_start"] = measure_cold_rows(settings, image, skip)
    results["warm_path"] = measure_warm(settings, image, skip)
    results["scale"] = measure_scale(settings, image, skip)
    results["meta"]["duration_s"] = round(time.monotonic() - clock, 1)

    table = write_outputs(results, out_dir)
    print(table, end="")
    print(f"results in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
