"""The journal against a real process and a real file system: a writer SIGKILLed
mid-stream leaves a clean prefix; a full disk is found and named. The pure
round trip, torn lines and hardening checks are in tests/unit/test_journal.py."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from sendsystem.journal import Journal, JournalError
from tests.harness.helpers import mounted_tmpfs


def test_sigkill_leaves_a_clean_prefix(tmp_path: Path) -> None:
    # A child appends batches as fast as it can and is killed mid-stream.
    child = textwrap.dedent(f"""
        import sys
        from pathlib import Path
        from sendsystem.journal import Journal
        j = Journal(Path({str(tmp_path)!r}), "killed", fsync=False)
        i = 0
        print("ready", flush=True)
        while True:
            j.append([(i + k, "sent", "250 2.0.0 Ok: queued as " + "Q" * 40) for k in range(50)])
            i += 50
    """)
    proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
    assert proc.stdout is not None
    assert proc.stdout.readline() == b"ready\n"
    deadline = time.monotonic() + 10
    while (tmp_path / "killed.journal").stat().st_size < 200_000 and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with Journal(tmp_path, "killed") as j:
        ids = [e[0] for e in j.replay()]
    assert len(ids) >= 50
    assert ids == list(range(len(ids)))  # complete entries, in order, no gaps


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 64 KB tmpfs (root only), unmounted at the end whatever happens."""
    with mounted_tmpfs(tmp_path / "tmpfs", "size=64k,mode=0700") as mount:
        yield mount


def _fill(directory: Path) -> None:
    fd = os.open(directory / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)


def test_full_disk_is_found_by_the_write_check_and_says_what_to_do(tiny_tmpfs: Path) -> None:
    with Journal(tiny_tmpfs, "w") as j:
        j.check_writable()
        assert j.size() == 0
        _fill(tiny_tmpfs)
        with pytest.raises(JournalError) as info:
            j.check_writable()
        assert "No space left on device" in str(info.value)
        assert f"Free disk space on the file system holding {tiny_tmpfs}" in str(info.value)
        with pytest.raises(JournalError, match="Free disk space"):
            j.append([(1, "sent", "250 ok")])
    (tiny_tmpfs / "filler").unlink()
    with Journal(tiny_tmpfs, "w") as j:
        assert j.replay() == []  # nothing half-written is taken for an entry
        j.check_writable()


def test_read_only_file_system_names_it(tmp_path: Path) -> None:
    """The unit tier's read-only directory test is skipped for root (root ignores
    directory permissions), and CI runs as root: a read-only mount stops root too."""
    with mounted_tmpfs(tmp_path / "ro", "ro,size=64k,mode=0700") as ro:
        with pytest.raises(JournalError) as info:
            Journal(ro, "w")
        assert "Read-only file system" in str(info.value)
        assert f"Make the directory {ro} writable" in str(info.value)
