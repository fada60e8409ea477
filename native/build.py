"""cffi build script (API mode, out of line) for sockworker._native.

Constants are declared with `...` so that the C compiler fills them in from
the system headers instead of this file hard-coding them.
"""

import os
import pathlib

import cffi

HERE = pathlib.Path(__file__).resolve().parent

# setuptools refuses absolute source paths; it builds from the project root.
NATIVE = os.path.relpath(HERE)

CDEF = """
#define CLONE_NEWNS ...
#define CLONE_NEWPID ...
#define CLONE_NEWIPC ...
#define CLONE_NEWUTS ...
#define CLONE_NEWNET ...
#define CLONE_NEWCGROUP ...
#define CLONE_PARENT ...

#define MS_RDONLY ...
#define MS_NOSUID ...
#define MS_NODEV ...
#define MS_NOEXEC ...
#define MS_BIND ...
#define MS_REC ...
#define MS_PRIVATE ...
#define MS_SLAVE ...
#define MS_REMOUNT ...
#define MNT_DETACH ...

"""


def declarations(header):
    """The function declarations of header, without its preprocessor
    lines, which cffi's parser does not take."""
    lines = header.read_text().splitlines()
    return "\n".join(line for line in lines if not line.startswith("#"))


ffibuilder = cffi.FFI()
ffibuilder.cdef(CDEF + declarations(HERE / "sockworker.h"))
ffibuilder.set_source(
    "sockworker._native",
    '#include <sched.h>\n#include <sys/mount.h>\n#include "sockworker.h"',
    sources=[os.path.join(NATIVE, "sockworker.c")],
    include_dirs=[NATIVE],
    extra_compile_args=["-O2", "-Wall", "-Werror"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
