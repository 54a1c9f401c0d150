"""A cuttable TCP proxy on 127.0.0.1, for network-partition tests.

Put it between one process and MariaDB (point that process's config at the
proxy's port) and the test can:

* :meth:`TcpProxy.cut`: close every current connection and refuse new ones
  (the listening socket is closed: a connect gets ECONNREFUSED) — a switch
  port going down next to a live host;
* :meth:`TcpProxy.blackhole`: keep every connection open but silently drop
  all bytes in both directions, and accept new connections that never answer
  — a dead host or a partition that sends nothing back, not even a reset;
* :meth:`TcpProxy.heal`: forward again (connections that lived through a
  blackhole forward again too; their lost bytes stay lost, as on a network).

One thread with a selector does everything, so a test's commands are queued
and applied between two polls (each call returns once it is applied).
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import threading
from collections.abc import Callable

OPEN, CUT, BLACKHOLE = "open", "cut", "blackhole"


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.mode = OPEN
        self.accepted = 0
        self.dropped_bytes = 0
        self._sel = selectors.DefaultSelector()
        self._peers: dict[socket.socket, socket.socket | None] = {}
        self._listener: socket.socket | None = None
        self.port = 0
        self._listen()
        self._commands: list[tuple[Callable[[], None], threading.Event]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="tcp-proxy", daemon=True)
        self._thread.start()

    # -- the test's switches ------------------------------------------------------

    def cut(self) -> None:
        self._do(self._cut)

    def blackhole(self) -> None:
        self._do(self._blackhole)

    def heal(self) -> None:
        self._do(self._heal)

    def close(self) -> None:
        self._do(self._cut)
        self._stop = True
        self._thread.join(timeout=5)

    def __enter__(self) -> TcpProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- in the proxy thread --------------------------------------------------------

    def _do(self, command: Callable[[], None]) -> None:
        done = threading.Event()
        with self._lock:
            self._commands.append((command, done))
        if not done.wait(timeout=5):
            raise RuntimeError("the proxy thread did not apply the command")

    def _listen(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        listener.setblocking(False)
        self.port = listener.getsockname()[1]
        self._listener = listener
        self._sel.register(listener, selectors.EVENT_READ)

    def _cut(self) -> None:
        self.mode = CUT
        if self._listener is not None:
            self._sel.unregister(self._listener)
            self._listener.close()
            self._listener = None
        for sock in list(self._peers):
            self._close(sock)

    def _blackhole(self) -> None:
        self.mode = BLACKHOLE
        if self._listener is None:
            self._listen()

    def _heal(self) -> None:
        self.mode = OPEN
        if self._listener is None:
            self._listen()

    def _close(self, sock: socket.socket) -> None:
        peer = self._peers.pop(sock, None)
        for s in (sock, peer):
            if s is None:
                continue
            self._peers.pop(s, None)
            with contextlib.suppress(KeyError, ValueError):
                self._sel.unregister(s)
            s.close()

    def _accept(self) -> None:
        assert self._listener is not None
        try:
            client, _ = self._listener.accept()
        except BlockingIOError:
            return
        self.accepted += 1
        if self.mode == BLACKHOLE:
            # A dead host: the connection exists, nothing ever comes back.
            self._peers[client] = None
            self._sel.register(client, selectors.EVENT_READ)
            return
        try:
            upstream = socket.create_connection(self.target, timeout=5)
        except OSError:
            client.close()
            return
        for s in (client, upstream):
            s.setblocking(True)
            s.settimeout(5)
        self._peers[client] = upstream
        self._peers[upstream] = client
        self._sel.register(client, selectors.EVENT_READ)
        self._sel.register(upstream, selectors.EVENT_READ)

    def _pump(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            self._close(sock)
            return
        peer = self._peers.get(sock)
        if self.mode == BLACKHOLE or peer is None:
            self.dropped_bytes += len(data)
            return
        try:
            peer.sendall(data)
        except OSError:
            self._close(sock)

    def _run(self) -> None:
        while not self._stop:
            with self._lock:
                commands, self._commands = self._commands, []
            for command, done in commands:
                command()
                done.set()
            for key, _ in self._sel.select(timeout=0.02):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                if sock is self._listener:
                    self._accept()
                elif sock in self._peers:
                    self._pump(sock)
        for sock in list(self._peers):
            self._close(sock)
        if self._listener is not None:
            self._listener.close()
