"""Cold starts through HTTP: a real worker (bin/worker), a registry of
distinct no-op lambdas (noop-0, noop-1, ...), and one POST per lambda, so
every timed request runs a lambda that was never run before. A pause
between requests lets the machine go idle, so no start rides on the
previous one's warm caches or busy CPUs.

Each request is timed on the client, from opening a fresh connection to
the last byte of the reply; the worker's X-Sockworker-Cold header must say
that it was a cold start, or the run is reported as failed rather than
counted.

The Worker class here is shared by the scale benchmark: it starts
bin/worker with a given config in a session of its own and, on stop,
checks that no process, cgroup or sandbox folder of it is left.

    /work/main/.venv/bin/python bench/cold_http.py --runs 50 --pause 0.2
"""

import http.client
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from peers import cold_start_parser, summarize
from warm_path import PYTHON, TOP, free_port, start_bare, wait_for_port
from warm_path import stop as stop_server

from sockworker.manager import ZYGOTE_RESERVE_MB
from sockworker.sandbox.backend import tree_name

log = logging.getLogger(__name__)

WORKER = os.path.join(TOP, "bin", "worker")
COLD_HEADER = "X-Sockworker-Cold"
NOOP = "def f(event):\n    return None\n"
NUMPY = "import numpy\n\n\ndef f(event):\n    return None\n"
READY_SECONDS = 120
STOP_SECONDS = 60
GONE_SECONDS = 10
REQUEST_TIMEOUT = 30
# Requests before the timed ones, on lambdas of their own: the first
# request of a worker also pays for one-time work (the registry's first
# listing, the first connection to a sandbox socket, lazy imports).
WARMUP = 2


class BenchError(Exception):
    """A benchmark could not produce its figure; the message says which
    step failed and why, and becomes the row's reason."""


# -- the registry -----------------------------------------------------------


def write_lambdas(registry, names, source=NOOP, requirements=None):
    """One folder lambda per name, each with the same handler."""
    for name in names:
        folder = os.path.join(registry, name)
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "f.py"), "w", encoding="utf-8") as f:
            f.write(source)
        if requirements:
            path = os.path.join(folder, "requirements.txt")
            with open(path, "w", encoding="utf-8") as f:
                f.write("\n".join(requirements) + "\n")
    return list(names)


def lambda_names(prefix, count, start=0):
    return [f"{prefix}-{i}" for i in range(start, start + count)]


# -- the worker ---------------------------------------------------------------


def worker_config(tmp, registry, images_dir, **overrides):
    """A worker config for a benchmark: loopback, a free port, state and
    log under tmp, plus the given fields."""
    config = {
        "sandbox": "sock",
        "worker_host": "127.0.0.1",
        "worker_port": free_port(),
        "registry": registry,
        "state_dir": os.path.join(tmp, "state"),
        "images_dir": os.path.abspath(images_dir),
        "log_output": os.path.join(tmp, "worker.log"),
    }
    config.update(overrides)
    return config


class Worker:
    """One bin/worker process with a config of the benchmark's choosing.

    Guarantees: start() returns once GET /status answers 200 (the app is
    loaded in gunicorn's worker process); after start(), failed or not,
    the caller must call stop(), which is idempotent and, when
    it returns, no process of the worker's session, no cgroup of its tree
    and no sandbox folder remains. What it had to kill or remove is
    returned, for the report.
    """

    def __init__(self, tmp, config):
        self.tmp = tmp
        self.config = config
        self.config_path = os.path.join(tmp, "config.json")
        self.output_path = os.path.join(tmp, "worker.out")
        self.proc = None

    @property
    def port(self):
        return self.config["worker_port"]

    @property
    def state_dir(self):
        return self.config["state_dir"]

    def start(self):
        with open(self.config_path, "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=1)
        with open(self.output_path, "ab") as out:
            self.proc = subprocess.Popen(
                [PYTHON, WORKER, "--config", self.config_path],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        try:
            wait_for_port(self.port, self.proc, READY_SECONDS)
            self.wait_serving()
        except RuntimeError as e:
            raise BenchError(
                f"start worker on port {self.port}: {e}: {self.output_tail()}"
            ) from e
        log.info("worker %d serving on port %d", self.proc.pid, self.port)
        return self

    def wait_serving(self):
        deadline = time.monotonic() + READY_SECONDS
        while True:
            try:
                status, _, _ = request(self.port, "GET", "/status", timeout=5)
                if status == 200:
                    return
            except OSError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"exited with status {self.proc.returncode}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(f"no 200 on /status in {READY_SECONDS} s")
            time.sleep(0.05)

    def output_tail(self, size=800):
        text = []
        for path in (self.output_path, self.config["log_output"]):
            try:
                with open(path, "rb") as f:
                    f.seek(0, os.SEEK_END)
                    f.seek(max(0, f.tell() - size))
                    text.append(f.read().decode(errors="replace").strip())
            except FileNotFoundError:
                continue
        return " | ".join(t for t in text if t) or "(no output)"

    def status(self):
        return get_json(self.port, "/status")

    def stats(self):
        return get_json(self.port, "/stats")

    def gunicorn_worker_pid(self):
        """The master's only child: the process that owns every sandbox."""
        children = children_of(self.proc.pid)
        if len(children) != 1:
            raise BenchError(
                f"worker {self.proc.pid}: expected one gunicorn worker "
                f"process, found {children}"
            )
        return children[0]

    def stop(self):
        """SIGTERM, wait, then check and clean; returns what was left."""
        if self.proc is None:
            return []
        forced = []
        sid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(STOP_SECONDS)
            except subprocess.TimeoutExpired:
                forced.append(f"worker {sid} ignored SIGTERM")
                self.proc.kill()
                self.proc.wait()
        forced += kill_session(sid)
        forced += [f"cgroup {p} left" for p in tree_cgroups(self.state_dir)]
        forced += [
            f"sandbox folder {name} left"
            for name in list_dir(os.path.join(self.state_dir, "sandboxes"))
        ]
        self.proc = None
        if forced:
            log.warning("worker %d left behind: %s", sid, "; ".join(forced))
        return forced


def children_of(pid):
    out = subprocess.run(
        ["ps", "-o", "pid=", "--ppid", str(pid)],
        capture_output=True,
        text=True,
    ).stdout.split()
    return sorted(int(p) for p in out)


def session_members(sid):
    """Live processes of session sid: the worker started it and nothing
    under it calls setsid, so these are all its processes."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", encoding="utf-8") as f:
                fields = f.read().rpartition(")")[2].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            found.append(int(name))
    return found


def kill_session(sid):
    deadline = time.monotonic() + GONE_SECONDS
    while session_members(sid) and time.monotonic() < deadline:
        time.sleep(0.05)
    left = session_members(sid)
    for pid in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return [f"process {pid} of worker {sid} still running" for pid in left]


def tree_cgroups(state_dir):
    """The worker's cgroup tree in every hierarchy, if still there."""
    tree = tree_name(state_dir)
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(top) == tree:
            found.append(top)
            dirs[:] = []
        elif top.count("/") > 8:
            dirs[:] = []
    return found


def list_dir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []


# -- HTTP -------------------------------------------------------------------


def request(port, method, path, body=None, timeout=REQUEST_TIMEOUT):
    """One request on a fresh connection: (status, headers with
    lower-case names, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        headers = {k.lower(): v for k, v in resp.getheaders()}
        return resp.status, headers, data
    finally:
        conn.close()


def get_json(port, path):
    status, _, data = request(port, "GET", path)
    if status != 200:
        raise BenchError(f"GET {path}: status {status}: {data[:300]!r}")
    return json.loads(data)


def timed_run(port, name):
    """Seconds of one POST /run/<name>, connect to last byte; raises
    BenchError unless it answered 200 as a cold start."""
    started = time.perf_counter()
    status, headers, data = request(port, "POST", f"/run/{name}", b"{}")
    elapsed = time.perf_counter() - started
    if status != 200:
        raise BenchError(f"POST /run/{name}: status {status}: {data[:300]!r}")
    cold = headers.get(COLD_HEADER.lower())
    if cold != "true":
        raise BenchError(
            f"POST /run/{name}: {COLD_HEADER} is {cold!r}, not a cold start"
        )
    return elapsed


# -- the measurement --------------------------------------------------------


def measure(
    images_dir, runs, pause, import_cache=False, source=NOOP, requirements=None
):
    """Seconds per cold start through HTTP, one never-run lambda per run,
    or why it could not be measured. Returns (times or reason, details)
    where details holds what the report needs beside the times."""
    with tempfile.TemporaryDirectory(prefix="sockworker-bench-") as tmp:
        registry = os.path.join(tmp, "registry")
        names = write_lambdas(
            registry, lambda_names("noop", WARMUP + runs), source, requirements
        )
        # Every instance stays warm and idle: none is evicted or expired
        # inside a timed request, so each run pays for one creation only.
        # The worker sets memory aside for zygotes when the import cache
        # is on; the budget holds that too.
        instances = WARMUP + runs + 4
        budget_mb = 64 * instances
        if import_cache:
            budget_mb += ZYGOTE_RESERVE_MB
        config = worker_config(
            tmp,
            registry,
            images_dir,
            import_cache=import_cache,
            memory_mb=64,
            max_instances=instances,
            memory_budget_mb=budget_mb,
            keep_warm_seconds=3600,
        )
        worker = Worker(tmp, config)
        details = worker_facts(config)
        try:
            worker.start()
            times = run_cold(worker, names, pause)
            check_none_evicted(worker, len(names))
            details["worker_stats"] = worker.stats()["totals"]
        except (BenchError, OSError) as e:
            times = str(e)
        finally:
            details["leftovers"] = worker.stop()
        return times, details


def measure_floor(runs, pause):
    """Seconds per POST to a bare Falcon no-op under the worker's
    gunicorn settings, one fresh connection per run after the same pause:
    what HTTP alone costs a cold start on this machine."""
    proc, port = start_bare()
    try:
        times = []
        for _ in range(WARMUP + runs):
            time.sleep(pause)
            started = time.perf_counter()
            status, _, data = request(port, "POST", "/run/noop", b"{}")
            times.append(time.perf_counter() - started)
            if status != 200:
                raise BenchError(f"bare falcon: status {status}: {data!r}")
        return times[WARMUP:]
    finally:
        stop_server(proc)


def run_cold(worker, names, pause):
    for name in names[:WARMUP]:
        timed_run(worker.port, name)
    times = []
    for name in names[WARMUP:]:
        time.sleep(pause)
        times.append(timed_run(worker.port, name))
    return times


def check_none_evicted(worker, created):
    """Each timed request must have paid for one creation and nothing
    else: an eviction would add a destroy to it."""
    instances = worker.status()["instances"]
    if instances != created:
        raise BenchError(
            f"{created} lambdas run but {instances} instances alive: the "
            "worker evicted or lost instances during the run"
        )


def worker_facts(config):
    """What the report says about a worker: its config and the name of
    its cgroup tree (so a leak check can look for exactly that tree)."""
    return {
        "config": public_config(config),
        "cgroup_tree": tree_name(config["state_dir"]),
    }


def public_config(config):
    """The config fields worth reporting (not temp paths or the port)."""
    hidden = {"registry", "state_dir", "log_output", "worker_port"}
    return {k: v for k, v in config.items() if k not in hidden}


def main(argv=None):
    parser = cold_start_parser(__doc__)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    times, details = measure(args.images_dir, args.runs, args.pause)
    if isinstance(times, str):
        print(f"cold start through HTTP: unavailable: {times}")
        return 1
    s = summarize(times)
    print(
        f"cold start through HTTP: {s['runs']} runs, median "
        f"{s['median_ms']:.1f} ms, p95 {s['p95_ms']:.1f} ms, min "
        f"{s['min_ms']:.1f} ms"
    )
    if details["leftovers"]:
        print(f"left behind (removed): {details['leftovers']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
