"""Build hook: the cffi extension in native/ needs setup()'s cffi_modules,
which setup.cfg cannot express."""

from setuptools import setup

setup(
    cffi_modules=["native/build.py:ffibuilder"],
    scripts=["bin/worker"],
)
