"""SMTP transport: a pool of reused aiosmtplib connections, one transaction each.

Opening an SMTP session (TCP, greeting, EHLO, STARTTLS, AUTH) costs several
round trips; a transaction on an open session costs two when the server offers
PIPELINING (RFC 2920: MAIL, RCPT and DATA in one write, then the message) and
four otherwise (one command at a time).
So ``SmtpTransport`` keeps up to ``connections`` sessions open and runs one
transaction at a time on each: many concurrent ``send()`` calls share the pool,
and a connection that failed is discarded and replaced lazily.

Every outcome is reported as a ``SendResult`` -- ``send()`` does not raise for
SMTP, network or address problems -- and the verdict on an exception is taken
in one place, ``classify``.

At-most-once: the MAIL/RCPT/DATA stages are driven here one by one (instead of
``SMTP.sendmail``) so that a failure is known to have happened before or after
the message payload went out. A connection lost, a timeout or a garbled reply
*after* the payload was written means the server may have queued the message:
the result is then ``transient`` with ``in_doubt=True``, and the caller should
mark the recipient as in doubt rather than send again.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import aiosmtplib
import msgspec
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectResponseError,
    SMTPDataError,
    SMTPException,
    SMTPHeloError,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPRecipientsRefused,
    SMTPResponse,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
)
from aiosmtplib.protocol import SMTPProtocol

from mailer.payload import Payload
from mailer.render import idna_address
from mailer.smtphealth import SmtpHealth

__all__ = [
    "EXPIRED",
    "ConnectionSetupError",
    "InDoubtError",
    "Outcome",
    "SendResult",
    "SmtpTransport",
    "UnsendableError",
    "classify",
]

Outcome = Literal["sent", "permanent", "transient"]
Security = Literal["none", "starttls", "tls"]

_IN_DOUBT = (
    "in doubt: the connection failed after the message data was sent and before "
    "the server's reply; the message may have been delivered, do not resend blindly"
)


class SendResult(msgspec.Struct, frozen=True, kw_only=True):
    """What happened to one message.

    ``provider_answer`` is the server's reply of the decisive stage as
    "code text" (the DATA reply when sent, e.g. "250 2.0.0 Ok: queued as ABC";
    the refusing reply otherwise), or "" when there was none. ``took_ms`` is the
    time spent on the SMTP work, from taking a pooled connection to the reply,
    so it excludes the wait for a free connection.
    """

    outcome: Outcome
    smtp_code: int | None
    provider_answer: str
    error: str | None
    took_ms: float
    in_doubt: bool = False
    # Not attempted: the account's circuit breaker is open (see mailer.breaker).
    short_circuited: bool = False
    # Not attempted: its send token expired before a connection was free (the
    # grant's window ended). The recipient goes back to pending, unsent.
    expired: bool = False
    # Not delivered because this process closed the transport (shutdown) before
    # the message's end of data went out: nothing reached a mailbox and the
    # server is not to blame, so the recipient simply goes back to the queue.
    aborted: bool = False


EXPIRED = SendResult(
    outcome="transient",
    smtp_code=None,
    provider_answer="",
    error="not attempted: its send token expired (the grant's window ended)",
    took_ms=0.0,
    expired=True,
)


_CLOSED = SendResult(
    outcome="transient",
    smtp_code=None,
    provider_answer="",
    error="transport closed",
    took_ms=0.0,
    aborted=True,
)


class ConnectionSetupError(Exception):
    """Opening or preparing a session failed (connect, TLS, EHLO, AUTH).

    Wraps the cause so that ``classify`` sees that the failure is about the
    connection, not the message: a 535 at AUTH or a 554 greeting is a
    configuration or server problem, and must not mark the address dead.
    """


class InDoubtError(Exception):
    """The connection failed after the DATA payload was written, before a reply."""


class UnsendableError(Exception):
    """The message cannot be sent as given, whatever the number of retries.

    An address that is not one (control characters, invalid IDN domain), or a
    non-ASCII local part when the server does not offer SMTPUTF8.
    """


def classify(exc: BaseException) -> Outcome:
    """The one verdict on a failure: "permanent" (don't retry) or "transient".

    | failure                                                    | outcome   |
    |------------------------------------------------------------|-----------|
    | 5xx reply at MAIL, RCPT or DATA (SMTPSenderRefused,        | permanent |
    |   SMTPRecipientRefused, SMTPDataError, SMTPResponseException)|         |
    | UnsendableError (bad address, SMTPUTF8 not offered)        | permanent |
    | 4xx reply at any stage                                     | transient |
    | connection setup, including 5xx at greeting/EHLO/AUTH      | transient |
    | timeouts, refused/reset connections, disconnects, TLS      | transient |
    | after the payload, before the reply (InDoubtError)         | transient |
    |   -- and SendResult.in_doubt is set: do not resend blindly |           |
    | anything else                                              | transient |

    Unknown failures are transient because the costs are lopsided: a wrong
    "transient" costs a retry that fails again and is capped by the retry
    policy; a wrong "permanent" silently declares a live address dead.
    """
    if isinstance(exc, UnsendableError):
        return "permanent"
    if isinstance(exc, InDoubtError | ConnectionSetupError):
        return "transient"
    if isinstance(exc, SMTPAuthenticationError | SMTPHeloError | SMTPConnectResponseError):
        # Session-level refusals, even when 5xx: about us or the server, not the mail.
        return "transient"
    if isinstance(exc, SMTPRecipientsRefused):
        codes = [refusal.code for refusal in exc.recipients]
        return "permanent" if codes and all(500 <= c < 600 for c in codes) else "transient"
    if isinstance(exc, SMTPResponseException):
        return "permanent" if 500 <= exc.code < 600 else "transient"
    # Timeouts (SMTPTimeoutError, asyncio.TimeoutError), OSError, SMTPConnectError,
    # SMTPServerDisconnected, ssl.SSLError and whatever else: worth a retry.
    return "transient"


def _reply_of(exc: BaseException) -> tuple[int | None, str]:
    """(code, "code text") of the server reply behind an exception, if any."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, SMTPResponseException):
            return seen.code, f"{seen.code} {seen.message}"
        if isinstance(seen, SMTPRecipientsRefused) and seen.recipients:
            first = seen.recipients[0]
            return first.code, f"{first.code} {first.message}"
        seen = seen.__cause__
    return None, ""


def _lost_without_reply(exc: BaseException) -> bool:
    """A transaction's connection failed (not a reply, not the address); setup failures
    are reported where they happen, in ``_connected``."""
    if isinstance(exc, ConnectionSetupError | UnsendableError | SMTPResponseException):
        return False
    return isinstance(exc, InDoubtError | OSError | TimeoutError)


def _describe(stage: str, exc: BaseException) -> str:
    cause = exc.__cause__ if isinstance(exc, ConnectionSetupError | InDoubtError) else None
    shown = cause if cause is not None else exc
    text = f"{stage}: {type(shown).__name__}: {shown}"
    if isinstance(exc, InDoubtError):
        return f"{_IN_DOUBT} ({text})"
    return text


# Bytes handed to the socket per write: the transport buffers at most about
# this much beyond what the kernel took (flow control waits for the rest), so
# a large message is never copied whole into a write buffer.
_WRITE_SLICE = 256 * 1024
# An address parseaddr() and quote_address() leave as it is: ASCII, no quotes,
# spaces, comments or brackets (every other one goes through aiosmtplib's own).
_PLAIN_ADDRESS = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+@[A-Za-z0-9.-]+")
# Chunks smaller than this are joined with their neighbours into one write.
_JOIN_BELOW = 16 * 1024


class _ReplyReader(asyncio.Protocol):
    """Stands in for aiosmtplib's protocol while pipelined replies are read.

    aiosmtplib's protocol reads one reply per command written and drops what
    arrives while no reply is awaited or the last one is not yet picked up, so
    pipelined replies (often in one segment, sometimes split) would be lost.
    During such an exchange the transport's protocol is this one
    (``set_protocol``: uvloop calls the protocol it was given, so patching a
    method would not do): it only buffers, into the SMTP protocol's own buffer,
    and passes flow control, EOF and the loss of the connection on to it.
    """

    def __init__(self, inner: SMTPProtocol) -> None:
        self.inner = inner
        self.closed = False
        self._loop = asyncio.get_running_loop()
        self.arrived: asyncio.Future[None] = self._loop.create_future()

    def _wake(self) -> None:
        if not self.arrived.done():
            self.arrived.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.inner._buffer.extend(data)
        self._wake()

    def eof_received(self) -> bool | None:
        self.closed = True
        self._wake()
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._wake()
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    async def wait(self) -> None:
        await self.arrived
        self.arrived = self._loop.create_future()


async def _read_replies(
    protocol: SMTPProtocol, command: bytes, n: int, timeout: float, where: list[str]
) -> list[SMTPResponse]:
    """Writes ``command`` (several pipelined lines) and reads ``n`` replies, parsed
    with aiosmtplib's own parser (see ``_ReplyReader``). ``where[0]`` advances with
    each reply (MAIL, RCPT, DATA) so that a failure names the command it awaited."""
    transport = protocol.transport
    if transport is None or transport.is_closing():
        raise SMTPServerDisconnected("connection lost")
    reader = _ReplyReader(protocol)
    stages = ("MAIL", "RCPT", "DATA")
    replies: list[SMTPResponse] = []
    transport.set_protocol(reader)
    try:
        protocol.write(command)
        async with asyncio.timeout(timeout):
            while len(replies) < n:
                reply = protocol._read_response_from_buffer()
                if reply is not None:
                    replies.append(reply)
                    if n == len(stages) and len(replies) < n:
                        where[0] = stages[len(replies)]
                    continue
                if reader.closed:
                    raise SMTPServerDisconnected("connection lost while awaiting a reply")
                await reader.wait()
    except TimeoutError as exc:
        raise SMTPReadTimeoutError("Timed out waiting for server response") from exc
    finally:
        if not reader.closed:
            transport.set_protocol(protocol)
    if protocol._buffer:
        # More than was asked for: the next command's reply would be mis-paired.
        raise SMTPResponseException(-1, "unexpected data after the pipelined replies")
    return replies


@dataclass(slots=True, eq=False)
class _Connection:
    """One pool slot; ``smtp`` is None until first use or after a failure."""

    smtp: aiosmtplib.SMTP | None = None
    busy: bool = False
    transactions: int = 0


class SmtpTransport:
    """Concrete SMTP adapter; see the module docstring for the contract.

    ``tls_context`` (optional) replaces the default verification context, e.g. to
    trust a private CA; ``tls_verify=False`` disables certificate checks (local
    sinks only).
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        security: Security,
        username: str | None,
        password: str | None,
        timeout: float,
        connections: int,
        local_hostname: str | None = None,
        tls_verify: bool = True,
        tls_context: ssl.SSLContext | None = None,
        health: SmtpHealth | None = None,
    ) -> None:
        if connections < 1:
            raise ValueError("connections must be >= 1")
        if security not in ("none", "starttls", "tls"):
            raise ValueError(f"unknown security {security!r}")
        self.host = host
        self.port = port
        self.security: Security = security
        self._username = username or None
        self._password = password
        self._timeout = timeout
        self._size = connections
        self._local_hostname = local_hostname
        self._tls_verify = tls_verify
        self._tls_context = tls_context
        self._health = health
        self._slots: list[_Connection] = []
        self._free: asyncio.Queue[_Connection] | None = None
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._close_task: asyncio.Task[None] | None = None

    # --- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Prepares the pool; connections open lazily on first use. Idempotent."""
        if self._free is not None:
            return
        if self._local_hostname is None:
            # aiosmtplib would resolve the FQDN (a DNS call) on every connect; once is enough.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        if self._free is not None:  # another start() finished meanwhile
            return
        # LIFO: the most recently used (warm, connected) slot is taken first, so a
        # light load keeps reusing one session instead of opening all of them.
        free: asyncio.Queue[_Connection] = asyncio.LifoQueue()
        self._slots = [_Connection() for _ in range(self._size)]
        for slot in self._slots:
            free.put_nowait(slot)
        self._free = free

    async def close(self, grace: float | None = None) -> None:
        """Waits for sends in flight (up to ``grace`` s, default the SMTP timeout),
        then QUITs every connection, closing it outright if QUIT fails. Idempotent:
        later calls wait for the first one to finish. Sends after close() return
        a transient result without touching the network.
        """
        if self._close_task is None:
            self._closing = True
            wait = self._timeout if grace is None else grace
            self._close_task = asyncio.create_task(self._close(wait))
        await asyncio.shield(self._close_task)

    async def _close(self, wait: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), wait)
        await asyncio.gather(*(self._quit(slot) for slot in self._slots))

    async def _quit(self, slot: _Connection) -> None:
        smtp, slot.smtp = slot.smtp, None
        if smtp is None:
            return
        if slot.busy or not smtp.is_connected:
            # Still sending after the grace period: cut it (that send reports the
            # failure itself, in doubt if its payload was already out).
            smtp.close()
            return
        try:
            await smtp.quit(timeout=min(self._timeout, 5.0))
        except (SMTPException, OSError, TimeoutError):
            smtp.close()

    # --- sending -------------------------------------------------------------

    async def send(
        self,
        mail_from: str,
        rcpt: str,
        data: bytes | Payload,
        *,
        may_start: Callable[[], bool] | None = None,
    ) -> SendResult:
        """One message to one recipient over a pooled connection.

        ``data`` is the complete message (CRLF line endings preferred), or a
        ``Payload`` already in DATA form, whose shared chunks are written as
        they are. Never raises for SMTP, network or address failures: see
        ``SendResult``. Cancelling a send closes its connection (its state is
        unknown then). After ``close()`` began, a send not yet started is not
        attempted, and one whose end of data had not gone out when its
        connection was cut reports ``aborted``. ``may_start`` is asked once a
        connection is free, just before the message is handed to it: False
        answers ``expired`` without sending (its send token's window is over).
        """
        if self._closing:
            return _CLOSED
        self._in_flight += 1
        self._idle.clear()
        try:
            await self.start()
            assert self._free is not None
            slot = await self._free.get()
            try:
                if self._closing:
                    return _CLOSED
                if may_start is not None and not may_start():
                    return EXPIRED
                return await self._send_on(slot, mail_from, rcpt, data)
            finally:
                self._free.put_nowait(slot)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.set()

    async def _send_on(
        self, slot: _Connection, mail_from: str, rcpt: str, data: bytes | Payload
    ) -> SendResult:
        started = time.perf_counter()
        slot.busy = True
        stage = "connect"
        try:
            try:
                sender = idna_address(mail_from) if mail_from else ""  # "" = null sender
                recipient = idna_address(rcpt)
            except ValueError as exc:
                stage = "address"
                raise UnsendableError(str(exc)) from exc
            payload = data if isinstance(data, Payload) else Payload.of(data)
            reused = slot.smtp is not None and slot.smtp.is_connected
            smtp = await self._connected(slot)
            stage = "MAIL"
            where = ["MAIL"]  # the pipelined envelope's first unanswered command
            pipelined = self._may_pipeline(smtp, sender, recipient)
            try:
                if pipelined:
                    await self._envelope(smtp, sender, recipient, payload, where)
                else:
                    await self._mail(smtp, sender, recipient, payload)
            except SMTPServerDisconnected:
                if not reused or where[0] != "MAIL":
                    stage = where[0]
                    raise
                # The server closed the pooled session while it was idle and the
                # MAIL command hit the closed socket: nothing was sent, so one
                # retry on a fresh connection is safe.
                self._discard(slot)
                stage = "connect"
                smtp = await self._connected(slot)
                stage = "MAIL"
                if pipelined:
                    await self._envelope(smtp, sender, recipient, payload, where)
                else:
                    await self._mail(smtp, sender, recipient, payload)
            except SMTPException:
                stage = where[0]
                raise
            if pipelined:
                stage = "DATA"
                reply = await self._payload(smtp, payload)
            else:
                stage = "RCPT"
                await self._rcpt(smtp, sender, recipient)
                stage = "DATA"
                reply = await self._data(smtp, payload)
        except asyncio.CancelledError:
            self._discard(slot)
            raise
        except Exception as exc:
            if self._health is not None and _lost_without_reply(exc):
                self._health.failed(exc, stage=stage)
            await self._after_failure(slot, exc)
            code, answer = _reply_of(exc)
            in_doubt = isinstance(exc, InDoubtError)
            return SendResult(
                outcome=classify(exc),
                smtp_code=code,
                provider_answer=answer,
                error=_describe(stage, exc),
                took_ms=(time.perf_counter() - started) * 1000,
                in_doubt=in_doubt,
                # Cut by close() (only close cuts a busy connection) before the end
                # of data: undelivered for sure, and no fault of the server's.
                aborted=self._closing and not in_doubt,
            )
        finally:
            slot.busy = False
        slot.transactions += 1
        if self._health is not None:
            self._health.succeeded()
        return SendResult(
            outcome="sent",
            smtp_code=reply.code,
            provider_answer=f"{reply.code} {reply.message}",
            error=None,
            took_ms=(time.perf_counter() - started) * 1000,
        )

    # --- stages --------------------------------------------------------------

    async def _connected(self, slot: _Connection) -> aiosmtplib.SMTP:
        if slot.smtp is not None and slot.smtp.is_connected:
            return slot.smtp
        slot.smtp = None
        smtp = aiosmtplib.SMTP(
            hostname=self.host,
            port=self.port,
            username=self._username,
            password=self._password if self._username else None,
            local_hostname=self._local_hostname,
            timeout=self._timeout,
            use_tls=self.security == "tls",
            # False, not None, for "none": no opportunistic upgrade behind the config.
            start_tls=self.security == "starttls",
            validate_certs=self._tls_verify,
            tls_context=self._tls_context,
        )
        try:
            await smtp.connect()
            if smtp.is_ehlo_or_helo_needed:
                # Extensions (SMTPUTF8, SIZE, 8BITMIME) must be known before MAIL.
                try:
                    await smtp.ehlo()
                except SMTPHeloError:
                    await smtp.helo()
        except asyncio.CancelledError:
            smtp.close()
            raise
        except Exception as exc:
            smtp.close()
            if self._health is not None:
                self._health.failed(exc, stage="connect")
            raise ConnectionSetupError(str(exc)) from exc
        if self._health is not None:
            self._health.succeeded()
        if self._closing:
            # close() ran while this connection was being opened; it would leak.
            smtp.close()
            raise ConnectionSetupError("transport closed")
        slot.smtp = smtp
        slot.transactions = 0
        return smtp

    @staticmethod
    def _encoding(sender: str, recipient: str) -> str:
        return "ascii" if sender.isascii() and recipient.isascii() else "utf-8"

    def _mail_options(
        self, smtp: aiosmtplib.SMTP, sender: str, recipient: str, payload: Payload
    ) -> list[str]:
        options: list[str] = []
        if self._encoding(sender, recipient) == "utf-8":
            if not smtp.supports_extension("smtputf8"):
                raise UnsendableError("non-ASCII local part but the server does not offer SMTPUTF8")
            options.append("SMTPUTF8")
        if not payload.isascii() and smtp.supports_extension("8bitmime"):
            options.append("BODY=8BITMIME")
        if smtp.supports_extension("size"):
            # Lets the server refuse an oversized message before the upload.
            options.append(f"SIZE={payload.size}")
        return options

    @staticmethod
    def _may_pipeline(smtp: aiosmtplib.SMTP, sender: str, recipient: str) -> bool:
        """PIPELINING (RFC 2920) is used when the server offers it and both addresses
        are plain (the others go through aiosmtplib's own quoting, one command at a
        time)."""
        return (
            smtp.supports_extension("pipelining")
            and smtp.protocol is not None
            and bool(_PLAIN_ADDRESS.fullmatch(sender) or not sender)
            and bool(_PLAIN_ADDRESS.fullmatch(recipient))
        )

    async def _envelope(
        self,
        smtp: aiosmtplib.SMTP,
        sender: str,
        recipient: str,
        payload: Payload,
        where: list[str],
    ) -> None:
        """MAIL, RCPT and DATA in one write, their three replies read after (RFC 2920):
        one round trip where one command at a time takes three.

        Nothing of the message goes out before DATA's 354, so every failure here
        is before the payload (never in doubt). ``where[0]`` follows the replies:
        the command whose reply is awaited, the stage a failure is reported at.
        A refusal raises as the one-command path would: the server answers a
        DATA after a refused envelope with 503/554 and keeps the session, which
        ``_after_failure`` resets; a server that answered 354 all the same gets
        an empty end of data first, so the session is back in command mode.
        """
        options = self._mail_options(smtp, sender, recipient, payload)
        mail = b"MAIL FROM:<" + sender.encode() + b">"
        if options:
            mail += b" " + " ".join(options).encode()
        command = mail + b"\r\nRCPT TO:<" + recipient.encode() + b">\r\nDATA\r\n"
        protocol = smtp.protocol
        assert protocol is not None
        replies = await _read_replies(protocol, command, 3, self._timeout, where)
        mail_reply, rcpt_reply, data_reply = replies
        refused: SMTPException | None = None
        if mail_reply.code != 250:
            where[0] = "MAIL"
            refused = SMTPSenderRefused(mail_reply.code, mail_reply.message, sender)
        elif rcpt_reply.code not in (250, 251):
            where[0] = "RCPT"
            refused = SMTPRecipientRefused(rcpt_reply.code, rcpt_reply.message, recipient)
        elif data_reply.code != 354:
            where[0] = "DATA"
            refused = SMTPDataError(data_reply.code, data_reply.message)
        if refused is None:
            return
        if data_reply.code == 354:
            # Data mode although the envelope was refused: end it empty (nobody
            # to deliver to), then the session can be reset and reused.
            await _read_replies(protocol, b".\r\n", 1, self._timeout, where)
        raise refused

    async def _mail(
        self, smtp: aiosmtplib.SMTP, sender: str, recipient: str, payload: Payload
    ) -> SMTPResponse:
        options = self._mail_options(smtp, sender, recipient, payload)
        encoding = self._encoding(sender, recipient)
        if not _PLAIN_ADDRESS.fullmatch(sender):
            return await smtp.mail(sender, options=options, encoding=encoding)
        # A plain address is what aiosmtplib's parse-and-quote would give back
        # unchanged: the command is built directly, without email.utils' parser
        # (a visible share of the CPU per message).
        reply = await smtp.execute_command(
            b"MAIL", b"FROM:<" + sender.encode() + b">", *(o.encode() for o in options)
        )
        if reply.code != 250:
            raise SMTPSenderRefused(reply.code, reply.message, sender)
        return reply

    async def _rcpt(self, smtp: aiosmtplib.SMTP, sender: str, recipient: str) -> SMTPResponse:
        if not _PLAIN_ADDRESS.fullmatch(recipient):
            return await smtp.rcpt(recipient, encoding=self._encoding(sender, recipient))
        reply = await smtp.execute_command(b"RCPT", b"TO:<" + recipient.encode() + b">")
        if reply.code not in (250, 251):
            raise SMTPRecipientRefused(reply.code, reply.message, recipient)
        return reply

    async def _data(self, smtp: aiosmtplib.SMTP, payload: Payload) -> SMTPResponse:
        """DATA in two steps so that a failure is known to be before or after the payload.

        SMTP.data() would do both steps in one call and raise the same
        SMTPServerDisconnected for a drop before the 354 (nothing sent) as for
        a drop after the payload (maybe delivered). The payload goes out in
        slices, each after the previous one drained, so a large message is
        never copied into the write buffer; a failure before the final
        ``.\\r\\n`` left the server without an end of data: not delivered.
        """
        start = await smtp.execute_command(b"DATA")
        if start.code != 354:
            raise SMTPDataError(start.code, start.message)
        return await self._payload(smtp, payload)

    async def _payload(self, smtp: aiosmtplib.SMTP, payload: Payload) -> SMTPResponse:
        """The message after DATA's 354, up to the final reply (see ``_data``)."""
        protocol = smtp.protocol
        if protocol is None:
            raise SMTPServerDisconnected("connection lost before the message data")
        # Safe without the protocol's command lock: this connection runs one
        # transaction at a time. A reply is expected from now on (a server may
        # refuse before the end of data), so it is kept, not dropped as
        # unsolicited, while the slices are written (aiosmtplib's own
        # execute_data_command sets the same flag).
        protocol._response_pending = True
        # Small chunks (the per-recipient parts, the template's static ones) go out
        # joined in one write: each write is a send() system call, and a message of
        # a dozen small chunks would otherwise cost a dozen. A large chunk (a shared
        # attachment) is written in slices from its own bytes, never copied.
        small: list[bytes] = []
        held = 0
        for chunk in payload.chunks:
            if len(chunk) < _JOIN_BELOW:
                small.append(chunk)
                held += len(chunk)
                if held < _WRITE_SLICE:
                    continue
            else:
                if small:
                    protocol.write(b"".join(small))
                    small, held = [], 0
                view = memoryview(chunk)
                for at in range(0, len(view), _WRITE_SLICE):
                    protocol.write(view[at : at + _WRITE_SLICE])  # type: ignore[arg-type]
                    # Waits only while the transport is above its high-water mark.
                    await protocol._drain_helper()
                continue
            protocol.write(b"".join(small))
            small, held = [], 0
            await protocol._drain_helper()
        small.append(b".\r\n")
        protocol.write(b"".join(small))
        try:
            reply = await protocol.read_response(timeout=self._timeout)
        except asyncio.CancelledError:
            smtp.close()
            raise
        except Exception as exc:
            smtp.close()
            raise InDoubtError(str(exc)) from exc
        if reply.code != 250:
            raise SMTPDataError(reply.code, reply.message)
        return reply

    # --- failure handling ----------------------------------------------------

    def _discard(self, slot: _Connection) -> None:
        if slot.smtp is not None:
            slot.smtp.close()
        slot.smtp = None

    async def _after_failure(self, slot: _Connection, exc: Exception) -> None:
        """Keeps the connection only if the server answered cleanly and RSET works."""
        smtp = slot.smtp
        if smtp is None:
            return
        if isinstance(exc, UnsendableError):
            return  # refused before MAIL: no envelope is open, the session is fine
        if not isinstance(exc, SMTPResponseException | SMTPRecipientsRefused):
            self._discard(slot)  # no clean reply: the session state is unknown
            return
        if not smtp.is_connected:  # e.g. aiosmtplib closes on 421
            slot.smtp = None
            return
        try:
            # A refused MAIL/RCPT/DATA leaves an open envelope: reset it for reuse.
            await smtp.rset()
        except asyncio.CancelledError:
            self._discard(slot)
            raise
        except Exception:
            self._discard(slot)
