"""The SMTP sender: owns the process's pool of reused SMTP connections.

Campaign actors ask it to send a rendered batch; it sends the messages in
parallel over the pool and answers with one result per message, in order.
Being an actor, it is stopped after every campaign actor at shutdown, so
the SMTP transactions in flight finish before the connections close.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import msgspec

from mailer import metrics
from mailer.actors.campaign import Mail
from mailer.actors.runtime import Actor, ActorRef
from mailer.transport import SendResult, SmtpTransport

__all__ = ["ActorMailer", "SendBatch", "SenderActor"]


class SendBatch(msgspec.Struct, frozen=True):
    mail_from: str
    mails: list[Mail]


class SenderActor(Actor[SendBatch]):
    def __init__(self, transport: SmtpTransport) -> None:
        self._transport = transport

    async def on_start(self) -> None:
        await self._transport.start()

    async def handle(self, msg: SendBatch) -> object:
        results = await asyncio.gather(
            *(self._transport.send(msg.mail_from, m.rcpt, m.data) for m in msg.mails)
        )
        for r in results:
            metrics.SEND_DURATION.observe(r.took_ms / 1000)
        return list(results)

    async def on_stop(self, error: BaseException | None) -> None:
        await self._transport.close()


class ActorMailer:
    """The campaign actor's ``Mailer``: a batch is one ask to the sender."""

    def __init__(self, sender: ActorRef[SendBatch], *, mail_from: str, timeout: float) -> None:
        self._sender = sender
        self._from = mail_from
        self._timeout = timeout

    async def send_all(self, mails: Sequence[Mail]) -> list[SendResult]:
        result = await self._sender.ask(SendBatch(self._from, list(mails)), timeout=self._timeout)
        assert isinstance(result, list)
        return result
