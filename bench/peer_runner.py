"""Time `RUNTIME run` of an OCI bundle, N times, and print JSON.

Run by bench/peers.py, not by hand. Standard library only: it may run under
any Python 3.11.

    peer_runner.py --runtime PATH --bundle DIR --runs N --pause S
                   --id-prefix ID [--mask-cgroup2]

With --mask-cgroup2 it must already be in a private mount namespace
(`unshare --mount --propagation private`): it mounts a tmpfs over
/sys/fs/cgroup/unified there, because crun refuses a hybrid cgroup layout
whose v2 hierarchy holds a controller, and then sees a plain v1 layout.

Prints {"times": [seconds, ...]} or {"error": "..."} on stdout; exits 0
either way unless its own arguments are wrong.
"""

import argparse
import json
import os
import subprocess
import sys
import time

CGROUP2_MOUNT = "/sys/fs/cgroup/unified"


class RunnerError(Exception):
    pass


def check_private_mount_namespace():
    """Refuse to mask cgroup2 in the host's mount namespace: every other
    program on the host would lose its view of the v2 hierarchy."""
    ours = os.readlink("/proc/self/ns/mnt")
    parents = os.readlink(f"/proc/{os.getppid()}/ns/mnt")
    if ours == parents:
        raise RunnerError(
            "mask cgroup2: not in a private mount namespace (run under"
            " `unshare --mount --propagation private`)"
        )


def mask_cgroup2():
    check_private_mount_namespace()
    result = subprocess.run(
        # No size limit: crun writes cgroup.procs and friends into it as
        # plain files, a few per container.
        ["mount", "-t", "tmpfs", "peer-mask", CGROUP2_MOUNT],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RunnerError(
            f"mount tmpfs over {CGROUP2_MOUNT}: {result.stderr.strip()}"
        )


def state_dir(runtime, container_id):
    """Where the runtime keeps a container's state (its default root)."""
    name = os.path.basename(runtime)
    return os.path.join("/run", name, container_id)


def delete_container(runtime, container_id):
    # `run` without --detach deletes the container when it exits; this is
    # for a run that failed or was interrupted half way.
    if not os.path.exists(state_dir(runtime, container_id)):
        return
    subprocess.run(
        [runtime, "delete", "-f", container_id],
        stdin=subprocess.DEVNULL,
        capture_output=True,
    )
    if os.path.exists(state_dir(runtime, container_id)):
        raise RunnerError(
            f"{runtime} delete -f {container_id}: state still in"
            f" {state_dir(runtime, container_id)}"
        )


def cgroup_mounts():
    """Mount points of real cgroup hierarchies (not a tmpfs mask)."""
    fstypes = {}
    with open("/proc/self/mountinfo", encoding="utf-8") as f:
        for line in f:
            fields = line.split()
            # A later line is mounted on top of an earlier one at the same
            # point: the mask hides the cgroup2 mount under it.
            fstypes[fields[4]] = fields[fields.index("-") + 1]
    return [
        point
        for point, fstype in fstypes.items()
        if fstype in ("cgroup", "cgroup2")
    ]


def remove_cgroups(container_id):
    """rmdir the container's cgroups that a failed start left behind (a
    clean run removes them itself)."""
    for mount in cgroup_mounts():
        path = os.path.join(mount, container_id)
        if not os.path.isdir(path):
            continue
        try:
            os.rmdir(path)
        except OSError as e:
            raise RunnerError(f"remove cgroup {path}: {e.strerror}") from e


def run_once(runtime, bundle, container_id):
    argv = [runtime, "run", "--bundle", bundle, container_id]
    started = time.perf_counter()
    result = subprocess.run(
        argv, stdin=subprocess.DEVNULL, capture_output=True, text=True
    )
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        output = (result.stderr or result.stdout).strip()
        raise RunnerError(
            f"{' '.join(argv)}: exit status {result.returncode}: {output}"
        )
    return elapsed


def run_all(args):
    times = []
    for index in range(args.warmup + args.runs):
        container_id = f"{args.id_prefix}-{index}"
        try:
            elapsed = run_once(args.runtime, args.bundle, container_id)
        finally:
            delete_container(args.runtime, container_id)
            remove_cgroups(container_id)
        if index >= args.warmup:
            times.append(elapsed)
        time.sleep(args.pause)
    return times


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runtime", required=True)
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--runs", type=int, required=True)
    parser.add_argument("--pause", type=float, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--id-prefix", required=True)
    parser.add_argument("--mask-cgroup2", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        if args.mask_cgroup2:
            mask_cgroup2()
        report = {"times": run_all(args)}
    except (RunnerError, OSError) as e:
        report = {"error": str(e)}
    json.dump(report, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
