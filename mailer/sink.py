"""A local SMTP sink: accepts every message, keeps it in memory and as a ``.eml`` file.

It stands in for a real SMTP relay under ``mailer dev``, ``make demo`` and the tests.

Why an in-loop server and not ``aiosmtpd.controller.Controller``: the Controller runs its own
event loop in a thread, so every message would cross threads before a test could see it, the
asyncio primitives behind :meth:`SmtpSink.wait_for` would need ``call_soon_threadsafe``, and its
start-up self-test connection costs time. Serving ``aiosmtpd.smtp.SMTP`` protocols with
``loop.create_server`` in the caller's loop has none of that; the price is that a caller who
blocks the loop also blocks the sink, which a test would notice at once anyway.

Tests can program failures per recipient (see :meth:`SmtpSink.fail`), e.g. ``550 5.1.1`` at
RCPT time for a bounced address or ``451 4.3.0`` at DATA time a given number of times to
exercise retries; :class:`ByLocalPart` decides by the address itself (``reject…@`` bounces,
``temp…@`` answers 4xx), for drivers that only choose addresses. Whole-server faults, for
the chaos suite: :meth:`SmtpSink.outage` answers ``421`` to every message or black-holes
every session (no answer at all) until :meth:`SmtpSink.heal`; ``data_delay`` makes it slow.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiosmtpd.smtp import SMTP, Envelope, Session

__all__ = [
    "OUTAGE_REPLY",
    "PERMANENT_FAILURE",
    "TRANSIENT_FAILURE",
    "ByLocalPart",
    "Outage",
    "ReceivedMessage",
    "Rejection",
    "ReplyHook",
    "SmtpSink",
    "Stage",
]

log = logging.getLogger(__name__)

PERMANENT_FAILURE = "550 5.1.1 No such user"
TRANSIENT_FAILURE = "451 4.3.0 Try again later"
OUTAGE_REPLY = "421 4.3.2 Service not available"

#: ``"421"``: every message is refused with :data:`OUTAGE_REPLY`; ``"blackhole"``: the
#: sink reads commands but never answers them (a hung provider: only the client's
#: timeout ends the wait) and never accepts what it was sent.
Outage = Literal["421", "blackhole"]

Stage = Literal["rcpt", "data"]
#: ``hook(stage, address)`` returns an SMTP reply line to refuse ``address`` or ``None``.
ReplyHook = Callable[[Stage, str], str | None]


@dataclass(frozen=True, slots=True)
class ReceivedMessage:
    """One accepted message, as the client sent it (``data`` is the raw DATA payload)."""

    mail_from: str
    rcpt_tos: tuple[str, ...]
    data: bytes
    path: Path | None
    received_at: float


@dataclass(frozen=True, slots=True)
class Rejection:
    """One refusal the sink answered, so tests can count retries."""

    stage: Stage
    address: str
    reply: str


@dataclass(slots=True)
class _Rule:
    stage: Stage
    reply: str
    remaining: int | None  # None: for ever


@dataclass(slots=True)
class _Waiter:
    count: int
    future: asyncio.Future[None] = field(repr=False)


class ByLocalPart:
    """A :data:`ReplyHook` deciding by the address: ``reject…@`` is refused ``550`` at RCPT;
    ``temp…@`` gets ``451`` at RCPT for ever, ``temp<N>…@`` (``temp2-x@``) only its first
    N times. Every other address is accepted. Counts are per address, in this instance.
    """

    def __init__(self) -> None:
        self.attempts: dict[str, int] = {}

    def __call__(self, stage: Stage, address: str) -> str | None:
        local = address.partition("@")[0].lower()
        if stage != "rcpt":
            return None
        if local.startswith("reject"):
            return PERMANENT_FAILURE
        if not local.startswith("temp"):
            return None
        digits = local[4:].partition("-")[0]
        seen = self.attempts.get(address.lower(), 0) + 1
        self.attempts[address.lower()] = seen
        if digits.isdigit() and seen > int(digits):
            return None
        return TRANSIENT_FAILURE


def _check_reply(reply: str) -> str:
    """A refusal must be a 4xx or 5xx reply line, or aiosmtpd would send nonsense."""
    code = reply[:3]
    if len(reply) < 4 or not code.isdigit() or code[0] not in "45" or reply[3] != " ":
        raise ValueError(f"not a 4xx/5xx SMTP reply line: {reply!r}")
    return reply


class SmtpSink:
    """An SMTP server on ``host:port`` (port 0: any free one) that stores what it receives.

    ``outbox_dir=None`` keeps messages in memory only; ``keep_in_memory=False`` keeps only the
    count (for long benchmark runs). Use as ``async with SmtpSink(...) as sink`` or call
    :meth:`start` / :meth:`stop`.
    """

    def __init__(
        self,
        outbox_dir: Path | str | None,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        hostname: str = "mailer-sink.localhost",
        keep_in_memory: bool = True,
        data_size_limit: int = 32 * 1024 * 1024,
    ) -> None:
        self.outbox_dir = Path(outbox_dir).resolve() if outbox_dir is not None else None
        self.host = host
        self._requested_port = port
        # An explicit hostname matters: without it aiosmtpd calls socket.getfqdn() for every
        # connection, which can block the loop for seconds on a host with slow DNS.
        self._hostname = hostname
        self._keep = keep_in_memory
        self._data_size_limit = data_size_limit
        self._server: asyncio.Server | None = None
        self._protocols: set[SMTP] = set()
        self._messages: list[ReceivedMessage] = []
        self._rejections: list[Rejection] = []
        self._rules: dict[str, list[_Rule]] = {}
        self._waiters: list[_Waiter] = []
        self._count = 0
        self._seq = itertools.count()
        self._port = 0
        #: Optional callable consulted before the address rules; see :data:`ReplyHook`.
        self.hook: ReplyHook | None = None
        #: Offers PIPELINING (RFC 2920) in its EHLO reply, as the MTAs mailer talks to do,
        #: so the client sends MAIL, RCPT and DATA in one write; False: one at a time.
        self.pipelining = True
        #: Seconds each DATA waits before its reply: a slow provider, for tests that
        #: must act while a campaign is mid-way.
        self.data_delay = 0.0
        #: When set, each DATA waits for this event before its reply: a test holds a
        #: message mid-way without a timer, and lets it go when it has acted.
        self.data_gate: asyncio.Event | None = None
        # A hung provider (see hang()): sessions at that stage wait for release().
        self._hang_stage: Stage | None = None
        self._released = asyncio.Event()
        self._hung = 0
        self._hung_waiters: list[_Waiter] = []
        self._outage: Outage | None = None
        self._healed = asyncio.Event()
        self._healed.set()

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            return
        if self.outbox_dir is not None:
            self.outbox_dir.mkdir(parents=True, exist_ok=True)
        # aiosmtpd logs every connection at INFO on "mail.log"; at thousands of messages per
        # second that drowns the service's own logs. Quiet it unless someone configured it.
        mail_log = logging.getLogger("mail.log")
        if mail_log.level == logging.NOTSET:
            mail_log.setLevel(logging.WARNING)
        loop = asyncio.get_running_loop()
        handler = _Handler(self)

        def factory() -> SMTP:
            proto = _TrackedSMTP(
                self._protocols,
                handler,
                hostname=self._hostname,
                ident="mailer-sink",
                data_size_limit=self._data_size_limit,
                enable_SMTPUTF8=True,
                decode_data=False,
                auth_require_tls=False,
                loop=loop,
            )
            return proto

        self._server = await loop.create_server(factory, self.host, self._requested_port)
        self._port = int(self._server.sockets[0].getsockname()[1])
        log.debug("smtp sink listening on %s:%d", self.host, self._port)

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # Clients such as a pooled SMTP connection may keep sessions open; close them, else
        # wait_closed() (which waits for every connection on Python 3.12+) would hang.
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)
        except TimeoutError:
            log.warning("smtp sink: connections still open after stop")
        for waiter in self._waiters:
            if not waiter.future.done():
                waiter.future.cancel()
        self._waiters.clear()

    async def __aenter__(self) -> SmtpSink:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the SMTP sink is not started")
        return self._port

    # --- what tests look at ----------------------------------------------------------

    @property
    def messages(self) -> Sequence[ReceivedMessage]:
        """Accepted messages in arrival order (empty when ``keep_in_memory=False``)."""
        return tuple(self._messages)

    @property
    def count(self) -> int:
        """Messages accepted since start or the last :meth:`reset`."""
        return self._count

    @property
    def rejections(self) -> Sequence[Rejection]:
        return tuple(self._rejections)

    def messages_to(self, address: str) -> list[ReceivedMessage]:
        key = address.lower()
        return [m for m in self._messages if key in (r.lower() for r in m.rcpt_tos)]

    # A timeout argument (ASYNC109) reads best in tests: ``await sink.wait_for(3, 5)``.
    async def wait_for(self, n: int, timeout: float = 10.0) -> Sequence[ReceivedMessage]:
        """Waits until at least ``n`` messages have been accepted; TimeoutError otherwise.

        Woken by the DATA handler itself, so there is no polling interval to tune.
        """
        if self._count < n:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(n, fut)
            self._waiters.append(waiter)
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"smtp sink: {self._count} of {n} messages after {timeout:g}s"
                ) from None
            finally:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
        return self.messages

    # --- programmable replies ----------------------------------------------------------

    def fail(
        self,
        address: str,
        reply: str = PERMANENT_FAILURE,
        *,
        stage: Stage = "rcpt",
        times: int | None = None,
    ) -> None:
        """Refuses ``address`` with ``reply`` at ``stage``; ``times=N`` only the next N times.

        At ``"data"`` stage the whole message is refused (SMTP has one DATA reply per
        message), when any of its recipients has such a rule.
        """
        if times is not None and times < 1:
            raise ValueError("times must be >= 1 or None")
        rule = _Rule(stage, _check_reply(reply), times)
        self._rules.setdefault(address.lower(), []).append(rule)

    def hang(self, stage: Stage) -> None:
        """Never answers from now on at ``stage`` (a hung provider) until :meth:`release`.

        ``"rcpt"``: the RCPT command gets no reply, so nothing was delivered; ``"data"``:
        the end of data gets no reply, so the client cannot know (in doubt).
        """
        self._hang_stage = stage
        self._released = asyncio.Event()

    def release(self) -> None:
        """Ends :meth:`hang`: the hung sessions go on (their clients may be gone)."""
        self._hang_stage = None
        self._released.set()

    @property
    def hung(self) -> int:
        """Sessions that have been held by :meth:`hang` since start or the last reset."""
        return self._hung

    async def wait_hung(self, n: int, timeout: float = 10.0) -> None:
        """Waits until ``n`` sessions are (or were) held by :meth:`hang`."""
        if self._hung < n:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            waiter = _Waiter(n, fut)
            self._hung_waiters.append(waiter)
            try:
                await asyncio.wait_for(fut, timeout)
            except TimeoutError:
                raise TimeoutError(
                    f"smtp sink: {self._hung} of {n} hung after {timeout:g}s"
                ) from None
            finally:
                if waiter in self._hung_waiters:
                    self._hung_waiters.remove(waiter)

    async def _maybe_hang(self, stage: Stage) -> None:
        if self._hang_stage != stage:
            return
        self._hung += 1
        for waiter in [w for w in self._hung_waiters if w.count <= self._hung]:
            self._hung_waiters.remove(waiter)
            if not waiter.future.done():
                waiter.future.set_result(None)
        await self._released.wait()

    def outage(self, kind: Outage) -> None:
        """Every session from now on fails as ``kind`` says, until :meth:`heal`."""
        if kind not in ("421", "blackhole"):
            raise ValueError(f"unknown outage {kind!r}")
        self._outage = kind
        self._healed.clear()

    def heal(self) -> None:
        """Ends an outage. Sessions held by a black hole are closed without an answer:
        nothing they sent is accepted."""
        self._outage = None
        self._healed.set()

    @property
    def outage_kind(self) -> Outage | None:
        return self._outage

    def clear_rules(self) -> None:
        self._rules.clear()
        self.hook = None

    def reset(self) -> None:
        """Forgets messages, rejections and rules (files in the outbox stay)."""
        self._messages.clear()
        self._rejections.clear()
        self._count = 0
        self.data_delay = 0.0
        self.data_gate = None
        self.release()
        self._hung = 0
        self.heal()
        self.clear_rules()

    # --- internals used by the handler ---------------------------------------------------

    def _reply_for(self, stage: Stage, address: str) -> str | None:
        if self.hook is not None:
            hooked = self.hook(stage, address)
            if hooked is not None:
                return _check_reply(hooked)
        rules = self._rules.get(address.lower())
        if not rules:
            return None
        for rule in rules:
            if rule.stage != stage:
                continue
            if rule.remaining is not None:
                rule.remaining -= 1
                if rule.remaining <= 0:
                    rules.remove(rule)
            return rule.reply
        return None

    def _refuse(self, stage: Stage, address: str, reply: str) -> str:
        self._rejections.append(Rejection(stage, address, reply))
        return reply

    def _accept(self, mail_from: str, rcpt_tos: tuple[str, ...], data: bytes) -> None:
        path = self._write(mail_from, rcpt_tos, data) if self.outbox_dir is not None else None
        self._count += 1
        if self._keep:
            self._messages.append(ReceivedMessage(mail_from, rcpt_tos, data, path, time.time()))
        if self._waiters:
            for waiter in [w for w in self._waiters if w.count <= self._count]:
                self._waiters.remove(waiter)
                if not waiter.future.done():
                    waiter.future.set_result(None)

    def _write(self, mail_from: str, rcpt_tos: tuple[str, ...], data: bytes) -> Path:
        """Writes one .eml, synchronously in the loop, on purpose.

        Measured here: a thread-pool hop per message made the sink slower (about 800 vs
        1,300 messages/s with client and sink in one process), the hop costing more than
        the write. There is deliberately no fsync: the outbox is for eyes and tests, losing
        it in a power cut is fine. The 250 reply follows the write, so a test that saw the
        message sees its file. The file appears under its final name only when complete
        (write then rename) so a watcher never reads half a message; time_ns plus a counter
        keeps names unique and sortable in arrival order. For pure throughput runs pass
        ``outbox_dir=None``.
        """
        name = f"{time.time_ns():020d}-{next(self._seq):08d}.eml"
        assert self.outbox_dir is not None
        final = self.outbox_dir / name
        tmp = self.outbox_dir / (name + ".tmp")
        # Trace headers like an MTA's delivery adds, so a human reading the file sees the
        # envelope, which may differ from the To: header.
        header = f"Return-Path: <{mail_from}>\r\nX-Sink-Rcpt-To: {', '.join(rcpt_tos)}\r\n"
        trace = header.encode("utf-8", "surrogateescape")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, trace + data)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return final


class _TrackedSMTP(SMTP):
    """An SMTP protocol that registers itself so stop() can close live sessions."""

    def __init__(self, registry: set[SMTP], handler: Any, **kwargs: Any) -> None:
        super().__init__(handler, **kwargs)
        self._registry = registry

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._registry.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._registry.discard(self)
        super().connection_lost(error)


class _Handler:
    """aiosmtpd hooks; kept apart so SmtpSink's public API has no ``handle_*`` names."""

    def __init__(self, sink: SmtpSink) -> None:
        self._sink = sink

    async def _outage_reply(self, server: SMTP) -> str | None:
        """None when the sink works; else the reply an outage gives (after a black hole
        ends, the session is closed: the client never gets an answer)."""
        kind = self._sink._outage
        if kind is None:
            return None
        if kind == "421":
            return OUTAGE_REPLY
        await self._sink._healed.wait()
        if server.transport is not None:
            server.transport.close()
        return OUTAGE_REPLY

    # The handle_* names are the ones aiosmtpd looks up on its handler.
    async def handle_EHLO(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        hostname: str,
        responses: list[str],
    ) -> list[str]:
        session.host_name = hostname  # what aiosmtpd does itself without this hook
        if not self._sink.pipelining:
            return responses
        # aiosmtpd reads a pipelined group line by line and answers each in turn.
        return [*responses[:-1], "250-PIPELINING", responses[-1]]

    async def handle_MAIL(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        mail_options: list[str],
    ) -> str:
        outage = await self._outage_reply(server)
        if outage is not None:
            return outage
        envelope.mail_from = address
        envelope.mail_options.extend(mail_options)
        return "250 OK"

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        await self._sink._maybe_hang("rcpt")
        outage = await self._outage_reply(server)
        if outage is not None:
            return outage
        reply = self._sink._reply_for("rcpt", address)
        if reply is not None:
            return self._sink._refuse("rcpt", address, reply)
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(rcpt_options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        outage = await self._outage_reply(server)
        if outage is not None:
            return outage
        rcpt_tos = tuple(envelope.rcpt_tos)
        for address in rcpt_tos:
            reply = self._sink._reply_for("data", address)
            if reply is not None:
                return self._sink._refuse("data", address, reply)
        await self._sink._maybe_hang("data")
        if self._sink.data_delay:
            await asyncio.sleep(self._sink.data_delay)
        if self._sink.data_gate is not None:
            await self._sink.data_gate.wait()
        data = envelope.original_content or b""
        self._sink._accept(envelope.mail_from or "", rcpt_tos, data)
        return "250 OK"
