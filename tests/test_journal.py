"""The send worker's append-only journal: round trip, torn lines, SIGKILL, errors."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from sendsystem.errors import SendSystemError
from sendsystem.journal import Journal, JournalError


def test_append_replay_round_trip(tmp_path: Path) -> None:
    with Journal(tmp_path, "send-1") as j:
        assert j.replay() == []
        j.append([(1, "sent", "250 2.0.0 Ok: queued as A"), (2, "failed", "550 5.1.1 nope")])
        j.append([])
        j.append([(3, "deferred", "451 multi\r\nline\twith tab"), (4, "sent", "250 ü ✓")])
        assert j.replay() == [
            (1, "sent", "250 2.0.0 Ok: queued as A"),
            (2, "failed", "550 5.1.1 nope"),
            (3, "deferred", "451 multi  line with tab"),
            (4, "sent", "250 ü ✓"),
        ]
    assert (tmp_path / "send-1.journal").exists()


def test_survives_reopen_and_truncate(tmp_path: Path) -> None:
    with Journal(tmp_path, "w") as j:
        j.append([(10, "sent", "250 ok")])
    with Journal(tmp_path, "w") as j:
        assert j.replay() == [(10, "sent", "250 ok")]
        j.truncate()
        assert j.replay() == [] and j.size() == 0
        j.append([(11, "sent", "250 ok")])  # appends land at offset 0 after truncate
        assert j.replay() == [(11, "sent", "250 ok")]
    with Journal(tmp_path, "w", fsync=False) as j:
        assert j.replay() == [(11, "sent", "250 ok")]


@pytest.mark.parametrize("interval", [0.0, 0.1, 3600.0])
def test_sync_policies_keep_every_entry(tmp_path: Path, interval: float) -> None:
    with Journal(tmp_path, "w", sync_interval=interval) as j:
        for i in range(20):
            j.append([(i, "sent", "250 ok")])
        j.sync()
        j.sync()  # nothing pending: no-op
    with Journal(tmp_path, "w") as j:
        assert [e[0] for e in j.replay()] == list(range(20))


def test_torn_last_line_is_ignored_and_cut(tmp_path: Path) -> None:
    with Journal(tmp_path, "w") as j:
        j.append([(1, "sent", "250 a"), (2, "sent", "250 b")])
    path = tmp_path / "w.journal"
    whole = path.read_bytes()
    with path.open("ab") as f:
        f.write(b"3\tsent\t250 c\t1234")  # crash in the middle of a line
    with Journal(tmp_path, "w") as j:
        assert j.replay() == [(1, "sent", "250 a"), (2, "sent", "250 b")]
        assert path.read_bytes() == whole  # the fragment was cut at open
        j.append([(4, "sent", "250 d")])
        assert j.replay()[-1] == (4, "sent", "250 d")


def test_torn_line_seen_by_replay_without_reopen(tmp_path: Path) -> None:
    with Journal(tmp_path, "w") as j:
        j.append([(1, "sent", "250 a")])
        with (tmp_path / "w.journal").open("ab") as f:
            f.write(b"2\tse")
        assert j.replay() == [(1, "sent", "250 a")]


def test_corrupt_middle_line_is_skipped(tmp_path: Path) -> None:
    with Journal(tmp_path, "w") as j:
        j.append([(1, "sent", "250 a"), (2, "sent", "250 b"), (3, "sent", "250 c")])
    path = tmp_path / "w.journal"
    path.write_bytes(path.read_bytes().replace(b"250 b", b"250 X"))
    with Journal(tmp_path, "w") as j:
        assert [e[0] for e in j.replay()] == [1, 3]


def test_second_worker_with_same_name_is_refused(tmp_path: Path) -> None:
    with Journal(tmp_path, "w"):
        with pytest.raises(JournalError, match="already running"):
            Journal(tmp_path, "w")
        Journal(tmp_path, "other").close()
    Journal(tmp_path, "w").close()  # lock released on close


@pytest.mark.parametrize("name", ["", "a/b", ".", ".."])
def test_bad_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(JournalError, match="--name"):
        Journal(tmp_path, name)


def test_unusable_directory_names_it(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(SendSystemError) as info:
        Journal(blocker / "journal", "w")
    assert str(blocker / "journal") in str(info.value)
    assert "journal_dir" in str(info.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_directory_names_it(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        with pytest.raises(JournalError) as info:
            Journal(ro, "w")
        assert f"Make the directory {ro} writable" in str(info.value)
    finally:
        ro.chmod(0o700)


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
