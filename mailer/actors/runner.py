"""The runner: starts campaign actors in this process when the leader asks.

Every process has one. It listens on three subjects:
- ``<prefix>.internal.campaign.run.<instance>``: the leader's ``RunCampaign``
  for this process (the least-loaded one, see ``scheduler``);
- ``<prefix>.internal.campaign.run`` in the queue group ``runners``: the
  fallback when no process answered the roll call, delivered to one process;
- ``<prefix>.internal.runner.load``: the leader's roll call, answered with
  this process's instance and how many campaign actors it runs.

The campaign actor then takes the campaign's (or shard's) lease in PostgreSQL
on the authority of the leader's fence; if anything else holds it (or the
fence moved on), the actor ends at once and the reply says so. The runner is
stopped first when the process stops: it leaves every subject, so a stopping
process neither answers the roll call nor receives work.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from mailer.actors.runtime import Actor
from mailer.bus import Bus, decode, encode
from mailer.messages import RunCampaign, RunnerLoad, RunReply

__all__ = [
    "RUNNERS_QUEUE",
    "RunnerActor",
    "SpawnCampaign",
    "direct_run_subject",
    "load_subject",
    "run_subject",
]

log = logging.getLogger("mailer.runner")

RUNNERS_QUEUE = "runners"

# Starts a campaign actor for the request (home or shard); True when it is
# running (it holds the lease).
SpawnCampaign = Callable[[RunCampaign], Awaitable[bool]]


def run_subject(bus: Bus) -> str:
    return bus.subject("internal", "campaign", "run")


def direct_run_subject(bus: Bus, instance: str) -> str:
    # An instance id is a host name and a pid: a dot or a wildcard in it would
    # split or widen the subject, so every other character becomes "_".
    return bus.subject("internal", "campaign", "run", re.sub(r"[^A-Za-z0-9_-]", "_", instance))


def load_subject(bus: Bus) -> str:
    return bus.subject("internal", "runner", "load")


class RunnerActor(Actor[RunCampaign]):
    def __init__(
        self,
        *,
        bus: Bus,
        spawn: SpawnCampaign,
        instance_id: str,
        load: Callable[[], int] = lambda: 0,
    ) -> None:
        self._bus = bus
        self._spawn = spawn
        self._me = instance_id
        self._load = load
        self._subs: list[Subscription] = []

    async def on_start(self) -> None:
        nc = self._bus.nc
        self._subs = [
            await nc.subscribe(run_subject(self._bus), queue=RUNNERS_QUEUE, cb=self._on_request),
            await nc.subscribe(direct_run_subject(self._bus, self._me), cb=self._on_request),
            await nc.subscribe(load_subject(self._bus), cb=self._on_roll_call),
        ]
        await nc.flush()

    async def _on_roll_call(self, msg: Msg) -> None:
        if not self.ref.alive or not msg.reply:
            return
        with contextlib.suppress(Exception):
            await msg.respond(encode(RunnerLoad(runner=self._me, campaigns=self._load())))

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
        started = await self._spawn(msg)
        return RunReply(started=started, runner=self._me)

    async def on_stop(self, error: BaseException | None) -> None:
        subs, self._subs = self._subs, []
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
