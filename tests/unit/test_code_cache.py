"""The code cache's mount step refuses to run where it would be wrong,
and the worker keeps its code on disk when the mount cannot be made."""

import errno
import logging
import subprocess
import sys
import textwrap

from sockworker import runtime
from sockworker.sandbox import mounts


def test_private_tmpfs_refuses_a_process_with_threads(tmp_path):
    # unshare moves only the calling thread: with another thread alive,
    # half the process would see the tmpfs. Checked before any unshare,
    # so this needs no privilege.
    script = textwrap.dedent(
        f"""
        import errno, threading
        from sockworker.sandbox import mounts
        stop = threading.Event()
        threading.Thread(target=stop.wait).start()
        try:
            mounts.mount_private_tmpfs({str(tmp_path)!r}, 1 << 20)
        except OSError as exc:
            print(exc.errno == errno.EINVAL, "2 threads" in str(exc))
        finally:
            stop.set()
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stdout.split() == ["True", "True"], done.stderr


def test_code_cache_off_leaves_the_folder_alone(tmp_path, monkeypatch):
    folder = tmp_path / "lambdas"
    folder.mkdir()
    (folder / "kept").write_text("")

    def never(path, size):
        raise AssertionError("mounted with code_cache_mb 0")

    monkeypatch.setattr(mounts, "mount_private_tmpfs", never)
    assert runtime.mount_code_cache(str(folder), 0) is False
    assert [p.name for p in folder.iterdir()] == ["kept"]


def test_failed_mount_keeps_code_on_disk(tmp_path, monkeypatch, caplog):
    folder = tmp_path / "lambdas"

    def refused(path, size):
        raise OSError(errno.EPERM, "Operation not permitted", path)

    monkeypatch.setattr(mounts, "mount_private_tmpfs", refused)
    with caplog.at_level(logging.WARNING, logger="sockworker.runtime"):
        assert runtime.mount_code_cache(str(folder), 64) is False
    assert folder.is_dir()
    assert "code cache stays on disk" in caplog.text
    assert "Operation not permitted" in caplog.text
