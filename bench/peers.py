"""Cold starts of the peers: `crun run` and `runc run` of python3 -c pass.

Both runtimes start the same base image root filesystem that sockworker's
sandboxes use, from an OCI bundle whose config.json is written here
(read-only root; pid, ipc, uts, mount and network namespaces; the usual
/proc, /dev, /sys mounts of a default OCI spec; no terminal). Each run is
timed from the runtime's spawn to its exit, with a pause between runs so
that no start rides on the previous one's warm state.

    /work/main/.venv/bin/python bench/peers.py --image PATH --runs 20 \\
        --pause 0.2

Importable: measure_crun(), measure_runc() and measure() return a list of
seconds per run, or a string saying why the peer cannot run here.
"""

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

# Where bin/setup builds the base image, unless the environment says.
DEFAULT_IMAGES_DIR = os.environ.get(
    "SOCKWORKER_IMAGES_DIR", "/var/lib/sockworker/images"
)
RUNNER = Path(__file__).resolve().with_name("peer_runner.py")
CGROUP2_MOUNT = "/sys/fs/cgroup/unified"
COMMAND = ["/usr/bin/python3", "-c", "pass"]
# Per run: the runtime's start plus the pause, with a wide margin for a
# loaded machine; a runner that exceeds it is stuck.
RUN_TIMEOUT = 10


def oci_config(image):
    """The bundle's config.json: a default OCI spec (as `crun spec` would
    write it) running COMMAND on `image`, minus the cgroup mount."""
    no_exec = ["nosuid", "noexec", "nodev"]
    caps = ["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": COMMAND,
            "env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"],
            "cwd": "/",
            "capabilities": {
                "bounding": caps,
                "effective": caps,
                "permitted": caps,
                "ambient": caps,
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": True,
        },
        "root": {"path": os.path.abspath(image), "readonly": True},
        "hostname": "peer",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {
                "destination": "/dev",
                "type": "tmpfs",
                "source": "tmpfs",
                "options": ["nosuid", "strictatime", "mode=755", "size=64k"],
            },
            {
                "destination": "/dev/pts",
                "type": "devpts",
                "source": "devpts",
                "options": [
                    "nosuid",
                    "noexec",
                    "newinstance",
                    "ptmxmode=0666",
                    "mode=0620",
                ],
            },
            {
                "destination": "/dev/shm",
                "type": "tmpfs",
                "source": "shm",
                "options": no_exec + ["mode=1777", "size=65536k"],
            },
            {
                "destination": "/dev/mqueue",
                "type": "mqueue",
                "source": "mqueue",
                "options": no_exec,
            },
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": no_exec + ["ro"],
            },
        ],
        "linux": {
            "resources": {"devices": [{"allow": False, "access": "rwm"}]},
            "namespaces": [
                {"type": kind}
                for kind in ("pid", "ipc", "uts", "mount", "network")
            ],
            "maskedPaths": [
                "/proc/acpi",
                "/proc/kcore",
                "/proc/keys",
                "/proc/latency_stats",
                "/proc/timer_list",
                "/proc/sched_debug",
                "/sys/firmware",
            ],
            "readonlyPaths": [
                "/proc/bus",
                "/proc/fs",
                "/proc/irq",
                "/proc/sys",
                "/proc/sysrq-trigger",
            ],
        },
    }


def write_bundle(image, bundle_dir):
    """Write config.json for `image` into bundle_dir; return bundle_dir."""
    path = os.path.join(bundle_dir, "config.json")
    with open(path, "w", encoding="utf-8") as f:
        json.dump(oci_config(image), f, indent=1)
    return bundle_dir


def measure_crun(image, runs=20, pause=0.2):
    return measure("crun", image, runs, pause)


def measure_runc(image, runs=20, pause=0.2):
    return measure("runc", image, runs, pause)


def measure(peer, image, runs=20, pause=0.2):
    """Seconds per `PEER run` of COMMAND on image, or why it cannot run."""
    reason = unavailable_reason(peer, image)
    if reason:
        return reason
    bundle = tempfile.mkdtemp(prefix=f"sockworker-peer-{peer}-")
    try:
        write_bundle(image, bundle)
        return run_runner(peer, bundle, runs, pause)
    finally:
        shutil.rmtree(bundle)


def unavailable_reason(peer, image):
    if shutil.which(peer) is None:
        return f"{peer} is not installed (apt-get install {peer})"
    if os.geteuid() != 0:
        return f"{peer} run needs root"
    python = os.path.join(image, COMMAND[0].lstrip("/"))
    if not os.path.lexists(python):
        return f"image {image} has no {COMMAND[0]}"
    if needs_cgroup2_mask(peer) and shutil.which("unshare") is None:
        return "unshare is not installed (apt-get install util-linux)"
    return None


def needs_cgroup2_mask(peer):
    """crun refuses a hybrid layout (v1 controllers plus a v2 mount);
    runc accepts it."""
    return peer == "crun" and os.path.ismount(CGROUP2_MOUNT)


def run_runner(peer, bundle, runs, pause):
    runner = [
        sys.executable,
        str(RUNNER),
        "--runtime",
        shutil.which(peer),
        "--bundle",
        bundle,
        "--runs",
        str(runs),
        "--pause",
        str(pause),
        "--id-prefix",
        f"sockworker-peer-{peer}-{os.getpid()}",
    ]
    if needs_cgroup2_mask(peer):
        # One namespace for the whole loop: unshare's own start stays out
        # of the timings.
        runner = ["unshare", "--mount", "--propagation", "private"] + runner
        runner.append("--mask-cgroup2")
    timeout = 30 + (runs + 1) * (RUN_TIMEOUT + pause)
    try:
        result = subprocess.run(
            runner,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return f"{peer}: runner took more than {timeout:.0f} s"
    try:
        report = json.loads(result.stdout)
    except json.JSONDecodeError:
        return (
            f"{peer}: runner failed (exit {result.returncode}):"
            f" {result.stderr.strip()[-500:]}"
        )
    return report.get("times") or report.get("error", "no result")


def summarize(times):
    """median, p95 (nearest rank) and min, in milliseconds."""
    ordered = sorted(times)
    p95 = ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]
    return {
        "runs": len(ordered),
        "median_ms": statistics.median(ordered) * 1000,
        "p95_ms": p95 * 1000,
        "min_ms": ordered[0] * 1000,
    }


def format_table(results):
    lines = [
        f"{'peer':6} {'runs':>4} {'median ms':>10} {'p95 ms':>8} {'min ms':>8}"
    ]
    for peer, result in results.items():
        if isinstance(result, str):
            lines.append(f"{peer:6} {'-':>4}  unavailable: {result}")
            continue
        s = summarize(result)
        lines.append(
            f"{peer:6} {s['runs']:>4} {s['median_ms']:>10.1f}"
            f" {s['p95_ms']:>8.1f} {s['min_ms']:>8.1f}"
        )
    return "\n".join(lines)


def add_images_dir(parser):
    parser.add_argument(
        "--images-dir",
        default=DEFAULT_IMAGES_DIR,
        help="where the base image is (or is built)",
    )


def cold_start_parser(doc, runs=50):
    """An argument parser for a script documented by `doc` that takes
    what every cold-start benchmark here takes: --runs, --pause and
    --images-dir."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--runs", type=int, default=runs)
    parser.add_argument(
        "--pause", type=float, default=0.2, help="seconds between runs"
    )
    add_images_dir(parser)
    return parser


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time crun and runc starting python3 -c pass."
    )
    parser.add_argument(
        "--image", required=True, help="root filesystem (the base image)"
    )
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument(
        "--pause", type=float, default=0.2, help="seconds between runs"
    )
    parser.add_argument(
        "--peer",
        action="append",
        choices=["crun", "runc"],
        help="only this peer (repeatable; default: both)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print raw times as JSON"
    )
    args = parser.parse_args(argv)
    if args.runs < 1 or args.pause < 0:
        parser.error("--runs must be at least 1 and --pause not negative")
    if not os.path.isdir(args.image):
        parser.error(f"--image {args.image}: no such directory")

    results = {
        peer: measure(peer, args.image, args.runs, args.pause)
        for peer in args.peer or ["crun", "runc"]
    }
    if args.json:
        print(json.dumps(results, indent=1))
    else:
        print(format_table(results))
    return 0 if all(isinstance(r, list) for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
