"""The sock backend: makes SOCK containers for lambda code, and finds and
removes what an earlier worker on the same state directory left behind.

Everything a sandbox owns has a name the backend can find again: its
directory <state>/sandboxes/<id>/ and its cgroups <start>/<tree>/<id> in
every hierarchy, where <tree> is derived from the state directory. Mounts
live only in the sandbox's private mount namespace and vanish with its
processes, so killing the cgroups' processes and removing the directories
is a complete sweep.
"""

import hashlib
import logging
import os
import shutil

from sockworker.sandbox import cgroups
from sockworker.sandbox.container import (
    Container,
    ContainerSpec,
    new_sandbox_id,
)
from sockworker.sandbox.runtime import install_guest_layer

log = logging.getLogger(__name__)


def tree_name(state_dir):
    """The cgroup tree name for a state directory: stable across restarts,
    distinct between workers with different state directories."""
    digest = hashlib.sha256(os.path.realpath(state_dir).encode())
    return "sockworker-" + digest.hexdigest()[:8]


class SockBackend:
    """Creates containers; owns the cgroup tree and the sandboxes folder.

    Guarantees: sweep() leaves no process, cgroup or sandbox directory of
    an earlier worker on this state directory; close() destroys the tree
    (the caller destroys its containers first).
    """

    def __init__(
        self,
        state_dir,
        image_path,
        limits,
        network="none",
        scratch_bytes=64 << 20,
        layout=None,
    ):
        self.state_dir = state_dir
        self.sandboxes_dir = os.path.join(state_dir, "sandboxes")
        self.image_path = image_path
        self.limits = limits
        self.network = network
        self.scratch_bytes = scratch_bytes
        self.layout = layout or cgroups.CgroupLayout.detect()
        self.tree = cgroups.CgroupTree(self.layout, tree_name(state_dir))
        self.guest_layer = None

    def start(self):
        """Sweep leftovers, then make the cgroup tree and guest layer."""
        self.sweep()
        os.makedirs(self.sandboxes_dir, mode=0o700, exist_ok=True)
        self.tree.create()
        self.guest_layer = install_guest_layer(
            os.path.join(self.state_dir, "runtime")
        )
        log.info("sock backend ready: %s", self.layout.describe())

    def create(self, code_root, env=None):
        """A running container for the code layer at code_root."""
        spec = ContainerSpec(
            layers=(code_root, self.guest_layer, self.image_path),
            limits=self.limits,
            network=self.network,
            scratch_bytes=self.scratch_bytes,
            env=dict(env or {}),
        )
        sandbox_id = new_sandbox_id()
        container = Container(
            sandbox_id,
            spec,
            self.tree.sandbox(sandbox_id),
            self.sandboxes_dir,
        )
        container.create()
        return container

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
        self.tree.destroy()


def list_dir(path):
    try:
        return os.listdir(path)
    except FileNotFoundError:
        return []
