"""The parts of a serving worker, wired together: registry, sandbox
backend, lambda manager and the HTTP app. Built inside the gunicorn worker
process, torn down when it exits."""

import logging
import os

from sockworker.api.accesslog import buffered_sink_for_root_logger
from sockworker.api.app import create_app
from sockworker.manager import LambdaManager
from sockworker.packages import PackageStore, install_backend_factory
from sockworker.registry import Registry
from sockworker.stats import Stats

log = logging.getLogger(__name__)


class Runtime:
    def __init__(self, config, image_path):
        from sockworker.cli import make_backend

        self.config = config
        self.access_sink = None
        self.backend = make_backend(config, image_path)
        self.registry = Registry(
            config.registry,
            os.path.join(config.state_dir, "lambdas"),
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
        log.info("stopped")
        if self.access_sink is not None:
            self.access_sink.close()


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
