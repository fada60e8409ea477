"""Benchmark: warm requests through the worker against bare Falcon.

Starts a real worker (bin/worker) with a registry holding a no-op lambda,
and, in the same run, the bare Falcon no-op app of bare_app.py under
gunicorn with the same settings (1 gthread worker process, the same thread
count). wrk drives each at several connection counts; the table shows
requests/s, p50 and p99, and the worker's share of the bare rate.

    .venv/bin/python bench/warm_path.py --seconds 10
"""

import argparse
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

from peers import add_images_dir

TOP = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = os.path.join(TOP, ".venv", "bin", "python")
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = "{}"
wrk.headers["Content-Type"] = "application/json"
"""
THREADS = 32


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_port(port, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with status {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing listening on port {port} after {timeout} s")


def start_worker(tmp, images_dir, extra_config=None):
    registry = os.path.join(tmp, "registry")
    os.makedirs(registry)
    with open(os.path.join(registry, "noop.py"), "w") as f:
        f.write("def f(event):\n    return None\n")
    port = free_port()
    config = {
        "worker_port": port,
        "worker_host": "127.0.0.1",
        "registry": registry,
        "sandbox": "sock",
        "log_output": os.path.join(tmp, "worker.log"),
        "state_dir": os.path.join(tmp, "state"),
        "images_dir": images_dir,
        "http_threads": THREADS,
        **(extra_config or {}),
    }
    path = os.path.join(tmp, "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    argv = [PYTHON, os.path.join(TOP, "bin", "worker"), "--config", path]
    return start_server(argv, port)


def start_bare():
    port = free_port()
    return start_server(
        [
            PYTHON,
            "-m",
            "gunicorn",
            "--chdir",
            os.path.join(TOP, "bench"),
            "-w",
            "1",
            "-k",
            "gthread",
            "--threads",
            str(THREADS),
            "-b",
            f"127.0.0.1:{port}",
            "--log-level",
            "warning",
            "bare_app:app",
        ],
        port,
    )


def start_server(argv, port):
    """Start argv and wait until it listens on port; stop it if it
    never does."""
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    try:
        wait_for_port(port, proc)
    except RuntimeError:
        stop(proc)
        raise
    return proc, port


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_wrk(port, connections, seconds, script):
    out = subprocess.run(
        [
            "wrk",
            "--latency",
            "-t",
            str(min(connections, 2)),
            "-c",
            str(connections),
            "-d",
            f"{seconds}s",
            "-s",
            script,
            f"http://127.0.0.1:{port}/run/noop",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return parse_wrk(out)


UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def parse_wrk(out):
    def latency(label):
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        return float(match.group(1)) * UNITS[match.group(2)]

    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "rps": round(rate),
        "p50_ms": round(latency("50"), 3),
        "p99_ms": round(latency("99"), 3),
        "non_2xx": int(errors.group(1)) if errors else 0,
    }


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument(
        "--rounds",
        type=int,
        default=5,
        help="alternating rounds per connection count",
    )
    parser.add_argument(
        "--instances",
        type=int,
        default=4,
        help="max_instances_per_lambda of the worker",
    )
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[1, 8, 64]
    )
    add_images_dir(parser)
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="sockworker-warm-") as tmp:
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        servers = {}
        try:
            servers["bare falcon"] = start_bare()
            servers["sockworker"] = start_worker(
                tmp,
                args.images_dir,
                {"max_instances_per_lambda": args.instances},
            )
            ports = {name: port for name, (_, port) in servers.items()}
            results = measure_interleaved(ports, args, script)
        finally:
            for proc, _ in servers.values():
                stop(proc)
    print_table(results, args.connections)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def measure_interleaved(ports, args, script):
    """Alternate the servers round by round so that both see the same
    background load; report per-server medians over rounds and the
    median of the per-round ratios to the bare app."""
    for port in ports.values():
        # One request first, so the lambda's sandbox exists.
        run_wrk(port, 1, 1, script)
    results = {name: {} for name in ports}
    for connections in args.connections:
        rounds = {name: [] for name in ports}
        names = list(ports)
        for index in range(args.rounds):
            for name in names if index % 2 == 0 else reversed(names):
                rounds[name].append(
                    run_wrk(ports[name], connections, args.seconds, script)
                )
        bare = rounds["bare falcon"]
        for name, runs in rounds.items():
            results[name][str(connections)] = {
                "rps": statistics.median(r["rps"] for r in runs),
                "p50_ms": statistics.median(r["p50_ms"] for r in runs),
                "p99_ms": statistics.median(r["p99_ms"] for r in runs),
                "non_2xx": sum(r["non_2xx"] for r in runs),
                "of_bare": round(
                    statistics.median(
                        r["rps"] / b["rps"]
                        for r, b in zip(runs, bare, strict=True)
                    ),
                    3,
                ),
                "rounds": len(runs),
            }
    return results


def print_table(results, connections):
    print(
        f"{'server':<12} {'conns':>5} {'req/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'of bare':>8}"
    )
    for name, rows in results.items():
        for c in connections:
            row = rows[str(c)]
            print(
                f"{name:<12} {c:>5} {row['rps']:>8.0f} {row['p50_ms']:>8} "
                f"{row['p99_ms']:>8} {row['of_bare']:>8.0%}"
            )


if __name__ == "__main__":
    sys.exit(main())
