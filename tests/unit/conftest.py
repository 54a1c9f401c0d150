"""The unit tier: pure functions only, so the whole tier runs in seconds.

Every test here runs with the door shut: no database fixture (``db_name``,
``schema`` and ``env`` are refused with a message saying where such a test
belongs), no network (an AF_INET/AF_INET6 connect or bind raises), no child
process (subprocess, fork, multiprocessing). Files under ``tmp_path`` are fine.
A test that needs any of these belongs in tests/integration.
"""

from __future__ import annotations

import _posixsubprocess
import os
import socket
import subprocess
from collections.abc import Iterator
from typing import NoReturn

import pytest


class NotAUnitTest(AssertionError):
    """A unit test reached for the database, the network or a child process."""


def _refuse(what: str) -> NoReturn:
    raise NotAUnitTest(f"a unit test may not use {what}: move the test to tests/integration")


@pytest.fixture(scope="session")
def db_name() -> str:
    _refuse("the database (fixture db_name)")


@pytest.fixture(scope="session")
def schema() -> str:
    _refuse("the database (fixture schema)")


@pytest.fixture
def env() -> None:
    _refuse("the database (fixture env)")


_INET = (socket.AF_INET, socket.AF_INET6)


@pytest.fixture(autouse=True)
def _no_network_no_processes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    real_connect, real_bind = socket.socket.connect, socket.socket.bind
    real_connect_ex = socket.socket.connect_ex

    def connect(self: socket.socket, address: object) -> None:
        if self.family in _INET:
            _refuse(f"the network (connect to {address!r})")
        real_connect(self, address)  # type: ignore[arg-type]

    def connect_ex(self: socket.socket, address: object) -> int:
        if self.family in _INET:
            _refuse(f"the network (connect to {address!r})")
        return real_connect_ex(self, address)  # type: ignore[arg-type]

    def bind(self: socket.socket, address: object) -> None:
        if self.family in _INET:
            _refuse(f"the network (bind to {address!r})")
        real_bind(self, address)  # type: ignore[arg-type]

    def no_process(*args: object, **kwargs: object) -> NoReturn:
        _refuse("a child process")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect_ex)
    monkeypatch.setattr(socket.socket, "bind", bind)
    monkeypatch.setattr(subprocess.Popen, "__init__", no_process)
    monkeypatch.setattr(_posixsubprocess, "fork_exec", no_process)
    monkeypatch.setattr(os, "fork", no_process)
    monkeypatch.setattr(os, "posix_spawn", no_process)
    yield
