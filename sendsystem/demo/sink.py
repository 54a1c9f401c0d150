"""The counting SMTP sink: accepts every message on 127.0.0.1 and counts it per recipient.

A minimal asyncio SMTP server, not aiosmtpd: aiosmtpd reads DATA one line per
await (~300 awaits for 22 KB) and, sharing two cores with MariaDB and six
role processes, it became the bottleneck. This one finds the end of DATA
with one ``bytes.find`` per chunk, keeps no bodies, and counts by recipient
and by Message-ID (a resend of the same message is a duplicate even when it
goes to a second relay), which is all the demo's check needs.

It is also the relay of the benchmarks and of the fault-injection tests
(tests/harness/cluster.py), which answer some RCPTs otherwise through
:meth:`CountingSink.rcpt_reply` (a ``421`` reply also closes the
connection, as a real MTA does) and note when each message arrived through
:meth:`CountingSink.accepted`.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
from collections import Counter
from dataclasses import dataclass, field

from ..config import Relay


@dataclass
class SinkTally:
    """What the sink accepted; updated in the sink's thread, read under ``lock``."""

    by_recipient: Counter[str] = field(default_factory=Counter)
    by_message_id: Counter[str] = field(default_factory=Counter)  # "(none)": no header
    messages: int = 0
    bytes: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_EHLO = (b"250-sendsystem-demo-sink\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
         b"250 SMTPUTF8\r\n")
_MAX_LINE = 4096
_MESSAGE_ID = re.compile(rb"^Message-ID:[ \t]*(\S+)", re.IGNORECASE | re.MULTILINE)


def message_id(data: bytes | bytearray, end: int) -> str:
    """The Message-ID header of the message in ``data[:end]`` ("(none)" without one)."""
    head_end = data.find(b"\r\n\r\n", 0, end)
    found = _MESSAGE_ID.search(data, 0, end if head_end < 0 else head_end)
    return found.group(1).decode("ascii", "replace") if found else "(none)"


class _SinkProtocol(asyncio.Protocol):
    """Just enough ESMTP for a sending client: accept everything, count, keep nothing."""

    def __init__(self, sink: CountingSink) -> None:
        self.sink = sink
        self.tally = sink.tally
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0
        self.rcpts: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        with self.tally.lock:
            self.tally.connections += 1
        transport.write(b"220 sendsystem-demo-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and self.buf:
            if self.in_data:
                if not self._end_of_data():
                    return
            else:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    if len(self.buf) > _MAX_LINE:
                        self._reply(b"500 5.5.2 Line too long\r\n", close=True)
                    return
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                self._command(line)

    def _end_of_data(self) -> bool:
        buf = self.buf
        if buf.startswith(b".\r\n"):  # an empty message
            end, size = 3, 0
        else:
            found = buf.find(b"\r\n.\r\n", self.scan)
            if found < 0:
                self.scan = max(0, len(buf) - 4)
                return False
            end, size = found + 5, found + 2
        mid = message_id(buf, size)
        del buf[:end]
        self.in_data, self.scan = False, 0
        with self.tally.lock:
            self.tally.messages += 1
            self.tally.bytes += size
            self.tally.by_recipient.update(self.rcpts)
            self.tally.by_message_id[mid] += 1
        self.sink.accepted(self.rcpts, mid)
        self.rcpts = []
        self._reply(b"250 2.0.0 Ok: queued\r\n")
        return True

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self._reply(_EHLO)
        elif verb in (b"HELO", b"NOOP"):
            self._reply(b"250 Ok\r\n")
        elif verb == b"MAIL":
            self.rcpts = []
            self._reply(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            start, stop = line.find(b"<"), line.find(b">")
            raw = line[start + 1:stop] if 0 <= start < stop else line[8:].strip()
            address = raw.decode("utf-8", "replace").lower()
            refusal = self.sink.rcpt_reply(address)
            if refusal is not None:
                self._reply(refusal.encode("utf-8") + b"\r\n", close=refusal.startswith("421"))
            else:
                self.rcpts.append(address)
                self._reply(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                self._reply(b"503 5.5.1 Need RCPT first\r\n")
            else:
                self.in_data = True
                self._reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.rcpts = []
            self._reply(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self._reply(b"221 2.0.0 Bye\r\n", close=True)
        else:
            self._reply(b"502 5.5.2 Command not implemented\r\n")

    def _reply(self, text: bytes, close: bool = False) -> None:
        if self.transport is not None:
            self.transport.write(text)
            if close:
                self.transport.close()
                self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class CountingSink:
    """An SMTP sink on 127.0.0.1 in its own thread and event loop, counting per recipient."""

    def __init__(self, port: int = 0) -> None:
        self.tally = SinkTally()
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> CountingSink:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(loop.create_server(
            lambda: _SinkProtocol(self), "127.0.0.1", self._port, backlog=1000))
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=loop.run_forever, name="demo-smtp-sink",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return
        self._loop = None

        async def close() -> None:
            server.close()
            await server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()

    def __enter__(self) -> CountingSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def rcpt_reply(self, address: str) -> str | None:
        """The reply to ``RCPT TO:<address>`` other than ``250`` (None: accept it).

        Called in the sink's thread for every recipient; subclasses refuse some."""
        return None

    def accepted(self, recipients: list[str], message_id: str) -> None:
        """Called in the sink's thread after each message is counted; for subclasses."""

    @property
    def relay(self) -> Relay:
        return Relay("127.0.0.1", self._port)

    @property
    def messages(self) -> int:
        return self.tally.messages

    def counts(self) -> Counter[str]:
        """Deliveries per recipient (lower-cased)."""
        with self.tally.lock:
            return Counter(self.tally.by_recipient)

    def counts_by_message_id(self) -> Counter[str]:
        """Deliveries per Message-ID header."""
        with self.tally.lock:
            return Counter(self.tally.by_message_id)
