"""The external sort behind `list import` (sendsystem/extsort.py), with tiny runs."""

from __future__ import annotations

import random
import tempfile
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sendsystem.extsort import ExternalSort, work_dir


def records(n: int, seed: int = 1) -> list[str]:
    rng = random.Random(seed)
    return [f"{rng.choice('abcxyz')}{rng.randrange(10**6):06d}\t{i:010d}\tpayload ø\n"
            for i in range(n)]


def test_many_runs_merged_in_several_passes(tmp_path: Path) -> None:
    data = records(5000)
    sorter = ExternalSort(tmp_path, run_chars=2000, fan_in=3)
    for r in data:
        sorter.add(r)
    assert sorter.count == 5000
    first = list(sorter.sorted())
    assert first == sorted(data)
    assert list(sorter.sorted()) == first  # may be read again (import: check, then write)
    assert len(list(tmp_path.iterdir())) <= 3  # multi-level merge left at most fan_in runs
    sorter.close()
    assert list(tmp_path.iterdir()) == []


def test_small_input_never_touches_the_disk(tmp_path: Path) -> None:
    sorter = ExternalSort(tmp_path)
    for r in ["b\n", "a\n", "c\n"]:
        sorter.add(r)
    assert list(sorter.sorted()) == ["a\n", "b\n", "c\n"]
    assert list(tmp_path.iterdir()) == []


@settings(max_examples=30, deadline=None)
@given(st.lists(st.text(st.characters(blacklist_characters="\n\r", blacklist_categories=("Cs",)),
                        max_size=20), max_size=200),
       st.integers(min_value=1, max_value=300), st.integers(min_value=2, max_value=5))
def test_same_order_as_sorted(tmp_path_factory: object, texts: list[str], run_chars: int,
                              fan_in: int) -> None:
    directory = tmp_path_factory.mktemp("sort")  # type: ignore[attr-defined]
    sorter = ExternalSort(directory, run_chars=run_chars, fan_in=fan_in)
    lines = [t + "\n" for t in texts]
    for line in lines:
        sorter.add(line)
    assert list(sorter.sorted()) == sorted(lines)
    sorter.close()


def test_work_dir_is_tmpdir_else_var_tmp(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", None)
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    assert work_dir() == tmp_path
    monkeypatch.delenv("TMPDIR")
    monkeypatch.setattr(tempfile, "tempdir", None)
    assert work_dir() == Path("/var/tmp")
