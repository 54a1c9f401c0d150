"""The role processes of a one-machine cluster, each a real ``python -m sendsystem`` child.

Children run in their own process group: a Ctrl-C at the terminal reaches
only the parent, which then sends each child exactly one SIGTERM (a second
signal would make a role stop at once instead of handing back its work).
``Cluster.revive`` does what cron does in production: it starts a role
again when its process exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..db import Database
from ..errors import UserError
from ..states import WorkerState

log = logging.getLogger(__name__)

ROLE_COMMANDS = ("sort-balancer", "send-balancer", "sort-worker", "send-worker")


@dataclass(frozen=True)
class RoleSpec:
    command: str            # one of ROLE_COMMANDS
    name: str               # --name
    max_rate: float | None = None

    @property
    def label(self) -> str:
        return self.name


def default_roles(sort_workers: int = 2, send_workers: int = 2) -> list[RoleSpec]:
    return ([RoleSpec("sort-balancer", "balancer-1"), RoleSpec("send-balancer", "balancer-1")]
            + [RoleSpec("sort-worker", f"sort-{i + 1}") for i in range(sort_workers)]
            + [RoleSpec("send-worker", f"send-{i + 1}") for i in range(send_workers)])


@dataclass(frozen=True)
class Restart:
    role: RoleSpec
    code: int
    reason: str  # the last line of its log


class Cluster:
    """Role processes on this machine, each a real ``python -m sendsystem`` subprocess."""

    def __init__(self, config_path: Path, roles: Sequence[RoleSpec], log_dir: Path,
                 *, log_level: str = "INFO",
                 interpreter: Callable[[RoleSpec], Sequence[str]] | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        """``interpreter(role)``: the command that stands for ``python`` for that role
        (benchmarks: ``taskset -c 0 python``, ``python -m cProfile -o FILE``)."""
        self.config_path = config_path
        self.roles = list(roles)
        self.log_dir = log_dir
        self.log_level = log_level
        self.interpreter = interpreter or (lambda role: [sys.executable])
        self.env = {**os.environ, **(extra_env or {})}
        self.procs: dict[RoleSpec, subprocess.Popen[bytes]] = {}
        self.peak_rss_kb: dict[RoleSpec, int] = {}
        self.restarts: list[Restart] = []

    def log_path(self, role: RoleSpec) -> Path:
        return self.log_dir / f"{role.command}-{role.name}.log"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for role in self.roles:
            self._spawn(role)

    def _spawn(self, role: RoleSpec) -> None:
        args = [*self.interpreter(role), "-m", "sendsystem", "--config",
                str(self.config_path), "--log-level", self.log_level, role.command,
                "--name", role.name]
        if role.max_rate is not None:
            args += ["--max-rate", str(role.max_rate)]
        with self.log_path(role).open("ab") as log_file:
            # Own process group: a terminal Ctrl-C reaches only us, and we
            # send each child exactly one SIGTERM (graceful hand-back).
            self.procs[role] = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, process_group=0)

    def died(self) -> list[tuple[RoleSpec, int]]:
        """Roles whose process has exited (they should run until we stop them)."""
        return [(r, p.returncode) for r, p in self.procs.items() if p.poll() is not None]

    def revive(self, max_restarts: int = 5) -> list[tuple[RoleSpec, int]]:
        """Do what cron does in production: start again each role process that exited.

        Returns the roles that died and could NOT be restarted (more than
        ``max_restarts`` times already). Every restart is kept in ``restarts``
        with the last line of the log (the reason) so it can be reported.
        """
        given_up = []
        for role, code in self.died():
            if sum(1 for r in self.restarts if r.role == role) >= max_restarts:
                given_up.append((role, code))
                continue
            self.sample_memory()
            reason = self.tail(role, 1)
            log.info("%s %s exited with status %s (%s); starting it again, as cron would",
                        role.command, role.name, code, reason)
            self.restarts.append(Restart(role, code, reason))
            self._spawn(role)
        return given_up

    def sample_memory(self) -> None:
        """Record each live child's peak RSS (VmHWM) so far; call periodically."""
        for role, proc in self.procs.items():
            if proc.poll() is None:
                kb = peak_rss_kb(proc.pid)
                if kb:
                    self.peak_rss_kb[role] = max(self.peak_rss_kb.get(role, 0), kb)

    def stop(self, timeout: float = 20.0) -> dict[RoleSpec, int | None]:
        """SIGTERM every child once, wait; SIGKILL what does not exit in ``timeout``."""
        self.sample_memory()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[RoleSpec, int | None] = {}
        for role, proc in self.procs.items():
            try:
                codes[role] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %s did not stop within %.0fs; killing it", role.command,
                            role.name, timeout)
                proc.kill()
                proc.wait()
                codes[role] = None
        return codes

    def tail(self, role: RoleSpec, lines: int = 8) -> str:
        try:
            text = self.log_path(role).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a live process in KiB (0 when it is gone or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def wait_registered(db: Database, cluster: Cluster, timeout: float = 60.0) -> None:
    """Until every role process has registered and heartbeated once."""
    want = {(r.command.removesuffix("-worker"), r.name) for r in cluster.roles}
    deadline = time.monotonic() + timeout
    while True:
        rows = db.fetchall("workers_all")
        seen = {(w["role"], w["name"]) for w in rows
                if w["state"] in (WorkerState.RUNNING, WorkerState.STANDBY)
                and w["heartbeat_age"] is not None}
        if want <= seen:
            return
        dead = cluster.died()
        if dead:
            role, code = dead[0]
            raise UserError(f"{role.command} {role.name} exited with status {code} at start:\n"
                            f"{cluster.tail(role)}")
        if time.monotonic() > deadline:
            raise UserError(f"the role processes did not all register within {timeout:.0f}s "
                            f"(missing: {sorted(want - seen)}); see {cluster.log_dir}")
        time.sleep(0.2)
