"""``bounce scan``: process a Maildir of bounces, complaints and mailto unsubscribes.

Each message goes through :func:`sendsystem.bounce.intake.process`; this
module only decides where the file goes afterwards. Decisions:

* **Nothing is ever deleted.** Processed mail goes to the Maildir++ folder
  ``.processed`` (seen, in ``cur``), mail that needs a human (unverified,
  not understood, empty or too big) to ``.unknown`` (unseen, in ``new``),
  both with their own cur/new/tmp, so any IMAP server shows them as folders.
* **A database outage stops the scan** and leaves the rest in place for the
  next cron run; an unexpected error on one message leaves that message in
  place and goes on with the others.
* **One scan per Maildir at a time** (a file lock in ``[paths] lock_dir``),
  so overlapping cron runs never process the same file twice.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from filelock import FileLock, Timeout

from ..config import Config
from ..db import Database
from ..errors import TemporaryError, UserError
from .intake import MAX_INPUT, IntakeOutcome, process

log = logging.getLogger(__name__)

PROCESSED = ".processed"
UNKNOWN = ".unknown"


def maildir_folder(root: Path, name: str) -> Path:
    """``root/name`` with cur/new/tmp (created if missing); ``name`` "" is the root itself."""
    folder = root / name if name else root
    for sub in ("cur", "new", "tmp"):
        (folder / sub).mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def deliver_to_maildir(folder: Path, raw: bytes) -> Path:
    """Write one message into ``folder/new`` the Maildir way (tmp, fsync, rename)."""
    maildir_folder(folder, "")
    name = f"{time.time_ns()}.P{os.getpid()}T{threading.get_ident()}.{socket.gethostname()}"
    tmp = folder / "tmp" / name
    with open(tmp, "wb") as fh:
        fh.write(raw)
        fh.flush()
        os.fsync(fh.fileno())
    final = folder / "new" / name
    os.rename(tmp, final)
    return final


def _pending(root: Path) -> Iterator[Path]:
    for sub in ("new", "cur"):
        directory = root / sub
        if directory.is_dir():
            for name in sorted(os.listdir(directory)):
                if not name.startswith("."):
                    yield directory / name


def _move(path: Path, folder: Path, seen: bool) -> None:
    base = path.name.split(":2,", 1)[0]
    dest = folder / "cur" / f"{base}:2,S" if seen else folder / "new" / base
    os.rename(path, dest)


@dataclass
class ScanResult:
    processed: int = 0
    unknown: int = 0
    failed: list[str] = field(default_factory=list)  # left in place after an unexpected error
    stopped: str | None = None  # why the scan stopped early (database down)
    busy: bool = False  # another scan of this Maildir holds the lock: nothing done
    outcomes: list[IntakeOutcome] = field(default_factory=list)


def scan_maildir(db: Database, config: Config, root: Path) -> ScanResult:
    """Process every message in ``root``/new and /cur and move it (see the module docstring).

    Stops at the first database outage, leaving the rest for the next run.
    Only one scan of a Maildir runs at a time (a lock in ``[paths] lock_dir``).
    """
    if not (root / "new").is_dir():
        raise UserError(f"{root} is not a Maildir (it has no new/ directory).")
    config.secret()  # a missing or short secret stops the scan before any mail moves
    config.paths.lock_dir.mkdir(parents=True, exist_ok=True)
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:16]
    lock = FileLock(str(config.paths.lock_dir / f"bounce-scan-{key}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        return ScanResult(busy=True)
    try:
        return _scan(db, config, root)
    finally:
        lock.release()


def _scan(db: Database, config: Config, root: Path) -> ScanResult:
    processed, unknown = maildir_folder(root, PROCESSED), maildir_folder(root, UNKNOWN)
    result = ScanResult()
    for path in _pending(root):
        try:
            raw = path.read_bytes() if path.stat().st_size <= MAX_INPUT else b""
        except FileNotFoundError:  # a mail client moved it meanwhile
            continue
        try:
            outcome = process(db, config, raw) if raw.strip() else None
        except TemporaryError as exc:
            result.stopped = str(exc)
            break
        except Exception:
            # A bug must not lose the mail nor stop the other messages.
            log.exception("could not process %s; left in place", path)
            result.failed.append(str(path))
            continue
        needs_human = outcome is None or outcome.needs_human
        if outcome is None:
            log.warning("%s is empty or larger than %d bytes: moved to unknown", path, MAX_INPUT)
        else:
            result.outcomes.append(outcome)
        try:
            _move(path, unknown if needs_human else processed, seen=not needs_human)
        except FileNotFoundError:
            continue
        if needs_human:
            result.unknown += 1
        else:
            result.processed += 1
    return result
