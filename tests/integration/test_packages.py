"""Lambdas that declare packages in requirements.txt, through a real
worker: installed once into the package store by pip in a sandbox, and
importable in exactly the lambdas that declare them."""

import os

import pytest

pytestmark = pytest.mark.integration

SHOW_SIX = """
import six

def f(event):
    return {"version": six.__version__, "file": six.__file__}
"""


def add_with_requirements(registry, name, source, requirements):
    registry.add(name, source)
    with open(os.path.join(str(registry), name, "requirements.txt"), "w") as f:
        f.write(requirements)


def test_declared_package_is_importable(start_worker, registry):
    add_with_requirements(registry, "sixer", SHOW_SIX, "six==1.16.0\n")
    worker = start_worker(timeout_seconds=120)

    reply = worker.run("sixer", {}, timeout=180)

    assert reply.status == 200, reply.body
    seen = reply.json()
    assert seen["version"] == "1.16.0"
    assert seen["file"].startswith("/opt/sockworker/packages/")


def test_undeclared_package_is_not_importable(start_worker, registry):
    add_with_requirements(registry, "sixer", SHOW_SIX, "six==1.16.0\n")
    registry.add("plain", SHOW_SIX)
    worker = start_worker(timeout_seconds=120)

    assert worker.run("sixer", {}, timeout=180).status == 200
    reply = worker.run("plain", {}, timeout=60)

    assert reply.status == 500
    assert "No module named 'six'" in reply.json()["message"]


def test_package_that_cannot_install_fails_only_its_lambda(
    start_worker, registry
):
    add_with_requirements(
        registry,
        "broken",
        SHOW_SIX,
        "sockworker-no-such-package-zz==1.0\n",
    )
    registry.add("echo", "def f(event):\n    return event\n")
    worker = start_worker(timeout_seconds=120)

    reply = worker.run("broken", {}, timeout=180)

    assert reply.status == 500
    body = reply.json()
    assert body["error"] == "package_error"
    assert "sockworker-no-such-package-zz" in body["message"]
    assert worker.run("echo", {"still": "serving"}).json() == {
        "still": "serving"
    }
