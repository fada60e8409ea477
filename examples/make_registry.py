"""Build examples/registry/add.tar.gz, the tarball form of the example.

The archive is reproducible (fixed times and owners), so running this
again gives the same bytes and the same lambda version:

    .venv/bin/python examples/make_registry.py
"""

import gzip
import io
import os
import sys
import tarfile

ADD_SOURCE = b'''def f(event):
    """Add the numbers `a` and `b` of the event."""
    return {"sum": event["a"] + event["b"]}
'''


def build_add_tarball():
    """The bytes of add.tar.gz: a gzip tarball holding f.py."""
    raw = io.BytesIO()
    with gzip.GzipFile(fileobj=raw, mode="wb", filename="", mtime=0) as gz:
        with tarfile.open(
            fileobj=gz, mode="w", format=tarfile.USTAR_FORMAT
        ) as tar:
            info = tarfile.TarInfo("f.py")
            info.size = len(ADD_SOURCE)
            info.mode = 0o644
            info.mtime = 0
            tar.addfile(info, io.BytesIO(ADD_SOURCE))
    return raw.getvalue()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    path = os.path.join(here, "registry", "add.tar.gz")
    with open(path, "wb") as f:
        f.write(build_add_tarball())
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
