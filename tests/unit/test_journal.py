"""The send worker's append-only journal: round trip, torn lines, errors, hardening.
A writer SIGKILLed mid-stream and a full disk: tests/integration/test_journal.py."""

from __future__ import annotations

import os
import stat
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


# -- hardening: a journal directory that is ours alone, files never followed ----------


def test_new_directory_is_0700_and_files_are_0600(tmp_path: Path) -> None:
    directory = tmp_path / "new" / "journal"
    with Journal(directory, "w") as j:
        j.append([(1, "sent", "250 ok")])
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert stat.S_IMODE((directory / "w.journal").stat().st_mode) == 0o600


def test_a_looser_existing_file_is_tightened(tmp_path: Path) -> None:
    with Journal(tmp_path, "w") as j:
        j.append([(1, "sent", "250 ok")])
    path = tmp_path / "w.journal"
    path.chmod(0o644)
    with Journal(tmp_path, "w") as j:
        assert j.replay() == [(1, "sent", "250 ok")]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_symlink_at_the_journal_path_is_refused_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    (directory / "w.journal").symlink_to(target)
    with pytest.raises(JournalError, match="symbolic link") as info:
        Journal(directory, "w")
    assert f"rm {directory / 'w.journal'}" in str(info.value)
    assert target.read_bytes() == b"precious\n"
    # A dangling link (a file the attacker wants created) is refused too.
    target.unlink()
    with pytest.raises(JournalError, match="symbolic link"):
        Journal(directory, "w")
    assert not target.exists()


def test_hard_link_and_non_regular_file_are_refused(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    other = tmp_path / "other"
    other.write_bytes(b"")
    os.link(other, directory / "w.journal")
    with pytest.raises(JournalError, match="2 hard links"):
        Journal(directory, "w")
    os.mkfifo(directory / "f.journal")
    with pytest.raises(JournalError, match="not a regular file"):
        Journal(directory, "f")


@pytest.mark.parametrize(("mode", "who"), [(0o777, "everyone"), (0o1777, "everyone"),
                                           (0o770, "its group"), (0o720, "its group")])
def test_directory_writable_by_others_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    directory = tmp_path / "journal"
    directory.mkdir()
    directory.chmod(mode)
    with pytest.raises(JournalError) as info:
        Journal(directory, "w")
    assert f"writable by {who}" in str(info.value)
    assert f"chmod 700 {directory}" in str(info.value)
    assert not (directory / "w.journal").exists()
    directory.chmod(0o750)  # group may read, nobody else may write: accepted
    Journal(directory, "w").close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a directory away")
def test_directory_owned_by_another_user_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "journal"
    directory.mkdir(mode=0o700)
    os.chown(directory, 65534, 65534)
    with pytest.raises(JournalError) as info:
        Journal(directory, "w")
    assert "owned by uid 65534" in str(info.value)
    assert f"chown {os.geteuid()} {directory}" in str(info.value)
