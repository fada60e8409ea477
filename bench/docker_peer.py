"""The Docker peer: `docker run --rm` of python3 -c pass on the base image,
against a private Docker daemon that this module starts and stops.

The daemon is Debian's dockerd (package docker.io) with its own data root,
exec root, socket, pid file, config file and cgroup parent, no bridge and
no iptables rules, so it neither touches the host's network nor meets a
Docker daemon that may already run here. The base image's root filesystem
is imported as one image layer (`tar -c | docker import`); each run is
timed from the docker client's spawn to its exit, with a pause between
runs. stop() leaves nothing behind: no dockerd, containerd or shim
process, no mount under its folders, no folder, no cgroup.

    /work/main/.venv/bin/python bench/docker_peer.py --image PATH \\
        --runs 20 --pause 0.2

Importable: measure(image, runs, pause) returns a list of seconds per run,
or a string saying why the peer cannot run here (the contract of
bench/peers.py).
"""

import argparse
import errno
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

from peers import summarize

log = logging.getLogger(__name__)

TAG = "sockworker-bench-base"
COMMAND = ["/usr/bin/python3", "-c", "pass"]
STATE_BASE = "/var/lib/sockworker-bench"
RUN_BASE = "/run/sockworker-bench"
# The client that matches Debian's daemon first; a newer one negotiates
# the API version down but pays for it on every call.
CLIENTS = ("/usr/bin/docker", "/usr/local/bin/docker")
START_SECONDS = 60
STOP_SECONDS = 30
GONE_SECONDS = 10
RUN_TIMEOUT = 60
IMPORT_TIMEOUT = 600
# Folders dockerd and containerd make at fixed paths whatever their roots:
# the plugin discovery folder and the shims' socket folder. Removed after
# the run when this run made them and they are empty again.
FIXED_DIRS = ("/run/docker/plugins", "/run/docker", "/run/containerd/s")
FIXED_DIRS += ("/run/containerd",)


class DockerError(Exception):
    """The private daemon could not be started or used; the message names
    the step and carries the daemon's or client's own words."""


def find_client():
    for path in CLIENTS:
        if os.access(path, os.X_OK):
            return path
    return shutil.which("docker")


def unavailable_reason(image):
    if shutil.which("dockerd") is None:
        return "dockerd is not installed (apt-get install docker.io)"
    if find_client() is None:
        return "the docker client is not installed (apt-get install docker.io)"
    if os.geteuid() != 0:
        return "dockerd needs root"
    python = os.path.join(image, COMMAND[0].lstrip("/"))
    if not os.path.lexists(python):
        return f"image {image} has no {COMMAND[0]}"
    return None


class DockerDaemon:
    """A dockerd of our own for one benchmark run.

    Guarantees: after start() returns, the daemon answers on its socket;
    stop() may be called in any state, more than once, and afterwards no
    process, mount, folder or cgroup of this daemon remains (it returns
    what it had to remove by force, for the report).
    """

    def __init__(self, state_base=STATE_BASE, run_base=RUN_BASE):
        name = f"docker-{os.getpid()}"
        self.state_base = state_base
        self.run_base = run_base
        self.state_dir = os.path.join(state_base, name)
        self.run_dir = os.path.join(run_base, name)
        self.socket = os.path.join(self.run_dir, "docker.sock")
        self.pidfile = os.path.join(self.run_dir, "dockerd.pid")
        self.log_path = os.path.join(self.state_dir, "dockerd.log")
        # Relative: runc places it under the daemon's own cgroup in every
        # hierarchy, so it stays inside a delegated subtree.
        self.cgroup_parent = f"swbench-docker-{os.getpid()}"
        self.client = find_client()
        self.proc = None
        self.log_file = None
        self.fixed_dirs_made = []

    # -- start ------------------------------------------------------------

    def start(self):
        self.make_dirs()
        self.write_config()
        self.note_fixed_dirs()
        self.spawn_daemon()
        self.wait_ready()
        return self

    def make_dirs(self):
        for path in (self.state_dir, self.run_dir):
            os.makedirs(path, mode=0o700)

    def write_config(self):
        """A config file of our own, so /etc/docker/daemon.json is not
        read and the daemon's key is not written to /etc/docker."""
        config = {"deprecated-key-path": os.path.join(self.state_dir, "key")}
        with open(self.config_path, "w", encoding="utf-8") as f:
            json.dump(config, f)

    @property
    def config_path(self):
        return os.path.join(self.state_dir, "daemon.json")

    def note_fixed_dirs(self):
        self.fixed_dirs_made = [
            path for path in FIXED_DIRS if not os.path.lexists(path)
        ]

    def daemon_argv(self):
        return [
            shutil.which("dockerd"),
            "--config-file",
            self.config_path,
            "--data-root",
            os.path.join(self.state_dir, "data"),
            "--exec-root",
            os.path.join(self.run_dir, "exec"),
            "-H",
            f"unix://{self.socket}",
            "--pidfile",
            self.pidfile,
            "--cgroup-parent",
            self.cgroup_parent,
            "--bridge=none",
            "--iptables=false",
            "--ip6tables=false",
        ]

    def spawn_daemon(self):
        self.log_file = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.daemon_argv(),
            stdin=subprocess.DEVNULL,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.info(
            "dockerd started, pid %d, socket %s", self.proc.pid, self.socket
        )

    def wait_ready(self):
        deadline = time.monotonic() + START_SECONDS
        while True:
            if self.proc.poll() is not None:
                raise DockerError(
                    f"start dockerd: exited with status "
                    f"{self.proc.returncode}: {self.log_tail()}"
                )
            if os.path.exists(self.socket):
                result = self.docker("version", timeout=10, check=False)
                if result.returncode == 0:
                    return
            if time.monotonic() > deadline:
                raise DockerError(
                    f"start dockerd: no answer on {self.socket} after "
                    f"{START_SECONDS} s: {self.log_tail()}"
                )
            time.sleep(0.1)

    def log_tail(self, size=600):
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - size))
                return f.read().decode(errors="replace").strip()
        except FileNotFoundError:
            return "(no daemon log)"

    # -- the client -------------------------------------------------------

    def client_env(self):
        env = dict(os.environ)
        # The client's own config (auths, contexts) stays in our folder.
        env["DOCKER_CONFIG"] = os.path.join(self.state_dir, "client")
        env.pop("DOCKER_HOST", None)
        env.pop("DOCKER_CONTEXT", None)
        return env

    def docker_argv(self, *args):
        return [self.client, "-H", f"unix://{self.socket}", *args]

    def docker(self, *args, timeout=RUN_TIMEOUT, check=True, stdin=None):
        argv = self.docker_argv(*args)
        try:
            result = subprocess.run(
                argv,
                stdin=stdin if stdin is not None else subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                env=self.client_env(),
            )
        except subprocess.TimeoutExpired as e:
            raise DockerError(
                f"docker {' '.join(args)}: no exit after {timeout} s"
            ) from e
        if check and result.returncode != 0:
            raise DockerError(
                f"docker {' '.join(args)}: exit status {result.returncode}:"
                f" {(result.stderr or result.stdout).strip()[-500:]}"
            )
        return result

    def import_image(self, image, tag=TAG):
        """Import image's root filesystem as tag, one layer."""
        tar = subprocess.Popen(
            ["tar", "-C", image, "-c", "."],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            self.docker(
                "import", "-", tag, timeout=IMPORT_TIMEOUT, stdin=tar.stdout
            )
        finally:
            tar.stdout.close()
            tar_err = tar.stderr.read().decode(errors="replace").strip()
            tar.stderr.close()
            status = tar.wait()
        if status != 0:
            raise DockerError(
                f"tar -C {image} -c .: exit status {status}: {tar_err[-500:]}"
            )

    def run_argv(self, tag=TAG):
        return self.docker_argv(
            "run", "--rm", "--network", "none", tag, *COMMAND
        )

    def time_run(self, tag=TAG):
        """Seconds of one `docker run --rm`, spawn to exit."""
        argv = self.run_argv(tag)
        env = self.client_env()
        started = time.perf_counter()
        result = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            env=env,
        )
        elapsed = time.perf_counter() - started
        if result.returncode != 0:
            raise DockerError(
                f"docker run --rm {tag} {' '.join(COMMAND)}: exit status "
                f"{result.returncode}: {result.stderr.strip()[-500:]}"
            )
        return elapsed

    def versions(self):
        result = self.docker(
            "version", "--format", "{{.Client.Version}} {{.Server.Version}}"
        )
        client, _, server = result.stdout.strip().partition(" ")
        return {
            "client": self.client,
            "client_version": client,
            "daemon_version": server,
        }

    # -- stop -------------------------------------------------------------

    def stop(self):
        """Stop the daemon and remove everything it made; returns a list
        of what had to be removed by force (empty after a clean stop)."""
        forced = []
        self.stop_daemon(forced)
        self.kill_strays(forced)
        self.unmount_all(forced)
        self.remove_cgroups(forced)
        self.remove_dirs()
        if self.log_file is not None:
            self.log_file.close()
            self.log_file = None
        return forced

    def stop_daemon(self, forced):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            forced.append(f"dockerd {self.proc.pid} ignored SIGTERM")
            self.proc.kill()
            self.proc.wait()

    def our_processes(self):
        """Live processes whose command line names our folders: the
        daemon's containerd (its own session) and any shim."""
        found = []
        marks = (self.state_dir.encode(), self.run_dir.encode())
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    cmdline = f.read()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if any(mark in cmdline for mark in marks):
                found.append(int(name))
        return found

    def kill_strays(self, forced):
        deadline = time.monotonic() + GONE_SECONDS
        while self.our_processes() and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid in self.our_processes():
            forced.append(f"process {pid} of the daemon still running")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def our_mounts(self):
        points = []
        with open("/proc/self/mountinfo", encoding="utf-8") as f:
            for line in f:
                point = line.split()[4].replace("\\040", " ")
                if any(
                    point == top or point.startswith(top + "/")
                    for top in (self.state_dir, self.run_dir)
                ):
                    points.append(point)
        return points

    def unmount_all(self, forced):
        # Deepest first; lazily, since a process may still be leaving.
        for point in sorted(self.our_mounts(), key=len, reverse=True):
            forced.append(f"mount {point} left by the daemon")
            result = subprocess.run(
                ["umount", "--lazy", point], capture_output=True, text=True
            )
            if result.returncode != 0:
                log.warning("umount %s: %s", point, result.stderr.strip())

    def our_cgroups(self):
        found = []
        for top, dirs, _ in os.walk("/sys/fs/cgroup"):
            if os.path.basename(top) == self.cgroup_parent:
                found.append(top)
                dirs[:] = []
            elif top.count("/") > 8:
                dirs[:] = []
        return found

    def remove_cgroups(self, forced):
        """rmdir the cgroup parent in every hierarchy; runc removed each
        container's own cgroup below it already."""
        for top in self.our_cgroups():
            for path, _, _ in sorted(
                os.walk(top), key=lambda w: len(w[0]), reverse=True
            ):
                if path != top:
                    forced.append(f"cgroup {path} left by a container")
                try:
                    os.rmdir(path)
                except OSError as e:
                    if e.errno != errno.ENOENT:
                        raise DockerError(
                            f"remove cgroup {path}: {e.strerror}"
                        ) from e

    def remove_dirs(self):
        for path in (self.state_dir, self.run_dir):
            shutil.rmtree(path, ignore_errors=True)
            if os.path.lexists(path):
                raise DockerError(f"remove {path}: still there after rmtree")
        for path in (self.state_base, self.run_base, *self.fixed_dirs_made):
            remove_if_empty(path)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        forced = self.stop()
        if forced:
            log.warning("docker peer cleanup: %s", "; ".join(forced))


def remove_if_empty(path):
    try:
        os.rmdir(path)
    except OSError as e:
        # Someone else's files are in it, or it is gone already.
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            raise


def measure(image, runs=20, pause=0.2, warmup=1, details=None):
    """Seconds per `docker run --rm` of COMMAND on image, or why it
    cannot run. The daemon lives only for this call. A details dict, if
    given, receives the client and daemon versions and what stop() had
    to remove by force."""
    details = {} if details is None else details
    reason = unavailable_reason(image)
    if reason:
        return reason
    daemon = DockerDaemon()
    try:
        daemon.start()
        details.update(daemon.versions())
        started = time.perf_counter()
        daemon.import_image(image)
        details["import_s"] = round(time.perf_counter() - started, 2)
        times = []
        for index in range(warmup + runs):
            time.sleep(pause)
            elapsed = daemon.time_run()
            if index >= warmup:
                times.append(elapsed)
        return times
    except (DockerError, OSError) as e:
        return f"docker: {e}"
    finally:
        details["leftovers"] = daemon.stop()
        if details["leftovers"]:
            log.warning(
                "docker peer cleanup: %s", "; ".join(details["leftovers"])
            )


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Time docker run --rm of python3 -c pass on a private "
        "dockerd."
    )
    parser.add_argument("--image", required=True, help="root filesystem")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--pause", type=float, default=0.2)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.pause < 0:
        parser.error("--runs must be at least 1 and --pause not negative")
    if not os.path.isdir(args.image):
        parser.error(f"--image {args.image}: no such directory")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = measure(args.image, args.runs, args.pause)
    if isinstance(result, str):
        print(f"docker: unavailable: {result}")
        return 1
    s = summarize(result)
    print(
        f"docker run --rm: {s['runs']} runs, median {s['median_ms']:.1f} ms,"
        f" p95 {s['p95_ms']:.1f} ms, min {s['min_ms']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
