"""The SMTP sender: owns the process's pool of reused SMTP connections.

Campaign actors (and test emails) ask it to send a rendered batch; it sends
the messages in parallel over the pool and answers with one result per
message, in order. While the breaker is closed each batch is sent by a task of
its own and the reply is that task (``ActorMailer`` awaits it), so a
campaign's next group, handed while the previous one is with SMTP, takes the
connections as they free; while it is open or probing, batches are served one
after another, so that each decides on the breaker after the one before.
At shutdown the service closes its transport the moment every campaign
actor is told to stop (see ``Service.stop``): nothing new is attempted, the
transactions in flight get part of the deadline to finish,
and a cut one reports whether its data had gone out. It keeps the SMTP
account's circuit breaker: while the breaker is open nothing is attempted,
and a campaign asks (``BreakerQuery``) before it reserves send tokens, so a
dead server does not burn the hour.

The breaker counts failures that speak of the server, not of one message: no
SMTP reply at all (refused, timeout, reset, TLS), 421 "service not
available", or a refusal of the session itself. A 450/451/452 for one
recipient (a full mailbox, greylisting) is that recipient's problem: it is
retried with its campaign but does not make the whole process back off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import datetime

import msgspec

from mailer import metrics
from mailer.actors.campaign import Mail
from mailer.actors.runtime import Actor, ActorDead, ActorRef, AskTimeout
from mailer.breaker import BreakerState, CircuitBreaker
from mailer.clock import Clock
from mailer.transport import EXPIRED, SendResult, SmtpTransport

__all__ = ["ActorMailer", "BreakerQuery", "SendBatch", "SenderActor", "SenderMessage"]

_SHORT_CIRCUIT = SendResult(
    outcome="transient",
    smtp_code=None,
    provider_answer="",
    error="not attempted: the SMTP circuit breaker is open",
    took_ms=0.0,
    short_circuited=True,
)


class SendBatch(msgspec.Struct, frozen=True):
    mail_from: str
    mails: list[Mail]
    # The send tokens' window ends here (the sender's clock): a message whose
    # turn for a connection comes at or after it is not sent (``expired``).
    not_after: datetime | None = None


class BreakerQuery(msgspec.Struct, frozen=True):
    """Until when is the account's breaker open? The reply is a datetime or None."""


SenderMessage = SendBatch | BreakerQuery


def _server_failure(r: SendResult) -> bool:
    if r.outcome != "transient" or r.in_doubt or r.short_circuited or r.expired or r.aborted:
        return False
    # Transient 5xx only come from session-level refusals (greeting, EHLO, AUTH).
    return r.smtp_code is None or r.smtp_code == 421 or r.smtp_code >= 500


class SenderActor(Actor[SenderMessage]):
    def __init__(self, transport: SmtpTransport, *, breaker: CircuitBreaker, clock: Clock) -> None:
        self._transport = transport
        self._breaker = breaker
        self._clock = clock
        # Batches being sent by their own tasks (see ``handle``).
        self._flying: set[asyncio.Task[list[SendResult]]] = set()

    async def on_start(self) -> None:
        await self._transport.start()

    async def handle(self, msg: SenderMessage) -> object:
        if isinstance(msg, BreakerQuery):
            return self._breaker.blocked_until(self._clock.now())
        if self._breaker.state is not BreakerState.CLOSED:
            # Open or probing: one batch after another, so that a batch decides on
            # the breaker only once the one before (the probe) was recorded.
            if self._flying:
                await asyncio.wait(self._flying)
            return await self._send(msg)
        # Closed: the batch is served by its own task and the mailbox goes on, so
        # a campaign's next wave takes connections as the previous one frees them.
        # The reply is that task; ``ActorMailer`` awaits it.
        task = self.spawn_task(self._send(msg), name="send-batch")
        self._flying.add(task)
        task.add_done_callback(self._flying.discard)
        return task

    async def _send(self, msg: SendBatch) -> list[SendResult]:
        not_after = msg.not_after

        def may_start() -> bool:
            return not_after is None or self._clock.now() < not_after

        if not may_start():  # nothing attempted: no probe of the breaker is used up
            return [EXPIRED] * len(msg.mails)
        if not self._breaker.allow(self._clock.now()):
            return [_SHORT_CIRCUIT] * len(msg.mails)
        results = await asyncio.gather(
            *(
                self._transport.send(
                    m.mail_from or msg.mail_from, m.rcpt, m.data, may_start=may_start
                )
                for m in msg.mails
            )
        )
        for r in results:
            if not r.expired:
                metrics.SEND_DURATION.observe(r.took_ms / 1000)
        self._breaker.record(
            successes=sum(r.outcome == "sent" for r in results),
            transient_failures=sum(_server_failure(r) for r in results),
            now=self._clock.now(),
        )
        return list(results)

    async def on_stop(self, error: BaseException | None) -> None:
        await self._transport.close()


class ActorMailer:
    """The campaign actor's ``Mailer``: a batch is one ask to the sender."""

    def __init__(self, sender: ActorRef[SenderMessage], *, mail_from: str, timeout: float) -> None:
        self._sender = sender
        self._from = mail_from
        self._timeout = timeout

    async def send_all(
        self, mails: Sequence[Mail], *, not_after: datetime | None = None
    ) -> list[SendResult]:
        if not mails:
            return []
        deadline = asyncio.timeout(self._timeout)
        try:
            async with deadline:
                result = await self._sender.ask(SendBatch(self._from, list(mails), not_after))
                if isinstance(result, asyncio.Task):
                    # Served by the sender's own task. asyncio.wait neither cuts the
                    # send on a timeout here (an ask's timeout never did) nor takes
                    # the task's cancellation (the sender stopping) for our own.
                    await asyncio.wait([result])
                    if result.cancelled():
                        raise ActorDead(self._sender.name, "stopped before the batch was sent")
                    result = result.result()
        except TimeoutError:
            if deadline.expired():
                raise AskTimeout(self._sender.name, f"no reply within {self._timeout}s") from None
            raise
        assert isinstance(result, list)
        return result

    async def blocked_until(self) -> datetime | None:
        result = await self._sender.ask(BreakerQuery(), timeout=self._timeout)
        assert result is None or isinstance(result, datetime)
        return result
