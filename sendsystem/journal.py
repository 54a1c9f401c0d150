"""The send worker's local append-only journal of delivery results.

Why: between the relay's 250 and the database commit that marks the message
sent there is a window; a worker killed with SIGKILL in it would, on restart,
send the message again. The worker appends each flush-batch of results here
*before* committing them to MySQL, replays the file at start-up (applying
what the DB does not have yet), and truncates it once the DB has committed
everything in it.

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
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
import zlib
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType

from .errors import SendSystemError

log = logging.getLogger(__name__)

SUFFIX = ".journal"
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
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise self._error("create the directory for", exc) from None
        try:
            created = not self.path.exists()
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise self._error("open", exc) from None
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
            if created and fsync:
                self._sync_directory()
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

    def _sync_directory(self) -> None:
        # So that the new file's directory entry survives a power cut too.
        dfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)

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
