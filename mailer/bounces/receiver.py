"""The inbound SMTP receiver of bounces and complaints (aiosmtpd, its own port).

Only the bounce domain is accepted (RCPT to any other domain: 550, so the
receiver is no open relay), at most ``_MAX_RCPTS`` recipients a message, and
messages up to ``max_bytes`` (aiosmtpd answers 552 past it). An accepted
message is parsed and applied before the 250 (``BounceProcessor.message``); a
database failure answers 451, so the reporting MTA tries again later rather
than the report being lost. Served in the caller's loop (see ``mailer.sink``
for why not aiosmtpd's Controller thread).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from aiosmtpd.smtp import SMTP, Envelope, Session

from mailer.bounces.inbound import BounceProcessor

__all__ = ["BounceReceiver"]

log = logging.getLogger("mailer.bounces")

_MAX_RCPTS = 10


class _Handler:
    def __init__(self, domain: str, processor: BounceProcessor) -> None:
        self._suffix = "@" + domain.lower()
        self._processor = processor

    async def handle_RCPT(
        self,
        server: SMTP,
        session: Session,
        envelope: Envelope,
        address: str,
        rcpt_options: list[str],
    ) -> str:
        if not address.lower().endswith(self._suffix):
            return "550 5.7.1 Relaying denied: this server takes bounces only"
        if len(envelope.rcpt_tos) >= _MAX_RCPTS:
            return "452 4.5.3 Too many recipients"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        data = envelope.original_content or b""
        try:
            await self._processor.message(list(envelope.rcpt_tos), data)
        except Exception:
            log.exception("bounce report not recorded; the sender will retry")
            return "451 4.3.0 Temporary failure, try again later"
        return "250 OK"


class _TrackedSMTP(SMTP):
    def __init__(self, protocols: set[SMTP], *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._protocols = protocols

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._protocols.add(self)
        super().connection_made(transport)

    def connection_lost(self, error: Exception | None) -> None:
        self._protocols.discard(self)
        super().connection_lost(error)


class BounceReceiver:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        domain: str,
        processor: BounceProcessor,
        max_bytes: int,
        hostname: str | None = None,
    ) -> None:
        self.host = host
        self.port = port  # the real port after start() when 0 was asked for
        self._domain = domain
        self._processor = processor
        self._max_bytes = max_bytes
        # Explicit: without it aiosmtpd resolves socket.getfqdn() per connection.
        self._hostname = hostname or domain
        self._server: asyncio.Server | None = None
        self._protocols: set[SMTP] = set()

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        handler = _Handler(self._domain, self._processor)

        def factory() -> SMTP:
            return _TrackedSMTP(
                self._protocols,
                handler,
                hostname=self._hostname,
                ident="mailer-bounces",
                data_size_limit=self._max_bytes,
                enable_SMTPUTF8=True,
                decode_data=False,
                loop=loop,
            )

        self._server = await loop.create_server(factory, self.host, self.port)
        self.port = int(self._server.sockets[0].getsockname()[1])
        log.info("bounce receiver listening", extra={"host": self.host, "port": self.port})

    async def stop(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for proto in list(self._protocols):
            if proto.transport is not None:
                proto.transport.close()
        try:
            await asyncio.wait_for(server.wait_closed(), timeout=2.0)
        except TimeoutError:
            log.warning("bounce receiver: connections still open after stop")
