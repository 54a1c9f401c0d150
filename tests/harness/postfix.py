"""A private Postfix instance on loopback, for the tests and for bench/pipeline.py.

One copy of what starting a throw-away Postfix takes: its own main.cf and
master.cf in a temp dir (short path: Postfix's UNIX sockets live under the
queue directory), queue and data directories, smtpd on a free 127.0.0.1 port,
no chroot (a private instance has no chroot tree), the log in a file of its
own (``maillog_file`` through postlogd: there is no syslog in a sandbox).

The tests (tests/integration/test_postfix_bounce.py, test_relays_postfix.py)
pass their own main.cf body and turn :class:`PostfixUnavailable` into a skip;
the pipeline benchmark (bench/pipeline.py --relay postfix, which puts the
repository root on sys.path as bench/tracking_load.py does) turns it into an
exit message. Either way :func:`private_postfix` stops the instance and
removes its directory when the ``with`` block ends, also on Ctrl-C: the stop
waits for the master process to be gone (``postfix stop`` does not wait), and
a second Ctrl-C during the teardown is ignored so the queue is not left behind.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from sendsystem.importer import process_exists

POSTFIX = Path("/usr/sbin/postfix")
SMTP_SINK = Path("/usr/sbin/smtp-sink")
SMTP_SOURCE = Path("/usr/sbin/smtp-source")
DAEMONS = Path("/usr/lib/postfix/sbin")

# What every private instance needs; a caller's main.cf body follows it.
# {base}, {daemons} are filled in here; the caller's own fields by the caller.
MAIN_CF_BASE = """\
compatibility_level = 3.6
queue_directory = {base}/queue
data_directory = {base}/data
daemon_directory = {daemons}
mail_owner = postfix
setgid_group = postdrop
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtputf8_enable = no
biff = no
maillog_file = {base}/maillog
maillog_file_prefixes = {base}
"""

# Only what the tests and the benchmark need, and no chroot.
MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n -  0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n -  - trivial-rewrite
bounce    unix  - - n -  0 bounce
defer     unix  - - n -  0 bounce
trace     unix  - - n -  0 bounce
verify    unix  - - n -  1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n -  - proxymap
smtp      unix  - - n -  - smtp
relay     unix  - - n -  - smtp
showq     unix  n - n -  - showq
error     unix  - - n -  - error
retry     unix  - - n -  - error
discard   unix  - - n -  - discard
local     unix  - n n -  - local
virtual   unix  - n n -  - virtual
anvil     unix  - - n -  1 anvil
scache    unix  - - n -  1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


class PostfixUnavailable(Exception):
    """Postfix is not installed, we are not root, or the instance did not come up."""


def why_not() -> str | None:
    """Why a private Postfix cannot run here (None: it can)."""
    if not (POSTFIX.exists() and SMTP_SINK.exists() and DAEMONS.is_dir()):
        return "Postfix is not installed (Debian package postfix; `make postfix`)"
    if os.geteuid() != 0:
        return "a private Postfix instance must be started as root"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return "there is no 'postfix' user"
    return None


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return True
        time.sleep(0.1)
    return False


@dataclass(frozen=True)
class PostfixInstance:
    port: int       # smtpd on 127.0.0.1
    base: Path      # everything of the instance lives under it (removed at the end)
    conf: Path      # its config directory (postfix -c)
    log: Path       # its maillog

    def maillog(self, tail: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return "(no maillog)"

    def master_pid(self) -> int | None:
        """The instance's master process (its daemons are its children)."""
        return _master_pid(self.base)

    def queue_files(self) -> int:
        """Messages in the instance's queues (incoming, active, deferred, hold, maildrop)."""
        n = 0
        for name in ("maildrop", "incoming", "active", "deferred", "hold"):
            for _dirpath, _dirs, files in os.walk(self.base / "queue" / name):
                n += len(files)
        return n


def _master_pid(base: Path) -> int | None:
    try:
        return int((base / "queue" / "pid" / "master.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _stop(conf: Path, base: Path, timeout: float = 20.0) -> None:
    """``postfix stop``, wait for the master to exit, ``postfix abort`` / SIGKILL after."""
    pid = _master_pid(base)
    subprocess.run([str(POSTFIX), "-c", str(conf), "stop"], capture_output=True, timeout=60)
    if pid is None:
        return
    deadline = time.monotonic() + timeout
    while process_exists(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    if process_exists(pid):
        subprocess.run([str(POSTFIX), "-c", str(conf), "abort"], capture_output=True,
                       timeout=60)
        time.sleep(0.5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@contextlib.contextmanager
def _no_interrupt() -> Iterator[None]:
    """Ignore SIGINT while tearing down (main thread only: elsewhere signals cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)


@contextlib.contextmanager
def private_postfix(main_cf: str, *, master_extra: str = "", prefix: str = "sspf-",
                    port: int | None = None,
                    prepare: Callable[[Path], None] | None = None,
                    **fields: object) -> Iterator[PostfixInstance]:
    """Start a private Postfix; stop it and remove its directory when the block ends.

    ``main_cf`` follows :data:`MAIN_CF_BASE` and is formatted with ``base``,
    ``daemons`` and ``fields``. ``prepare(base)`` runs after the directory
    layout exists and before the start (the tests create a Maildir there).
    Raises :class:`PostfixUnavailable` when Postfix cannot run or start here.
    """
    reason = why_not()
    if reason:
        raise PostfixUnavailable(reason)
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    conf = base / "conf"
    started = False
    try:
        base.chmod(0o755)  # the postfix user must reach the queue directory
        conf.mkdir()
        (base / "queue").mkdir()
        (base / "data").mkdir()
        shutil.chown(base / "data", "postfix")
        port = port or closed_port()
        (conf / "main.cf").write_text((MAIN_CF_BASE + main_cf).format(
            base=base, daemons=DAEMONS, **fields))
        (conf / "master.cf").write_text(MASTER_CF.format(port=port) + master_extra)
        if prepare is not None:
            prepare(base)
        instance = PostfixInstance(port, base, conf, base / "maillog")
        run = subprocess.run([str(POSTFIX), "-c", str(conf), "start"], capture_output=True,
                             text=True, timeout=60)
        started = True
        if run.returncode != 0 or not wait_for_port(port, 15):
            raise PostfixUnavailable(
                f"could not start a private Postfix: exit {run.returncode} "
                f"{run.stderr.strip()} {instance.maillog()}")
        yield instance
    finally:
        with _no_interrupt():
            if started:
                _stop(conf, base)
            shutil.rmtree(base, ignore_errors=True)
