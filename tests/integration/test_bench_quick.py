"""bench/run --quick end to end: the whole harness runs, every row of the
report has either numbers or the reason it has none, the figures are PNG
files, and the run leaves no mount, cgroup, folder or process behind.

What the numbers are is not checked here: that is what the benchmark is
for.
"""

import json
import os
import subprocess
import time

import pytest

from tests.conftest import IMAGES_DIR, mount_points, sockworker_cgroups

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOP = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))
BENCH_RUN = os.path.join(TOP, "bench", "run")
# The quick mode aims at two minutes; the limit leaves room for a loaded
# machine without letting a hung run block the suite.
TIMEOUT = 300
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLD_ROWS = {
    "sockworker",
    "sockworker_cache",
    "numpy",
    "numpy_fresh",
    "sandbox",
    "http_floor",
    "crun",
    "runc",
    "docker",
}
FIGURES = ("cold_start.png", "warm_path.png", "scale.png")
STEP_LABELS = (
    "manager: run",
    "registry: pull the code",
    "read the registry folder",
    "unpack into the code cache",
    "manager: get an instance",
    "zygote cache: create",
    "take the prepared child",
    "child says ready",
    "mount the root",
    "send go (with the mount)",
    "connect to the sandbox",
    "first request, start included",
)


def cgroup_trees(results):
    """Every worker cgroup tree name the report records."""
    if isinstance(results, dict):
        found = [results["cgroup_tree"]] if "cgroup_tree" in results else []
        for value in results.values():
            found += cgroup_trees(value)
        return found
    if isinstance(results, list):
        return [tree for value in results for tree in cgroup_trees(value)]
    return []


def cgroups_of_docker_peer():
    found = []
    for top, dirs, _ in os.walk("/sys/fs/cgroup"):
        if os.path.basename(top).startswith("swbench-docker-"):
            found.append(top)
            dirs[:] = []
        elif top.count("/") > 8:
            dirs[:] = []
    return found


def processes_naming(marks):
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmdline = f.read()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if any(mark.encode() in cmdline for mark in marks):
            found.append(int(name))
    return found


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, base_image):
    """Run bench/run --quick once for the module; yields (output folder,
    stdout, the suite's pid) and checks for leftovers afterwards."""
    tmp_path = tmp_path_factory.mktemp("bench")
    out = tmp_path / "out"
    mounts_before = set(mount_points())
    started = time.monotonic()
    proc = subprocess.Popen(
        [BENCH_RUN, "--quick", "--out", str(out), "--images-dir", IMAGES_DIR],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        pytest.fail(f"bench/run --quick ran over {TIMEOUT} s: {stderr}")
    print(f"bench/run --quick took {time.monotonic() - started:.0f} s")
    assert proc.returncode == 0, f"exit {proc.returncode}: {stderr[-3000:]}"

    yield out, stdout, proc.pid

    # bench/run execs the suite, so the docker peer's folders carry this
    # pid in their names.
    docker_dirs = [
        f"/run/sockworker-bench/docker-{proc.pid}",
        f"/var/lib/sockworker-bench/docker-{proc.pid}",
    ]
    assert [d for d in docker_dirs if os.path.lexists(d)] == []
    assert processes_naming(docker_dirs + [str(tmp_path)]) == []
    assert sorted(set(mount_points()) - mounts_before) == []
    # Other tests may run workers at the same time: look for exactly the
    # trees this run's workers had, and the docker peer's cgroup parent.
    with open(out / "results.json", encoding="utf-8") as f:
        trees = set(cgroup_trees(json.load(f)))
    assert trees, "the report names no worker cgroup tree"
    left = [p for p in sockworker_cgroups() if os.path.basename(p) in trees]
    assert left == []
    assert [
        p for p in cgroups_of_docker_peer() if p.endswith(f"-{proc.pid}")
    ] == []


def assert_numbers(row, *keys):
    for key in keys:
        assert isinstance(row.get(key), (int, float)), (key, row)
        assert row[key] >= 0, (key, row)


def assert_numbers_or_reason(row, *keys):
    if "reason" in row:
        assert isinstance(row["reason"], str) and row["reason"], row
    else:
        assert_numbers(row, *keys)


def test_quick_run_reports_every_row(quick_run):
    out, stdout, _ = quick_run
    with open(out / "results.json", encoding="utf-8") as f:
        results = json.load(f)
    table = (out / "table.txt").read_text(encoding="utf-8")
    assert table in stdout

    cold = results["cold_start"]
    assert set(cold) == COLD_ROWS
    for row in cold.values():
        assert_numbers_or_reason(row, "runs", "median_ms", "p95_ms")
        if "reason" in row:
            assert row["reason"] in table
        else:
            assert len(row["times_ms"]) == row["runs"] >= 1
            assert row["median_ms"] <= row["p95_ms"]
        assert row["label"] in table

    warm = results["warm_path"]
    if "reason" not in warm:
        assert set(warm["servers"]) == {"bare falcon", "sockworker"}
        for rows in warm["servers"].values():
            assert set(rows) == {str(c) for c in warm["connections"]}
            for row in rows.values():
                assert_numbers(row, "rps", "p50_ms", "p99_ms")
    else:
        assert warm["reason"] in table

    rate = results["scale"]["cold_start_rate"]
    if "reason" not in rate:
        clients = results["meta"]["settings"]["clients"]
        assert set(rate["levels"]) == {str(c) for c in clients}
        for level in rate["levels"].values():
            assert_numbers(level, "cold_starts_per_s", "median_ms", "p95_ms")
    density = results["scale"]["idle_density"]
    assert_numbers_or_reason(density, "created", "median_pss_mib")


def test_quick_run_draws_every_figure(quick_run):
    out, _, _ = quick_run
    for name in FIGURES:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > len(PNG_SIGNATURE), name


def test_breakdown_times_every_step(base_image):
    script = os.path.join(TOP, "bench", "breakdown.py")
    python = os.path.join(TOP, ".venv", "bin", "python")
    mounts_before = set(mount_points())
    cgroups_before = set(sockworker_cgroups())
    done = subprocess.run(
        [python, script, "--runs", "3", "--pause", "0.05"],
        env=dict(os.environ, SOCKWORKER_IMAGES_DIR=IMAGES_DIR),
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert done.returncode == 0, done.stderr[-3000:]

    rows = done.stdout.splitlines()[1:]
    assert [row[:44].strip() for row in rows] == list(STEP_LABELS)
    for row in rows:
        runs, median = row.split()[-2:]
        assert int(runs) >= 3 and float(median) > 0, row
    assert sorted(set(mount_points()) - mounts_before) == []
    assert sorted(set(sockworker_cgroups()) - cgroups_before) == []
