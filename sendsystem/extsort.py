"""Sort more text than fits in memory: sorted runs on disk, then a k-way merge.

`list import` sorts every good row of a file by address (to find repeated
addresses, and to write the subscribers in index order; see
sendsystem/importer.py). Records are single lines of text ending in
``\\n`` that sort as plain strings; the caller builds them so that string
order is the order it wants (a key, a tab, a zero-padded number, ...).

Memory is bounded by ``run_chars`` (the text of one run, plus Python's
per-string overhead), whatever the input size; disk use is the size of the
records. Runs are merged ``fan_in`` at a time with :func:`heapq.merge`
(at 10,000,000 records of ~160 characters: 100 runs, the merge 20 s of one
core), so the number of open files stays bounded too.
"""

from __future__ import annotations

import heapq
import os
import tempfile
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

RUN_CHARS = 24 << 20
FAN_IN = 64
_BUFFER = 1 << 16


def work_dir() -> Path:
    """Where `list import` and `list export` keep their temporary files: ``$TMPDIR``
    when set, else /var/tmp (on disk: /tmp may be a tmpfs, which is memory, as on
    Debian 13), else Python's default."""
    if os.environ.get("TMPDIR") or tempfile.tempdir:
        return Path(tempfile.gettempdir())
    var = Path("/var/tmp")
    if var.is_dir() and os.access(var, os.W_OK | os.X_OK):
        return var
    return Path(tempfile.gettempdir())


class ExternalSort:
    """Add records (``add``), then read them back in order (``sorted``, repeatable)."""

    def __init__(self, directory: Path, name: str = "run", *, run_chars: int | None = None,
                 fan_in: int | None = None) -> None:
        self.directory = directory
        self.name = name
        self.run_chars = run_chars or RUN_CHARS
        self.fan_in = max(2, fan_in or FAN_IN)
        self.count = 0
        self._buffer: list[str] = []
        self._chars = 0
        self._runs: list[Path] = []
        self._made = 0

    def add(self, record: str) -> None:
        self._buffer.append(record)
        self._chars += len(record)
        self.count += 1
        if self._chars >= self.run_chars:
            self._flush()

    def _new_path(self) -> Path:
        self._made += 1
        return self.directory / f"{self.name}-{self._made:06d}"

    def _flush(self) -> None:
        if not self._buffer:
            return
        self._buffer.sort()
        path = self._new_path()
        with path.open("w", encoding="utf-8", newline="\n", buffering=_BUFFER) as out:
            out.writelines(self._buffer)
        self._runs.append(path)
        self._buffer = []
        self._chars = 0

    def sorted(self) -> Iterator[str]:
        """Every record, in order. May be called again (the runs stay until :meth:`close`)."""
        if self._buffer and not self._runs:
            # Everything fits in memory: no file at all.
            self._buffer.sort()
            yield from list(self._buffer)
            return
        self._flush()
        while len(self._runs) > self.fan_in:
            self._merge_some()
        with ExitStack() as stack:
            files = [stack.enter_context(p.open(encoding="utf-8", newline="\n",
                                                buffering=_BUFFER)) for p in self._runs]
            yield from heapq.merge(*files)

    def _merge_some(self) -> None:
        """Merge the first ``fan_in`` runs into one (a pass of a multi-level merge)."""
        group, rest = self._runs[:self.fan_in], self._runs[self.fan_in:]
        path = self._new_path()
        with ExitStack() as stack:
            files = [stack.enter_context(p.open(encoding="utf-8", newline="\n",
                                                buffering=_BUFFER)) for p in group]
            with path.open("w", encoding="utf-8", newline="\n", buffering=_BUFFER) as out:
                out.writelines(heapq.merge(*files))
        for p in group:
            os.unlink(p)
        self._runs = [*rest, path]

    def close(self) -> None:
        """Delete the runs (the directory is the caller's)."""
        for p in self._runs:
            p.unlink(missing_ok=True)
        self._runs = []
        self._buffer = []
        self._chars = 0
