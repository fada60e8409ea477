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
import subprocess
import sys
import tempfile
import time

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


def start_worker(tmp, images_dir):
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
        "max_instances_per_lambda": int(
            os.environ.get("BENCH_INSTANCES", "4")
        ),
    }
    path = os.path.join(tmp, "config.json")
    with open(path, "w") as f:
        json.dump(config, f)
    proc = subprocess.Popen(
        [PYTHON, os.path.join(TOP, "bin", "worker"), "--config", path],
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
    return proc, port


def start_bare():
    port = free_port()
    proc = subprocess.Popen(
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
        stdout=subprocess.DEVNULL,
    )
    wait_for_port(port, proc)
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
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument(
        "--connections", type=int, nargs="+", default=[1, 8, 64]
    )
    parser.add_argument(
        "--images-dir",
        default=os.environ.get(
            "SOCKWORKER_IMAGES_DIR", "/var/lib/sockworker/images"
        ),
    )
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = {}
    with tempfile.TemporaryDirectory(prefix="sockworker-warm-") as tmp:
        script = os.path.join(tmp, "post.lua")
        with open(script, "w") as f:
            f.write(WRK_SCRIPT)
        for name, start in (
            ("bare falcon", start_bare),
            ("sockworker", lambda: start_worker(tmp, args.images_dir)),
        ):
            proc, port = start()
            try:
                # One request first, so the lambda's sandbox exists.
                run_wrk(port, 1, 1, script)
                results[name] = {
                    str(c): run_wrk(port, c, args.seconds, script)
                    for c in args.connections
                }
            finally:
                stop(proc)
    print_table(results, args.connections)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


def print_table(results, connections):
    print(
        f"{'server':<12} {'conns':>5} {'req/s':>8} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'of bare':>8}"
    )
    for name, rows in results.items():
        for c in connections:
            row = rows[str(c)]
            bare = results["bare falcon"][str(c)]["rps"]
            print(
                f"{name:<12} {c:>5} {row['rps']:>8} {row['p50_ms']:>8} "
                f"{row['p99_ms']:>8} {row['rps'] / bare:>8.0%}"
            )


if __name__ == "__main__":
    sys.exit(main())
