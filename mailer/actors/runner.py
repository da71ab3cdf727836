"""The runner: starts campaign actors in this process when the leader asks.

Every process has one, in the queue group ``runners`` of
``<prefix>.internal.campaign.run``, so the leader's ``RunCampaign`` goes to
exactly one process. The campaign actor then takes the campaign's lease in
PostgreSQL on the authority of the leader's fence; if anything else holds it
(or the fence moved on), the actor ends at once and the reply says so.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailer.actors.runtime import Actor
from mailer.actors.scheduler import run_subject
from mailer.bus import Bus, decode, encode
from mailer.messages import RunCampaign, RunReply

__all__ = ["RUNNERS_QUEUE", "RunnerActor", "SpawnCampaign"]

log = logging.getLogger("mailer.runner")

RUNNERS_QUEUE = "runners"

# Starts a campaign actor; True when it is running (it holds the lease).
SpawnCampaign = Callable[[int, int], Awaitable[bool]]


class RunnerActor(Actor[RunCampaign]):
    def __init__(self, *, bus: Bus, spawn: SpawnCampaign, instance_id: str) -> None:
        self._bus = bus
        self._spawn = spawn
        self._me = instance_id
        self._sub: Subscription | None = None

    async def on_start(self) -> None:
        self._sub = await self._bus.nc.subscribe(
            run_subject(self._bus), queue=RUNNERS_QUEUE, cb=self._on_request
        )
        await self._bus.nc.flush()

    async def _on_request(self, msg: Msg) -> None:
        try:
            request = decode(msg.data, RunCampaign)
        except (msgspec.DecodeError, msgspec.ValidationError):
            log.warning("malformed RunCampaign ignored")
            return
        try:
            reply = await self.ref.ask(request, timeout=30.0)
        except Exception as exc:
            log.warning("run request failed: %r", exc, extra={"campaign_id": request.campaign_id})
            reply = RunReply(started=False, runner=self._me)
        with contextlib.suppress(Exception):
            await msg.respond(encode(reply))

    async def handle(self, msg: RunCampaign) -> object:
        started = await self._spawn(msg.campaign_id, msg.fence)
        return RunReply(started=started, runner=self._me)

    async def on_stop(self, error: BaseException | None) -> None:
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
