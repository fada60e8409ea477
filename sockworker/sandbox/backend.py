"""The sock backend: makes SOCK containers for lambda code, and finds and
removes what an earlier worker on the same state directory left behind.

Everything a sandbox owns has a name the backend can find again: its
directory <state>/sandboxes/<id>/ and its cgroups <start>/<tree>/<id> in
every hierarchy, where <tree> is derived from the state directory. Mounts
live only in the sandbox's private mount namespace and vanish with its
processes, so killing the cgroups' processes and removing the directories
is a complete sweep.
"""

import collections
import dataclasses
import hashlib
import logging
import os
import shutil
import threading
import time

from sockworker.sandbox import cgroups
from sockworker.sandbox.container import (
    Container,
    ContainerSpec,
    SandboxError,
    new_sandbox_id,
)
from sockworker.sandbox.runtime import install_guest_layer

log = logging.getLogger(__name__)

REFILL_DELAY = 0.05


def tree_name(state_dir):
    """The cgroup tree name for a state directory: stable across restarts,
    distinct between workers with different state directories."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode())
    return "sockworker-" + digest.hexdigest()[:8]


class SockBackend:
    """Creates containers; owns the cgroup tree and the sandboxes folder.

    Guarantees: sweep() leaves no process, cgroup or sandbox directory of
    an earlier worker on this state directory; close() destroys the
    prepared sandboxes and the tree (the caller destroys its containers
    first).

    PERF: a spawner thread keeps `prepared` sandboxes ready (cgroups
    joined, namespaces entered) so that a cold start pays only for the
    root filesystem and the guest's start; joining a v1 cgroup on demand
    can stall for an RCU grace period.
    """

    def __init__(
        self,
        state_dir,
        image_path,
        limits,
        network="none",
        scratch_bytes=64 << 20,
        layout=None,
        prepared=2,
        import_cache=False,
        zygote_memory_bytes=256 << 20,
        zygote_keep_seconds=300.0,
    ):
        self.state_dir = state_dir
        self.sandboxes_dir = os.path.join(state_dir, "sandboxes")
        self.image_path = image_path
        self.spec = ContainerSpec(
            limits=limits, network=network, scratch_bytes=scratch_bytes
        )
        self.layout = layout or cgroups.CgroupLayout.detect()
        self.tree = cgroups.CgroupTree(self.layout, tree_name(state_dir))
        self.guest_layer = None
        self.prepared_target = prepared
        self.ready = collections.deque()
        self.ready_lock = threading.Lock()
        self.wanted = threading.Event()
        self.closing = False
        self.spawner = None
        # Zygotes hold imported packages: a larger memory limit than a
        # sandbox's, the same pids and cpu limits.
        self.zygote_limits = dataclasses.replace(
            limits, memory_bytes=max(limits.memory_bytes, zygote_memory_bytes)
        )
        self.zygotes = None
        if import_cache:
            from sockworker.zygote.cache import ZygoteCache

            self.zygotes = ZygoteCache(self, zygote_keep_seconds)

    @property
    def network(self):
        return self.spec.network

    @network.setter
    def network(self, mode):
        self.spec = dataclasses.replace(self.spec, network=mode)
        self.discard_prepared()
        if self.zygotes is not None:
            # Zygotes live in the network namespace their sandboxes get.
            self.zygotes.reset()

    def start(self):
        """Sweep leftovers, then make the cgroup tree and guest layer and
        start filling the pool of prepared sandboxes."""
        self.sweep()
        os.makedirs(self.sandboxes_dir, mode=0o700, exist_ok=True)
        self.tree.create()
        self.guest_layer = install_guest_layer(
            os.path.join(self.state_dir, "runtime")
        )
        if self.prepared_target > 0:
            self.spawner = threading.Thread(
                target=self.keep_prepared,
                name="sockworker-spawner",
                daemon=True,
            )
            self.spawner.start()
            self.wanted.set()
        log.info("sock backend ready: %s", self.layout.describe())

    @property
    def zygote_spec(self):
        return dataclasses.replace(self.spec, limits=self.zygote_limits)

    def create(self, code_root, env=None, packages=()):
        """A running container for the code layer at code_root, with the
        package layers `packages` (paths) stacked beneath it: forked from
        a zygote with the import cache on, else started fresh."""
        if self.zygotes is not None and not self.zygotes.broken:
            try:
                return self.zygotes.create(code_root, env or {}, packages)
            except SandboxError:
                if not self.zygotes.broken:
                    raise
        container = self.take_prepared() or self.prepare_one()
        self.wanted.set()
        layers = (code_root, *packages, self.guest_layer, self.image_path)
        container.start(layers, env or {})
        return container

    def prepare_one(self):
        sandbox_id = new_sandbox_id()
        container = Container(
            sandbox_id,
            self.spec,
            self.tree.sandbox(sandbox_id),
            self.sandboxes_dir,
        )
        container.prepare()
        return container

    def take_prepared(self):
        with self.ready_lock:
            while self.ready:
                container = self.ready.popleft()
                if container.spec == self.spec:
                    return container
                container.destroy()
        return None

    def keep_prepared(self):
        """Spawner thread: top the pool up whenever create() took one.

        NOTE: the sandboxes it prepares have this thread as their parent
        (their parent-death signal watches it), so it lives until close().
        """
        while True:
            self.wanted.wait(timeout=5.0)
            # PERF: let the request that took a prepared sandbox finish
            # first; preparing the next one right away competes with it
            # for the GIL and the CPUs.
            time.sleep(REFILL_DELAY)
            self.wanted.clear()
            if self.closing:
                return
            if self.zygotes is not None:
                self.tend_zygotes()
                continue
            while len(self.ready) < self.prepared_target:
                try:
                    container = self.prepare_one()
                except Exception:
                    log.exception("preparing a sandbox failed")
                    break
                with self.ready_lock:
                    if self.closing:
                        container.destroy()
                        return
                    self.ready.append(container)

    def tend_zygotes(self):
        try:
            self.zygotes.keep_prepared()
            self.zygotes.expire()
        except Exception:
            log.exception("tending zygotes failed")

    def discard_prepared(self):
        with self.ready_lock:
            prepared, self.ready = list(self.ready), collections.deque()
        for container in prepared:
            container.destroy()

    def sweep(self):
        """Remove every sandbox an earlier worker left: processes and
        cgroups first, then directories."""
        swept = self.tree.sweep()
        leftover_dirs = list_dir(self.sandboxes_dir)
        for name in leftover_dirs:
            shutil.rmtree(
                os.path.join(self.sandboxes_dir, name), ignore_errors=True
            )
        if swept or leftover_dirs:
            log.warning(
                "swept leftovers of an earlier worker: %d cgroups, %d "
                "sandbox directories",
                len(swept),
                len(leftover_dirs),
            )
        return sorted(set(swept) | set(leftover_dirs))

    def close(self):
        with self.ready_lock:
            self.closing = True
        self.wanted.set()
        if self.spawner is not None:
            self.spawner.join()
        self.discard_prepared()
        if self.zygotes is not None:
            self.zygotes.close()
        self.tree.destroy()


def list_dir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
