"""The CLI's phase progress bars (sendsystem/cli/admin_cmds.py): one bar per phase."""

from __future__ import annotations

from typing import Any

import pytest

from sendsystem.cli import admin_cmds


class FakeBar:
    def __init__(self, log: list[Any], length: int, label: str) -> None:
        self.log, self.length, self.label = log, length, label
        log.append(("open", label, length))

    def __enter__(self) -> FakeBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.log.append(("close", self.label))

    def update(self, n: int) -> None:
        self.log.append(("update", self.label, n))


def test_a_bar_per_phase_closed_when_done(monkeypatch: pytest.MonkeyPatch) -> None:
    log: list[Any] = []
    monkeypatch.setattr(admin_cmds.click, "progressbar",
                        lambda length, label, file: FakeBar(log, length, label))
    bars = admin_cmds.ProgressBars()
    bars("Reading", 0, 100)
    bars("Reading", 40, 100)
    bars("Reading", 100, 100)
    bars("Reading", 100, 100)  # a last report of a finished phase opens nothing
    bars("Writing", 0, 10)
    bars("Writing", 5, 10)
    bars.close()
    bars("Writing", 10, 10)  # closed early (a bad line was printed): stays closed
    assert log == [("open", "Reading", 100), ("update", "Reading", 40),
                   ("update", "Reading", 60), ("close", "Reading"),
                   ("open", "Writing", 10), ("update", "Writing", 5), ("close", "Writing")]
