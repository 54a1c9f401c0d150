"""The send worker's local append-only journal of delivery results.

Why: between the relay's 250 and the database commit that marks the message
sent there is a window; a worker killed with SIGKILL in it would, on restart,
send the message again. The worker appends each final result here the
moment the relay answers, *before* the outcome writer commits it to MySQL,
replays the file at start-up (applying what the DB does not have yet), and
truncates it once the DB has committed everything in it.

File: ``<directory>/<name>.journal``, UTF-8 text, one entry a line::

    <message_id> TAB <outcome> TAB <reply> TAB <crc32 of the first three fields, 8 hex>

Durability policy: ``append()`` is one ``write()`` on an ``O_APPEND`` descriptor,
which alone survives SIGKILL (the data is in the kernel's page cache), so a
killed worker never loses an appended entry. Surviving a power cut or kernel
crash needs ``fdatasync()``, which costs a disk flush (~0.15 ms here, several
ms on a busy disk) and would halve the send rate if done per message. So
syncs are grouped by time: ``append()`` fdatasyncs when the last sync is
older than ``sync_interval`` (default 0.1 s), and ``sync()``/``close()`` force
one. A power cut therefore loses at most the last ``sync_interval`` of
entries (those messages may be sent twice); ``sync_interval=0`` syncs every
append, ``fsync=False`` never syncs (tests, benchmarks).

Robustness: a torn last line (a crash mid-write, or a power cut before the
flush) has no newline and is cut off when the journal is opened, so new lines
never glue onto it; a line whose CRC does not match is skipped with a
warning. An exclusive ``flock`` makes a second process with the same worker
name fail loudly instead of interleaving with the first.

Hardening: whoever can replace this file decides what the next start-up
marks sent (entries are CRC-checked, not authenticated), so the directory
must be the worker's own, the way OpenSSH's StrictModes treats ~/.ssh.
It is created ``0700`` when missing, and refused when it is not owned by
the user running the worker, or is writable by its group or by others
(group-writable is refused too, even when we own it: a group member could
swap the journal for a forged one; a shared group directory gains nothing
here, each worker has its own files). The file is opened relative to the
checked directory's descriptor with ``O_NOFOLLOW`` (a symbolic link planted
at its path is refused, never followed), must be a regular file with one
link owned by us, and is created ``0600`` (an older, looser mode is
tightened). Parent directories are not checked.

Failures name the path, the reason and the fix. The send worker treats a
journal it cannot write mid-run as a reason to stop (outcomes.py): the
outcome still goes to the database, nothing is resent.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .errors import SendSystemError

log = logging.getLogger(__name__)

SUFFIX = ".journal"
PROBE = "probe"  # the outcome of check_writable()'s line
_CLEAN = str.maketrans({"\t": " ", "\r": " ", "\n": " "})


class JournalError(SendSystemError):
    """The journal file cannot be created, locked or written."""


def _line(message_id: int, outcome: str, reply: str) -> bytes:
    body = f"{int(message_id)}\t{str(outcome).translate(_CLEAN)}\t{reply.translate(_CLEAN)}"
    raw = body.encode("utf-8", "backslashreplace")
    return raw + b"\t%08x\n" % zlib.crc32(raw)


def _parse(line: bytes) -> tuple[int, str, str] | None:
    raw, sep, crc = line.rpartition(b"\t")
    if not sep or len(crc) != 8:
        return None
    try:
        if int(crc, 16) != zlib.crc32(raw):
            return None
        ident, outcome, reply = raw.decode("utf-8", "replace").split("\t", 2)
        return int(ident), outcome, reply
    except ValueError:
        return None


class Journal:
    """One worker's journal file; see the module docstring for format and policy."""

    def __init__(self, directory: Path, name: str, *, fsync: bool = True,
                 sync_interval: float = 0.1) -> None:
        if not name or "/" in name or "\0" in name or name in (".", ".."):
            raise JournalError(f"Worker name {name!r} cannot be used as a journal file name; "
                               "pick a --name made of letters, digits, '-' and '_'.")
        self.directory = Path(directory)
        self.path = self.directory / f"{name}{SUFFIX}"
        self._fsync = fsync
        self._sync_interval = sync_interval
        self._synced_at = time.monotonic()
        self._dirty = False
        self._fd: int | None = None
        dfd = self._open_directory()
        try:
            fd, created = self._open_file(dfd, f"{name}{SUFFIX}")
            if created and fsync:
                try:
                    os.fsync(dfd)  # so the new directory entry survives a power cut too
                except OSError:
                    os.close(fd)
                    raise
        except OSError as exc:
            raise self._error("open", exc) from None
        finally:
            os.close(dfd)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalError(
                f"Journal {self.path} is in use by another process: a send worker named "
                f"{name!r} is already running here. Stop it, or give this one another --name."
            ) from None
        self._fd = fd
        try:
            self._cut_torn_tail()
        except OSError as exc:
            self.close()
            raise self._error("repair", exc) from None

    # -- public API -------------------------------------------------------------------

    def append(self, entries: Sequence[tuple[int, str, str]]) -> None:
        """Append (message_id, outcome, reply) entries with one write (+ fdatasync)."""
        if not entries:
            return
        buf = b"".join(_line(i, o, r) for i, o, r in entries)
        fd = self._require_fd()
        try:
            view = memoryview(buf)
            while view:  # a short write is possible for huge batches; O_APPEND keeps order
                view = view[os.write(fd, view):]
            self._dirty = True
            if self._fsync and time.monotonic() - self._synced_at >= self._sync_interval:
                self._sync(fd)
        except OSError as exc:
            raise self._error("write", exc) from None

    def sync(self) -> None:
        """Force appended entries to disk now (no-op with fsync=False)."""
        if self._fsync and self._dirty:
            try:
                self._sync(self._require_fd())
            except OSError as exc:
                raise self._error("sync", exc) from None

    def _sync(self, fd: int) -> None:
        os.fdatasync(fd)
        self._dirty = False
        self._synced_at = time.monotonic()

    def replay(self) -> list[tuple[int, str, str]]:
        """Entries in the file, oldest first; the same id may appear more than once
        (the last one wins). A torn last line is ignored, corrupt lines are skipped."""
        data = self._read_all()
        entries: list[tuple[int, str, str]] = []
        lines = data.split(b"\n")
        # The piece after the last newline is empty, or a torn line from a crash.
        for number, line in enumerate(lines[:-1], 1):
            entry = _parse(line)
            if entry is None:
                log.warning("journal %s: line %d is corrupt, skipped: %r",
                            self.path, number, line[:120])
                continue
            entries.append(entry)
        if lines[-1]:
            log.warning("journal %s: ignoring a torn last line (%d bytes)",
                        self.path, len(lines[-1]))
        return entries

    def truncate(self) -> None:
        """Empty the journal: call only once the DB has committed every entry in it."""
        fd = self._require_fd()
        try:
            os.ftruncate(fd, 0)
            if self._fsync:
                self._sync(fd)
        except OSError as exc:
            raise self._error("truncate", exc) from None

    def check_writable(self) -> None:
        """Append, sync and cut one probe line, so that a full or read-only file system
        is found at start-up rather than after the relay accepted the first message.

        Only on an empty journal (a real entry is never cut); replay ignores the probe
        line should a crash leave it behind (its outcome is neither sent nor failed).
        """
        if self.size():
            return
        self.append([(0, PROBE, "journal write check")])
        self.sync()
        self.truncate()

    def size(self) -> int:
        """Current file size in bytes (for status and logs)."""
        return os.fstat(self._require_fd()).st_size

    def close(self) -> None:
        """Sync what is pending and release the file (and its lock)."""
        if self._fd is not None:
            try:
                self.sync()
            except JournalError as exc:
                log.error("%s", exc)
            fd, self._fd = self._fd, None
            os.close(fd)  # also releases the flock

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------

    def _require_fd(self) -> int:
        if self._fd is None:
            raise JournalError(f"Journal {self.path} is closed.")
        return self._fd

    def _read_all(self) -> bytes:
        fd = self._require_fd()
        chunks = []
        offset = 0
        try:
            while True:
                chunk = os.pread(fd, 1 << 20, offset)
                if not chunk:
                    break
                chunks.append(chunk)
                offset += len(chunk)
        except OSError as exc:
            raise self._error("read", exc) from None
        return b"".join(chunks)

    def _cut_torn_tail(self) -> None:
        data = self._read_all()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("journal %s: cutting a torn last line (%d bytes) left by a crash",
                    self.path, len(data) - keep)
        os.ftruncate(self._require_fd(), keep)

    def _open_directory(self) -> int:
        """Create the directory 0700 when missing; check it is ours and private; its fd."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error("create the directory for", exc) from None
        try:
            dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise self._error("open the directory of", exc) from None
        try:
            check_directory(self.directory, os.fstat(dfd))
        except JournalError:
            os.close(dfd)
            raise
        return dfd

    def _open_file(self, dfd: int, filename: str) -> tuple[int, bool]:
        """(fd, created) of the journal file, never through a symbolic link."""
        flags = os.O_RDWR | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = os.open(filename, flags | os.O_CREAT | os.O_EXCL, 0o600, dir_fd=dfd)
            created = True
        except FileExistsError:
            created = False
            try:
                fd = os.open(filename, flags, dir_fd=dfd)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise JournalError(
                        f"Journal {self.path} is a symbolic link; it is never followed. "
                        f"Remove it (rm {self.path}) and find out who put it there."
                    ) from None
                raise
        try:
            st = os.fstat(fd)
            problem = None
            if not stat.S_ISREG(st.st_mode):
                problem = "is not a regular file"
            elif st.st_nlink != 1:
                problem = f"has {st.st_nlink} hard links"
            elif st.st_uid != os.geteuid():
                problem = f"is owned by uid {st.st_uid}, not by uid {os.geteuid()} running it"
            if problem is not None:
                raise JournalError(
                    f"Journal {self.path} {problem}; refusing to use it. Remove it "
                    f"(rm {self.path}) and find out who put it there."
                )
            if stat.S_IMODE(st.st_mode) != 0o600:
                os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return fd, created

    def _error(self, action: str, exc: OSError) -> JournalError:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            hint = (f"Make the directory {self.directory} writable by the user running the "
                    "send worker (uid {uid}), or point [paths] journal_dir in config.ini "
                    "at a writable directory.").format(uid=os.geteuid())
        elif exc.errno in (errno.ENOSPC, errno.EDQUOT):
            hint = f"Free disk space on the file system holding {self.directory}."
        else:
            hint = (f"Check that {self.directory} is a writable directory, or set "
                    "[paths] journal_dir in config.ini to one.")
        return JournalError(f"Cannot {action} the send journal {self.path}: {reason}. {hint}")


def check_directory(directory: Path, st: os.stat_result) -> None:
    """Refuse a journal directory that is not ours alone (see the module docstring)."""
    uid = os.geteuid()
    if not stat.S_ISDIR(st.st_mode):
        raise JournalError(f"Journal directory {directory} is not a directory. Point "
                           "[paths] journal_dir in config.ini at a directory.")
    if st.st_uid != uid:
        raise JournalError(
            f"Journal directory {directory} is owned by uid {st.st_uid}, not by uid {uid} "
            f"running the send worker; refusing it, as another user could forge its journal. "
            f"Fix: chown {uid} {directory} && chmod 700 {directory}, or point [paths] "
            "journal_dir in config.ini at a directory of the send worker's own."
        )
    mode = stat.S_IMODE(st.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        who = "everyone" if mode & stat.S_IWOTH else "its group"
        raise JournalError(
            f"Journal directory {directory} is writable by {who} (mode {mode:04o}); refusing "
            f"it, as they could replace the journal. Fix: chmod 700 {directory}."
        )
