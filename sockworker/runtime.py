"""The parts of a serving worker, wired together: registry, sandbox
backend, lambda manager and the HTTP app. Built inside the gunicorn worker
process, torn down when it exits."""

import logging
import os
import shutil

from sockworker.api.accesslog import (
    buffered_sink_for_root_logger,
    unbuffer_root_logger,
)
from sockworker.api.app import create_app
from sockworker.manager import LambdaManager
from sockworker.packages import PackageStore, install_backend_factory
from sockworker.registry import Registry
from sockworker.sandbox import mounts, native
from sockworker.stats import Stats

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, config, image_path):
        from sockworker.cli import make_backend

        self.config = config
        self.access_sink = None
        code_cache = os.path.join(config.state_dir, "lambdas")
        # First: the mount namespace is the calling thread's alone, and no
        # other thread may exist yet.
        self.code_cache_mounted = mount_code_cache(
            code_cache, config.code_cache_mb
        )
        self.backend = make_backend(config, image_path)
        self.registry = Registry(
            config.registry,
            code_cache,
            refresh_seconds=config.registry_refresh_seconds,
            max_bytes=config.max_code_bytes,
        )
        self.packages = make_package_store(config, image_path)
        self.manager = LambdaManager(
            config, self.registry, self.backend, Stats(), self.packages
        )

    def start(self):
        """Sweep leftovers, start the manager; returns the WSGI app."""
        self.registry.sweep()
        self.packages.sweep()
        self.backend.start()
        self.manager.start()
        self.access_sink = buffered_sink_for_root_logger()
        return create_app(self.manager, self.config, self.access_sink)

    def stop(self):
        """Drain and destroy every sandbox, then the cgroup tree."""
        log.info("stopping: draining requests and destroying sandboxes")
        self.manager.shutdown(drain_seconds=self.config.timeout_seconds)
        self.backend.close()
        if self.code_cache_mounted:
            unmount_code_cache(self.registry.cache_dir)
        log.info("stopped")
        if self.access_sink is not None:
            unbuffer_root_logger(self.access_sink)
            self.access_sink.close()


def mount_code_cache(path, size_mb):
    """Unpacked lambda code in memory, in a tmpfs private to this process,
    unless size_mb is 0 or the mount fails (then it stays on disk).

    PERF: every cold start of a lambda never run before unpacks its code;
    measured in the worker here, the unpack's directories and files cost
    about 2 ms on ext4 and 0.4 ms on tmpfs. Code in memory is pulled again
    after a restart, which a local registry makes cheap.
    """
    if not size_mb:
        return False
    try:
        # Code unpacked to disk by an earlier worker would lie hidden
        # under the mount for good.
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path, 0o755, exist_ok=True)
        mounts.mount_private_tmpfs(path, size_mb << 20)
    except OSError as exc:
        log.warning(
            "code cache stays on disk in %s: mount a private tmpfs there: %s",
            path,
            exc,
        )
        return False
    log.info(
        "code cache: %d MiB tmpfs at %s, private to pid %d",
        size_mb,
        path,
        os.getpid(),
    )
    return True


def unmount_code_cache(path):
    """The tmpfs would go with this process anyway; unmounted here, it
    goes at once, whatever else of the process lingers."""
    try:
        native.umount2(path, native.MNT_DETACH)
    except OSError as exc:
        log.warning("unmount code cache %s: %s", path, exc.strerror)


def make_package_store(config, image_path):
    """The package store and the sandboxes that install into it; their
    state sits beside, not inside, the serving backend's, whose start-up
    sweep would otherwise remove install sandboxes."""
    return PackageStore(
        os.path.join(config.state_dir, "packages"),
        install_backend_factory(
            os.path.join(config.state_dir, "installs"), image_path
        ),
    )
