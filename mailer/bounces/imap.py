"""The optional poller of a bounce mailbox over IMAP (``aioimaplib``).

For providers that cannot route bounces to our SMTP receiver: they deliver the reports
to a mailbox, and this reads them. Each message goes through the same path as one the
receiver accepted (``BounceProcessor.message``, channel ``imap``); its envelope
recipient is what the mailbox's delivery headers say (``Delivered-To``,
``X-Original-To``, ``Envelope-To``), the bounce addresses inside it being the fallback,
as for the receiver. Then it is marked handled: ``\\Seen``, or deleted and expunged
with ``MAILER_BOUNCE_IMAP_DELETE``. Messages that are no report are handled too
(counted ``ignored``); one larger than ``MAILER_BOUNCE_MAX_MESSAGE_BYTES`` is marked
handled unread (counted ``ignored``).

Waiting is event-driven: with the server's IDLE (RFC 2177) the poller reads what is
unseen, then idles until the server announces a change (``EXISTS``), renewing the IDLE
every 25 minutes (servers drop one after 30); a message announced while it was reading
(an ``EXISTS`` in a command's answer) makes it read again before idling. Only a server
without IDLE is looked at every ``MAILER_BOUNCE_IMAP_POLL_SECONDS``.

A database failure leaves the message unseen (not lost): the session is closed and
opened again after a pause, and the next look reads it again. A lost connection or a
refused login is retried the same way, the pause doubling up to 5 minutes, one WARNING
per failure. Only the leader polls (``Service``): two pods reading the same unseen
message at once would count a soft bounce twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.parser
import email.policy
import logging
import re
import ssl
from collections.abc import Sequence
from typing import Any, Final

from aioimaplib import IMAP4, IMAP4_SSL, AioImapException, Response

from mailer.bounces.inbound import BounceProcessor
from mailer.clock import Clock
from mailer.config import Settings
from mailer.suppression import BOUNCE_REPORTS

__all__ = ["IDLE_RENEW_SECONDS", "BounceMailbox", "ImapFailed"]

log = logging.getLogger("mailer.bounces")

# RFC 2177: a client should re-issue IDLE at least every 29 minutes.
IDLE_RENEW_SECONDS: Final = 25 * 60.0
_PAUSE_FIRST: Final = 1.0
_PAUSE_MAX: Final = 300.0
# The headers a delivering MTA writes with the envelope recipient.
_DELIVERY_HEADERS: Final = ("delivered-to", "x-original-to", "envelope-to")
_UIDS: Final = re.compile(rb"^[0-9 ]*$")
_SIZE: Final = re.compile(rb"UID (\d+) RFC822\.SIZE (\d+)|RFC822\.SIZE (\d+) UID (\d+)")


class ImapFailed(Exception):
    """The server refused a command (its answer says why)."""


def _ok(response: Response, what: str) -> Response:
    if response.result != "OK":
        text = b" ".join(bytes(x) for x in response.lines[-1:]).decode("utf-8", "replace")
        raise ImapFailed(f"{what}: {response.result} {text}"[:300])
    return response


def delivery_recipients(data: bytes) -> list[str]:
    """The envelope recipients a mailbox's delivery headers name (only the top headers)."""
    head = data.split(b"\r\n\r\n", 1)[0].split(b"\n\n", 1)[0]
    parsed = email.parser.BytesHeaderParser(policy=email.policy.compat32).parsebytes(head)
    found: list[str] = []
    for name in _DELIVERY_HEADERS:
        for value in parsed.get_all(name) or []:
            found.extend(a.strip(" <>\t") for a in str(value).split(",") if a.strip())
    return found


class BounceMailbox:
    """Reads the bounce mailbox while started; ``start``/``stop`` from the leader's duties."""

    def __init__(
        self,
        s: Settings,
        *,
        processor: BounceProcessor,
        clock: Clock,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self._s = s
        self._processor = processor
        self._clock = clock
        self._ssl = ssl_context
        self._task: asyncio.Task[None] | None = None
        self._pause = _PAUSE_FIRST
        self.port = s.bounce_imap_port or (993 if s.bounce_imap_security == "tls" else 143)
        # Told when a look at the mailbox ended (tests wait on it, not on a timer).
        self.looked = asyncio.Condition()
        self.looks = 0
        self.failures = 0  # sessions that ended in an error (told through ``looked`` too)
        # Set while an IDLE the server acknowledged waits for its word.
        self.idling = asyncio.Event()

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="bounce-imap")

    def halt(self) -> None:
        """Stops reading (leadership lost): the session is cut where it is; a message
        not yet marked handled stays unseen, for the next leader."""
        if self._task is not None:
            self._task.cancel()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        self._pause = _PAUSE_FIRST
        while True:
            pause = self._pause
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except (OSError, TimeoutError, AioImapException, ImapFailed, ssl.SSLError) as exc:
                log.warning(
                    "bounce mailbox: session failed; trying again",
                    extra={
                        "imap_host": self._s.bounce_imap_host,
                        "imap_port": self.port,
                        "error": f"{type(exc).__name__}: {exc}"[:300],
                        "retry_in_seconds": pause,
                    },
                )
            except Exception:  # the database, above all: the message stays unseen
                log.exception("bounce mailbox: a report was not recorded; trying again")
            async with self.looked:
                self.failures += 1
                self.looked.notify_all()
            await self._clock.sleep(pause)
            self._pause = min(pause * 2, _PAUSE_MAX)

    def _client(self) -> IMAP4:
        s = self._s
        timeout = s.smtp_timeout_seconds
        if s.bounce_imap_security == "tls":
            return IMAP4_SSL(s.bounce_imap_host, self.port, timeout=timeout, ssl_context=self._ssl)
        return IMAP4(s.bounce_imap_host, self.port, timeout=timeout)

    async def _session(self) -> None:
        s = self._s
        client = self._client()
        lost = asyncio.Event()
        # aioimaplib reports a lost connection only through this callback: an IDLE
        # waiting for the server's word must hear it.
        client.protocol.conn_lost_cb = lambda exc: lost.set()
        # A message that arrives while we search, fetch or store is announced by an
        # untagged EXISTS in that command's answer, which aioimaplib only logs as
        # "ignored": heard here, it makes us look again instead of idling past it.
        arrived = asyncio.Event()
        untagged = client.protocol._untagged_response

        def spy(line: bytes) -> Any:
            if line.rstrip().endswith(b" EXISTS"):
                arrived.set()
            return untagged(line)

        client.protocol._untagged_response = spy
        try:
            await client.wait_hello_from_server()
            _ok(await client.login(s.bounce_imap_username, s.bounce_imap_password), "LOGIN")
            _ok(await client.select(s.bounce_imap_mailbox), "SELECT")
            self._pause = _PAUSE_FIRST  # open again: the next failure starts short
            idle = client.has_capability("IDLE")
            log.info(
                "bounce mailbox open",
                extra={
                    "imap_host": s.bounce_imap_host,
                    "mailbox": s.bounce_imap_mailbox,
                    "idle": idle,
                },
            )
            while True:
                arrived.clear()
                await self._look(client)
                if arrived.is_set():
                    continue  # news while looking: look again before waiting
                if idle:
                    await self._idle(client, lost)
                else:
                    await self._clock.sleep(s.bounce_imap_poll_seconds)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(client.logout(), 2.0)

    async def _idle(self, client: IMAP4, lost: asyncio.Event) -> None:
        """Until the server says something changed, or the IDLE is due for renewal
        (every ``IDLE_RENEW_SECONDS`` of the Clock), or the connection is lost."""
        # aioimaplib's own end of the wait only backs ours up (it runs on the loop's time).
        done = await client.idle_start(timeout=IDLE_RENEW_SECONDS + 300.0)
        self.idling.set()
        push = asyncio.ensure_future(client.wait_server_push(timeout=IDLE_RENEW_SECONDS + 360.0))
        gone = asyncio.ensure_future(lost.wait())
        renew = asyncio.ensure_future(self._clock.sleep(IDLE_RENEW_SECONDS))
        try:
            await asyncio.wait({push, gone, renew}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self.idling.clear()
            for waiter in (push, gone, renew):
                waiter.cancel()
        if lost.is_set():
            raise ConnectionError("the IMAP server closed the connection")
        if push.done() and not push.cancelled():
            push.result()  # a timeout of the backstop: the server is gone silent
        client.idle_done()
        _ok(await asyncio.wait_for(done, self._s.smtp_timeout_seconds), "IDLE")
        # The rest of what the server said while idling (aioimaplib queues each packet
        # on its own): the look that follows reads it all, and a stale item must not end
        # the next IDLE at once.
        queue = client.protocol.idle_queue
        while not queue.empty():
            queue.get_nowait()

    async def _look(self, client: IMAP4) -> None:
        """Handles every unseen message, oldest first."""
        found = _ok(await client.uid_search("UNSEEN UNDELETED", charset=None), "SEARCH")
        uids = [u for line in found.lines[:-1] if _UIDS.match(bytes(line)) for u in line.split()]
        handled: list[str] = []
        for raw in uids:
            uid = raw.decode()
            await self._one(client, uid)
            handled.append(uid)
        if handled and self._s.bounce_imap_delete:
            _ok(await client.expunge(), "EXPUNGE")
        async with self.looked:
            self.looks += 1
            self.looked.notify_all()

    async def _one(self, client: IMAP4, uid: str) -> None:
        sized = _ok(await client.uid("fetch", uid, "(RFC822.SIZE)"), "FETCH")
        size = _size_of(sized.lines)
        if size is not None and size > self._s.bounce_max_message_bytes:
            BOUNCE_REPORTS.labels(kind="ignored", source="imap").inc()
            log.warning(
                "bounce mailbox: message too large; marked handled unread",
                extra={"uid": uid, "bytes": size},
            )
        else:
            fetched = _ok(await client.uid("fetch", uid, "(BODY.PEEK[])"), "FETCH")
            data = _body_of(fetched.lines)
            if data is None:
                raise ImapFailed(f"FETCH {uid}: no message body in the answer")
            # Raises when the database fails: the message stays unseen, read again later.
            await self._processor.message(delivery_recipients(data), data, channel="imap")
        flags = "(\\Seen \\Deleted)" if self._s.bounce_imap_delete else "(\\Seen)"
        _ok(await client.uid("store", uid, "+FLAGS.SILENT", flags), "STORE")


def _size_of(lines: Sequence[bytes | bytearray]) -> int | None:
    for line in lines:
        m = _SIZE.search(bytes(line))
        if m:
            return int(m[2] or m[3])
    return None


def _body_of(lines: Sequence[bytes | bytearray]) -> bytes | None:
    """The literal of a ``FETCH (BODY[] {n}`` answer: aioimaplib gives it as a bytearray."""
    for line in lines:
        if isinstance(line, bytearray):
            return bytes(line)
    return None
