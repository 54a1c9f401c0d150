"""The role processes of a one-machine cluster, each a real ``python -m sendsystem`` child.

Children run in their own process group: a Ctrl-C at the terminal reaches
only the parent, which then sends each child exactly one SIGTERM (a second
signal would make a role stop at once instead of handing back its work).
``Cluster.revive`` does what cron does in production: it starts a role
again when its process exits.

This is the one process manager for the demo, the benchmarks (bench/) and the
fault-injection tests (tests/harness/cluster.py, which adds a private
database server on top): ``start()`` runs a fixed set of roles, ``spawn()``
one more process, as a test starts "a server's cron job" by hand. Every
process of a role name appends to one log file, each start marked with a
``---- start`` line.
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


@dataclass
class RoleProcess:
    """One role process standing for one server's cron job."""

    command: str
    name: str
    args: tuple[str, ...]
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def kill(self) -> None:
        """SIGKILL: the server dies with no chance to clean up."""
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()

    def wait(self, timeout: float) -> int:
        """Its exit status; TimeoutError (with the log's tail) if it is still running."""
        try:
            return self.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"{self.command} {self.name} (pid {self.pid}) did not exit "
                               f"within {timeout}s; log:\n{self.log()[-3000:]}") from None

    def log(self) -> str:
        """Its log file (shared with earlier processes of the same role name)."""
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""


@dataclass(frozen=True)
class Restart:
    role: RoleSpec
    code: int
    reason: str  # the last line of its log


class Cluster:
    """Role processes on this machine, each a real ``python -m sendsystem`` subprocess."""

    def __init__(self, config_path: Path, roles: Sequence[RoleSpec], log_dir: Path,
                 *, log_level: str | None = "INFO",
                 interpreter: Callable[[RoleSpec], Sequence[str]] | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        """``interpreter(role)``: the command that stands for ``python`` for that role
        (benchmarks: ``taskset -c 0 python``, ``python -m cProfile -o FILE``).
        ``log_level`` None: the command's own default."""
        self.config_path = config_path
        self.roles = list(roles)
        self.log_dir = log_dir
        self.log_level = log_level
        self.interpreter = interpreter or (lambda role: [sys.executable])
        # Unbuffered: a log read while the process runs (or after SIGKILL) is complete.
        self.process_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(extra_env or {})}
        self.procs: list[RoleProcess] = []
        self.peak_rss_kb: dict[RoleSpec, int] = {}
        self.restarts: list[Restart] = []

    def log_path(self, role: RoleSpec) -> Path:
        return self.log_dir / f"{role.command}-{role.name}.log"

    def start(self) -> None:
        for role in self.roles:
            self._start(role)

    def _start(self, role: RoleSpec) -> RoleProcess:
        args = ("--max-rate", str(role.max_rate)) if role.max_rate is not None else ()
        return self.spawn(role.command, role.name, *args)

    def spawn(self, command: str, name: str, *args: str,
              env: Mapping[str, str] | None = None, config: Path | None = None) -> RoleProcess:
        """Start ``sendsystem COMMAND --name NAME ARGS`` in the background, as cron would.

        ``env`` adds environment variables for this process; ``config``: another
        config file for it (a server whose settings differ)."""
        role = RoleSpec(command, name)
        log_path = self.log_path(role)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        argv = [*self.interpreter(role), "-m", "sendsystem", "--config",
                str(config or self.config_path)]
        if self.log_level is not None:
            argv += ["--log-level", self.log_level]
        argv += [command, "--name", name, *args]
        with log_path.open("ab") as log_file:
            log_file.write(f"---- start {' '.join(args)} at {time.time():.3f}\n".encode())
            log_file.flush()
            # Own process group: a terminal Ctrl-C reaches only us, and we
            # send each child exactly one SIGTERM (graceful hand-back).
            popen = subprocess.Popen(
                argv, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**self.process_env, **(env or {})}, process_group=0)
        proc = RoleProcess(command, name, tuple(args), popen, log_path)
        self.procs.append(proc)
        return proc

    def current(self, role: RoleSpec) -> RoleProcess | None:
        """The role's latest process (earlier ones were restarted or replaced)."""
        for proc in reversed(self.procs):
            if (proc.command, proc.name) == (role.command, role.name):
                return proc
        return None

    def _roles_with_process(self) -> list[tuple[RoleSpec, RoleProcess]]:
        pairs = [(role, self.current(role)) for role in self.roles]
        return [(role, proc) for role, proc in pairs if proc is not None]

    def died(self) -> list[tuple[RoleSpec, int]]:
        """Roles whose process has exited (they should run until we stop them)."""
        return [(role, proc.popen.returncode) for role, proc in self._roles_with_process()
                if not proc.alive()]

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
            self._start(role)
        return given_up

    def sample_memory(self) -> None:
        """Record each live role's peak RSS (VmHWM) so far; call periodically."""
        for role, proc in self._roles_with_process():
            if proc.alive():
                kb = peak_rss_kb(proc.pid)
                if kb:
                    self.peak_rss_kb[role] = max(self.peak_rss_kb.get(role, 0), kb)

    def stop(self, timeout: float = 20.0) -> dict[RoleSpec, int | None]:
        """SIGTERM every live process once, wait; SIGKILL what does not exit in ``timeout``.

        Returns each role's exit status (None: it had to be killed)."""
        self.sample_memory()
        live = [proc for proc in self.procs if proc.alive()]
        for proc in live:
            with contextlib.suppress(ProcessLookupError):
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        killed: set[int] = set()
        for proc in live:
            try:
                proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %s did not stop within %.0fs; killing it", proc.command,
                            proc.name, timeout)
                proc.kill()
                killed.add(id(proc))
        return {role: None if id(proc) in killed else proc.popen.returncode
                for role, proc in self._roles_with_process()}

    def tail(self, role: RoleSpec, lines: int = 8) -> str:
        proc = self.current(role)
        text = proc.log() if proc is not None else ""
        return "\n".join(text.splitlines()[-lines:])

    def logs(self) -> str:
        """Every process log, for failure messages and diagnosis."""
        seen: set[Path] = set()
        parts = []
        for proc in self.procs:
            if proc.log_path not in seen:
                seen.add(proc.log_path)
                parts.append(f"==== {proc.log_path.name}\n{proc.log()}")
        return "\n".join(parts)


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
