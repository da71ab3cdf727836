"""The bounce side of one process: what ``Service`` starts when it is configured.

- ``MAILER_BOUNCE_DOMAIN`` set: campaigns send with per-recipient envelope
  senders, and the SMTP receiver listens on ``MAILER_BOUNCE_SMTP_PORT``;
- ``MAILER_BOUNCE_WEBHOOK_SECRET`` set (with a bounce domain): the webhook
  route is mounted on the public server;
- ``MAILER_BOUNCE_IMAP_HOST`` set (with a bounce domain): the bounce mailbox is
  read over IMAP while this process leads (``lead``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import Any

from mailer.bounces.imap import BounceMailbox
from mailer.bounces.inbound import BounceProcessor, OutboxFlush
from mailer.bounces.receiver import BounceReceiver
from mailer.bounces.verp import bounce_address
from mailer.bounces.webhook import BounceWebhook
from mailer.clock import Clock
from mailer.config import Settings
from mailer.events import JetStreamEvents
from mailer.http import HttpServer
from mailer.suppression import PgSuppressions
from mailer.unsubscribe import secrets_of

__all__ = ["Bounces", "envelope_sender"]


def envelope_sender(s: Settings) -> Callable[[int], str] | None:
    """recipient id -> its VERP envelope sender; None when VERP is off."""
    if not s.bounce_domain:
        return None
    secret, domain = s.unsubscribe_secret, s.bounce_domain

    def address(recipient_id: int) -> str:
        return bounce_address(secret, domain, recipient_id)

    return address


class Bounces:
    def __init__(
        self,
        s: Settings,
        *,
        pool: Any,
        events: JetStreamEvents,
        outbox: OutboxFlush,
        clock: Clock,
    ) -> None:
        self._s = s
        self.store = PgSuppressions(
            pool,
            notice=events.suppression_notice,
            soft_limit=s.soft_bounce_limit,
            soft_window=timedelta(days=s.soft_bounce_window_days),
        )
        self.processor = BounceProcessor(
            domain=s.bounce_domain,
            secrets=secrets_of(s),
            store=self.store,
            clock=clock,
            outbox=outbox,
        )
        self.receiver: BounceReceiver | None = None
        self.mailbox: BounceMailbox | None = None
        if s.bounce_domain and s.bounce_imap_host:
            self.mailbox = BounceMailbox(s, processor=self.processor, clock=clock)
        self._started = False
        self._leading = False

    @property
    def smtp_port(self) -> int | None:
        return self.receiver.port if self.receiver is not None else None

    async def start(self, public_http: HttpServer) -> None:
        """Mounts the webhook (before the public server starts) and starts the receiver."""
        s = self._s
        if not s.bounce_domain:
            return
        if s.bounce_webhook_secret:
            webhook = BounceWebhook(secret=s.bounce_webhook_secret, processor=self.processor)
            public_http.add_routes(webhook.routes())
        self.receiver = BounceReceiver(
            s.bounce_smtp_host,
            s.bounce_smtp_port,
            domain=s.bounce_domain,
            processor=self.processor,
            max_bytes=s.bounce_max_message_bytes,
        )
        await self.receiver.start()
        self._started = True
        self.lead(self._leading)

    def lead(self, leading: bool) -> None:
        """Only the leader reads the bounce mailbox (two readers of one unseen message
        would count it twice)."""
        self._leading = leading
        if self.mailbox is None or not self._started:
            return
        if leading:
            self.mailbox.start()
        else:
            self.mailbox.halt()

    async def stop(self) -> None:
        self._started = False
        if self.mailbox is not None:
            await self.mailbox.stop()
        if self.receiver is not None:
            await self.receiver.stop()
