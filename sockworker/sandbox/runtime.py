"""The guest runtime layer: the in-container server's files, laid out as
a tree that an overlay stacks over the base image (at /opt/sockworker).

It is copied from the installed package into the state directory, one
directory per content hash, so that a worker upgraded in place never mixes
old and new guest files in running sandboxes.
"""

import hashlib
import os
import shutil
import tempfile

GUEST_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "guest")
GUEST_FILES = ("server.py", "protocol.py", "codec.py", "zygote.py")
LAYER_SUBDIR = os.path.join("opt", "sockworker", "guest")
MOUNT_POINT_SUBDIR = os.path.join("opt", "sockworker", "mnt")
# The stand-in lambda a zygote's child rehearses a start with.
REHEARSAL_SUBDIR = os.path.join("opt", "sockworker", "rehearsal")
REHEARSAL_HANDLER = "def f(event):\n    return event\n"
# Bump when the layer's layout changes beyond the guest files.
LAYOUT_VERSION = b"3"


def guest_digest():
    digest = hashlib.sha256(LAYOUT_VERSION + REHEARSAL_HANDLER.encode())
    for name in GUEST_FILES:
        with open(os.path.join(GUEST_DIR, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    return digest.hexdigest()[:16]


def install_guest_layer(runtime_dir):
    """Return the layer directory for the current guest files, copying
    them there first if needed (atomically, by rename)."""
    layer = os.path.join(runtime_dir, "guest-" + guest_digest())
    if os.path.isdir(layer):
        return layer
    os.makedirs(runtime_dir, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".guest-", dir=runtime_dir)
    try:
        target = os.path.join(staging, LAYER_SUBDIR)
        os.makedirs(target)
        # Where a zygote's child attaches a new sandbox's root.
        os.makedirs(os.path.join(staging, MOUNT_POINT_SUBDIR))
        write_rehearsal_handler(os.path.join(staging, REHEARSAL_SUBDIR))
        for name in GUEST_FILES:
            shutil.copyfile(
                os.path.join(GUEST_DIR, name), os.path.join(target, name)
            )
        for dirpath, _, filenames in os.walk(staging):
            os.chmod(dirpath, 0o755)
            for name in filenames:
                os.chmod(os.path.join(dirpath, name), 0o644)
        try:
            os.rename(staging, layer)
        except OSError:
            # Another worker process installed the same digest first.
            if not os.path.isdir(layer):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return layer


def write_rehearsal_handler(directory):
    """The stand-in lambda, compiled like a real one (the registry's
    compile_code), so that the rehearsal loads bytecode as a start does."""
    from sockworker.registry import compile_code

    os.makedirs(directory)
    with open(os.path.join(directory, "f.py"), "w") as f:
        f.write(REHEARSAL_HANDLER)
    compile_code(directory, "/" + REHEARSAL_SUBDIR)
