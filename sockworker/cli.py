"""bin/worker: load the config, prepare the machine, serve HTTP.

Process model: gunicorn's master process holds the state-directory lock
and does the start-up and final sweeps; one gunicorn worker process (gthread,
`http_threads` threads) owns the lambda manager and every sandbox, so the
manager's state has exactly one owner. If that process dies, the master
starts another, which sweeps what the dead one left before serving.
"""

import argparse
import fcntl
import logging
import os
import signal
import socket
import sys

from gunicorn.app.base import BaseApplication
from gunicorn.arbiter import Arbiter
from gunicorn.workers.gthread import ThreadWorker

from sockworker.config import ConfigError, load_config

log = logging.getLogger("sockworker")

EXIT_CONFIG = 2
DOCKER_SOCKET = "/var/run/docker.sock"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s"


class StartupError(Exception):
    """The worker cannot start; the message says why and what to do."""


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="worker", description="Run a sockworker worker node."
    )
    parser.add_argument(
        "--config", default="config.json", help="path of the JSON config"
    )
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        config = load_config(args.config)
        check_sandbox_backend(config)
    except (ConfigError, StartupError) as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(config.log_output)
    try:
        lock = lock_state_dir(config.state_dir)
    except StartupError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    image_path = None
    try:
        image_path = prepare_image(config)
        WorkerApplication(config, image_path).run()
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except StartupError as exc:
        print(f"worker: {exc}", file=sys.stderr)
        return 1
    finally:
        final_sweep(config, image_path)
        os.close(lock)
    return 0


def check_sandbox_backend(config):
    """Only the sock backend exists in this version; say so clearly."""
    if config.sandbox == "sock":
        return
    if not docker_reachable():
        raise StartupError(
            f'sandbox "docker" needs a Docker daemon at {DOCKER_SOCKET} and '
            'none answers; start dockerd or set "sandbox": "sock"'
        )
    raise StartupError(
        'sandbox "docker" is not available in this version of sockworker; '
        'set "sandbox": "sock"'
    )


def docker_reachable():
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        try:
            sock.connect(DOCKER_SOCKET)
        except OSError:
            return False
    return True


def configure_logging(log_output):
    if log_output == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.FileHandler(log_output)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    # PERF: the access log writes a line per request. Per the logging
    # HOWTO's optimisation notes, skip the caller lookup (a stack walk per
    # record) and the thread and multiprocessing fields, which the format
    # does not use; under load this halves the cost of a log line.
    logging._srcfile = None
    logging.logThreads = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def lock_state_dir(state_dir):
    """An exclusive lock on the state directory, held for the worker's
    life; a second worker on the same directory refuses to start."""
    os.makedirs(state_dir, mode=0o755, exist_ok=True)
    path = os.path.join(state_dir, "worker.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        raise StartupError(
            f"another worker (pid {holder or 'unknown'}) is using state "
            f"directory {state_dir}; stop it or choose another state_dir"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def prepare_image(config):
    from sockworker.image import BaseImage, ImageBuildError

    image = BaseImage(config.images_path)
    try:
        return image.ensure(progress=True)
    except ImageBuildError as exc:
        raise StartupError(f"base image: {exc}") from exc


def make_backend(config, image_path):
    from sockworker.sandbox.backend import SockBackend
    from sockworker.sandbox.cgroups import Limits

    limits = Limits(
        memory_bytes=config.memory_mb << 20,
        pids=config.max_procs,
        cpu_weight=config.cpu_weight,
    )
    return SockBackend(
        config.state_dir,
        image_path,
        limits,
        network=config.network,
        import_cache=config.import_cache,
    )


def final_sweep(config, image_path):
    """After gunicorn stops: remove anything a killed gunicorn worker
    process could not destroy itself."""
    from sockworker.runtime import make_package_store

    try:
        backend = make_backend(config, image_path=None)
        backend.sweep()
        backend.close()
        if image_path is not None:
            make_package_store(config, image_path).sweep()
    except Exception:
        log.exception("final sweep of %s failed", config.state_dir)


class DrainingThreadWorker(ThreadWorker):
    """gthread, with two changes for a drain at shutdown.

    Once it stops accepting it closes its listening sockets too. The
    master has closed its copies already; with ours open, the kernel would
    keep queueing new connections that nobody accepts until the drain
    ends, and then reset them. Closed, they are refused at once and a
    client or load balancer can go elsewhere.

    From SIGTERM on, a request that still reaches the app, on a
    connection kept alive from before, gets 503 instead of a sandbox,
    while the running ones finish.
    """

    def handle_exit(self, sig, frame):
        runtime = getattr(self.app, "runtime", None)
        if runtime is not None:
            runtime.manager.refuse_new()
        super().handle_exit(sig, frame)

    def set_accept_enabled(self, enabled):
        super().set_accept_enabled(enabled)
        if not enabled and not self.alive:
            for listener in self.sockets:
                listener.close()


class DrainingArbiter(Arbiter):
    """SIGINT drains in-flight requests like SIGTERM instead of dropping
    them: a worker node behind a load balancer stops the same way
    whichever signal it gets."""

    def handle_int(self):
        self.handle_term()


class WorkerApplication(BaseApplication):
    """gunicorn embedding: settings from the config, the app built in the
    gunicorn worker process (after fork), never in the master."""

    def __init__(self, config, image_path):
        self.config = config
        self.image_path = image_path
        self.runtime = None
        super().__init__()

    def load_config(self):
        config = self.config
        settings = {
            "bind": [f"{config.worker_host}:{config.worker_port}"],
            "workers": 1,
            "worker_class": DrainingThreadWorker,
            # gunicorn's control socket lives in $HOME, shared by every
            # worker on the host, and can change the worker count, which
            # would break the one-owner model above.
            "control_socket_disable": True,
            "threads": config.http_threads,
            "graceful_timeout": int(config.timeout_seconds) + 5,
            "timeout": 30,
            "accesslog": None,
            "errorlog": "-"
            if config.log_output == "stdout"
            else config.log_output,
            "loglevel": "info",
            "proc_name": "sockworker",
            "when_ready": self.when_ready,
            "worker_exit": self.worker_exit,
        }
        for key, value in settings.items():
            self.cfg.set(key, value)

    def load(self):
        from sockworker.runtime import Runtime

        self.runtime = Runtime(self.config, self.image_path)
        return self.runtime.start()

    def run(self):
        try:
            DrainingArbiter(self).run()
        except RuntimeError as exc:
            raise StartupError(str(exc)) from exc

    def when_ready(self, server):
        config = self.config
        print(
            f"sockworker listening on http://{config.worker_host}:"
            f"{config.worker_port} (sandbox {config.sandbox}, state "
            f"{config.state_dir})",
            flush=True,
        )

    def worker_exit(self, server, worker):
        if self.runtime is not None:
            self.runtime.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())
