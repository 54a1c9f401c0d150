"""The demo's progress line: a repainted bar on a terminal, a quiet line otherwise."""

from __future__ import annotations

import shutil
import time
from collections.abc import Mapping
from typing import TextIO

from ..states import FINAL_MESSAGE_STATES, MessageState


class Progress:
    """One refreshed line on a terminal; a quiet line every few seconds otherwise."""

    def __init__(self, stream: TextIO, total: int, *, tty: bool | None = None,
                 every: float = 5.0) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self._last = 0.0
        self.started = time.monotonic()

    def update(self, c: Mapping[str, int], *, force: bool = False) -> None:
        now = time.monotonic()
        done = sum(c.get(s, 0) for s in FINAL_MESSAGE_STATES)
        sent = c.get(MessageState.SENT, 0)
        elapsed = max(now - self.started, 1e-6)
        rate = sent / elapsed
        eta = (self.total - done) / rate if rate > 0 else None
        merged = (c.get(MessageState.MERGED, 0) + done - c.get(MessageState.SKIPPED, 0)
                  - c.get(MessageState.CANCELLED, 0))
        tail = (f"{done:>{len(str(self.total))},}/{self.total:,}  sorted {merged:,}  "
                f"{rate:,.0f} msg/s  {elapsed:4.0f}s"
                + (f"  ETA {eta:3.0f}s" if eta is not None and done < self.total else ""))
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            bar_width = max(10, min(40, width - len(tail) - 4))
            filled = int(bar_width * done / self.total)
            line = f"[{'#' * filled}{'.' * (bar_width - filled)}] {tail}"
            self.stream.write("\r" + line[:width - 1].ljust(width - 1))
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self._last = now
            self.stream.write(f"progress: {tail}\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
