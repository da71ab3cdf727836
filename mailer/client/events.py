"""Events of the mailer through a JetStream consumer on its events stream.

A consumer, unlike a plain subscription, misses nothing: every event stored
after the consumer was created (or since a time, or from the start) is
delivered in order, also when the reader is slow, and each is acknowledged
only once the reader asks for the next one, so a durable consumer that
crashed while handling an event gets it again.
"""

from __future__ import annotations

import contextlib
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from mailer.events import stream_name
from mailer.messages import CampaignEvent

__all__ = ["CampaignEvents", "EventMessage", "EventStream"]

# An ephemeral consumer the reader left without deleting it (a killed process,
# or permissions that do not allow deleting) is removed by the server after this.
EPHEMERAL_IDLE_SECONDS = 30.0
# One pull waits this long for events before it asks again.
_PULL_WAIT = 5.0


class EventMessage(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event: its subject, its stream sequence (an idempotency key) and payload."""

    subject: str
    sequence: int
    data: bytes

    def json(self) -> Any:
        return msgspec.json.decode(self.data)


class EventStream:
    """An async iterator of ``EventMessage`` under ``<prefix>.events.<subjects>``.

    The consumer is created on entering ``async with`` (so a caller may read
    a state right after it and miss no change) and deleted on leaving it,
    unless it is durable.
    """

    def __init__(
        self,
        nc: Client,
        prefix: str,
        subjects: str = ">",
        *,
        deliver: Literal["new", "all"] = "new",
        since: datetime | None = None,
        durable: str | None = None,
        batch: int = 100,
    ) -> None:
        self._nc = nc
        self.stream = stream_name(prefix)
        self.filter = f"{prefix}.events.{subjects}"
        self._durable = durable
        self._batch = batch
        self._config = api.ConsumerConfig(
            ack_policy=api.AckPolicy.EXPLICIT,
            deliver_policy=(
                api.DeliverPolicy.BY_START_TIME
                if since is not None
                else api.DeliverPolicy.ALL
                if deliver == "all"
                else api.DeliverPolicy.NEW
            ),
            opt_start_time=since,
            inactive_threshold=None if durable else EPHEMERAL_IDLE_SECONDS,
        )
        self._sub: Any = None
        self._pending: list[Msg] = []
        self._unacked: Msg | None = None

    async def open(self) -> Self:
        if self._sub is None:
            js = self._nc.jetstream()
            self._sub = await js.pull_subscribe(
                self.filter, durable=self._durable, stream=self.stream, config=self._config
            )
        return self

    async def close(self) -> None:
        """Acknowledges what was handed out and stops; an ephemeral consumer is deleted."""
        sub, self._sub = self._sub, None
        if sub is None:
            return
        await self._ack()
        name = sub._consumer  # nats-py keeps the consumer's name there
        with contextlib.suppress(Exception):
            await sub.unsubscribe()
        if self._durable is None:
            # Callers without the right to delete consumers leave it to the server's timeout.
            with contextlib.suppress(Exception):
                await self._nc.jetstream().delete_consumer(self.stream, name)

    async def __aenter__(self) -> Self:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> EventMessage:
        msg = await self._next()
        return EventMessage(
            subject=msg.subject, sequence=msg.metadata.sequence.stream, data=msg.data
        )

    async def _next(self) -> Msg:
        await self.open()
        await self._ack()  # the reader asks for the next one: it handled the last
        while not self._pending:
            try:
                self._pending = await self._sub.fetch(self._batch, timeout=_PULL_WAIT)
            except nats.errors.TimeoutError:
                continue
        self._unacked = self._pending.pop(0)
        return self._unacked

    async def _ack(self) -> None:
        msg, self._unacked = self._unacked, None
        if msg is not None:
            await msg.ack()


class CampaignEvents(EventStream):
    """The ``CampaignEvent``s of one campaign (or of every campaign: ``campaign_id=None``)."""

    def __init__(
        self,
        nc: Client,
        prefix: str,
        campaign_id: int | None,
        *,
        deliver: Literal["new", "all"] = "new",
        since: datetime | None = None,
        durable: str | None = None,
    ) -> None:
        super().__init__(nc, prefix, "campaign.>", deliver=deliver, since=since, durable=durable)
        self.campaign_id = campaign_id

    async def __anext__(self) -> CampaignEvent:  # type: ignore[override]
        while True:
            msg = await self._next()
            event = msgspec.json.decode(msg.data, type=CampaignEvent)
            if self.campaign_id is None or event.campaign_id == self.campaign_id:
                return event
