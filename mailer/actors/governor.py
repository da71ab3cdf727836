"""The rate governor: the one place that decides whether mail may go now.

Campaign actors in any process ask it over NATS request/reply (subject
``<prefix>.internal.governor.tokens``, queue group ``governor``: one governor
per process, any of them may answer). It grants k <= n tokens, reserved
atomically in Redis before any send, or refuses with a reason and the time
to retry.
"""

from __future__ import annotations

import logging

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailer import metrics
from mailer.actors.runtime import Actor
from mailer.bus import Bus, decode, encode
from mailer.clock import Clock
from mailer.messages import ErrorBody, ErrorReply, TokenReply, TokenRequest
from mailer.ratelimit import HourlyLimiter

__all__ = ["GOVERNOR_QUEUE", "GovernorActor", "NatsTokenSource", "governor_subject"]

log = logging.getLogger("mailer.governor")

GOVERNOR_QUEUE = "governor"


def governor_subject(bus: Bus) -> str:
    return bus.subject("internal", "governor", "tokens")


class GovernorActor(Actor[TokenRequest]):
    def __init__(self, *, bus: Bus, limiter: HourlyLimiter, clock: Clock) -> None:
        self._bus = bus
        self._limiter = limiter
        self._clock = clock
        self._sub: Subscription | None = None

    async def on_start(self) -> None:
        self._sub = await self._bus.nc.subscribe(
            governor_subject(self._bus), queue=GOVERNOR_QUEUE, cb=self._on_request
        )
        # Ready means the server knows the subscription: a request right after start works.
        await self._bus.nc.flush()

    async def _on_request(self, msg: Msg) -> None:
        # Runs in the NATS client's task: decode, hand to the mailbox, reply.
        try:
            request = decode(msg.data, TokenRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            body = ErrorReply(error=ErrorBody(code="bad_request", message=str(exc)))
            await msg.respond(encode(body))
            return
        reply = await self.ref.ask(request, timeout=10.0)
        await msg.respond(encode(reply))

    async def handle(self, msg: TokenRequest) -> object:
        now = self._clock.now()
        r = await self._limiter.reserve(msg.want, now)
        if r.granted:
            metrics.TOKENS_GRANTED.inc(r.granted)
            return TokenReply(granted=r.granted, used=r.used, limit=r.limit)
        metrics.TOKENS_DENIED.labels(reason="rate_per_hour").inc(msg.want)
        log.info(
            "tokens refused",
            extra={
                "campaign_id": msg.campaign_id,
                "defer_reason": "rate_per_hour",
                "rate_limit_count": r.used,
                "deferred_until": r.retry_at.isoformat(),
            },
        )
        return TokenReply(
            granted=0, reason="rate_per_hour", retry_at=r.retry_at, used=r.used, limit=r.limit
        )

    async def on_stop(self, error: BaseException | None) -> None:
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # the connection is already gone
                log.debug("governor unsubscribe failed", exc_info=True)


class NatsTokenSource:
    """What a campaign actor holds to ask the governor (over NATS, any process)."""

    def __init__(self, bus: Bus, *, timeout: float) -> None:
        self._bus = bus
        self._timeout = timeout

    async def request_tokens(self, campaign_id: int, owner_id: str, want: int) -> TokenReply:
        return await self._bus.request(
            governor_subject(self._bus),
            TokenRequest(campaign_id=campaign_id, owner_id=owner_id, want=want),
            TokenReply,
            timeout=self._timeout,
        )
