"""Leader election through a lease in NATS JetStream KV.

Exactly one process leads the scheduling. The lease is the key ``scheduler``
of a KV bucket whose entries live ``leader_ttl_seconds``:

- a candidate ``create``s the key (succeeds only when it does not exist);
- the leader renews it with ``update(last=revision)`` every third of the TTL;
  an update that fails (someone else's revision, or no answer) ends the
  leadership at once;
- a graceful stop deletes the key: watchers see the delete and a follower
  takes over within a second;
- after a kill -9 the entry expires with the bucket's max age; followers arm a
  timer on every renewal they watch and try again when it passes without a
  newer one: a new leader within the TTL plus a second.

The revision the lease was won at is the **fencing token**: the new leader
raises ``leader_fence.epoch`` to it in PostgreSQL, and every write made on
the leader's authority checks it, so a deposed leader that wakes up late
changes nothing. The lease lives in the NATS server's real time, so this
actor times its renewals with the event loop, not the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from datetime import datetime
from typing import Protocol

import msgspec
from nats.js.errors import KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mailer import metrics
from mailer.actors.runtime import Actor
from mailer.bus import Bus
from mailer.clock import Clock

__all__ = ["FenceStore", "LeaderActor", "TryLead", "bucket_name"]

log = logging.getLogger("mailer.leader")

KEY = "scheduler"


class TryLead(msgspec.Struct):
    """Try to take the lease (it may be free now)."""


class FenceStore(Protocol):
    async def take_fence(self, epoch: int, holder: str, now: datetime) -> bool: ...


def bucket_name(prefix: str) -> str:
    return "mailer_leader_" + re.sub(r"[^A-Za-z0-9_-]", "_", prefix)


class LeaderActor(Actor[TryLead]):
    def __init__(
        self,
        *,
        bus: Bus,
        store: FenceStore,
        clock: Clock,
        instance_id: str,
        ttl: float,
        on_change: Callable[[int | None], None],
    ) -> None:
        self._bus = bus
        self._store = store
        self._clock = clock
        self._me = instance_id
        self._ttl = ttl
        self._on_change = on_change
        self._kv: KeyValue | None = None
        self._revision: int | None = None  # the last revision we wrote, while leading
        self._epoch: int | None = None  # the revision we won the lease at
        self._renewer: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None

    @property
    def epoch(self) -> int | None:
        return self._epoch

    async def on_start(self) -> None:
        js = self._bus.nc.jetstream()
        self._kv = await js.create_key_value(
            bucket=bucket_name(self._bus.prefix), ttl=self._ttl, history=1
        )
        self.spawn_task(self._watch(self._kv), name="leader-watch")
        self.ref.tell(TryLead())

    async def handle(self, msg: TryLead) -> object:
        if self._epoch is None:
            await self._try_lead()
        return self._epoch

    async def _try_lead(self) -> None:
        assert self._kv is not None
        try:
            revision = await self._kv.create(KEY, self._me.encode())
        except KeyWrongLastSequenceError:
            # Someone leads, or a dead leader's entry has not expired yet (the
            # server's expiry can lag its max age). A live leader's renewals
            # re-arm this timer via the watcher; a dead one's never come, so
            # we look again shortly instead of waiting for an event.
            self._arm(self._ttl / 3)
            return
        except Exception as exc:  # NATS unreachable: the watcher or timer retries
            log.warning("leader election attempt failed: %r", exc)
            self._arm(self._ttl / 3)
            return
        if not await self._store.take_fence(revision, self._me, self._clock.now()):
            # A newer leader already fenced: ours is a stale win. Give it up.
            log.warning("lease won at a stale revision; resigning", extra={"epoch": revision})
            with contextlib.suppress(Exception):
                await self._kv.delete(KEY, last=revision)
            return
        self._revision = self._epoch = revision
        log.info("became leader", extra={"epoch": revision, "instance": self._me})
        metrics.LEADER.set(1)
        self._renewer = self.spawn_task(self._renew(), name="leader-renew")
        self._on_change(revision)

    async def _renew(self) -> None:
        assert self._kv is not None
        while self._revision is not None:
            await asyncio.sleep(self._ttl / 3)
            try:
                self._revision = await asyncio.wait_for(
                    self._kv.update(KEY, self._me.encode(), last=self._revision),
                    timeout=self._ttl / 3,
                )
            except Exception as exc:
                # Not renewed in time: by the time it could be, another may lead.
                log.error("leadership lost: lease not renewed (%r)", exc)
                self._step_down()
                self.ref.tell(TryLead())
                return

    def _step_down(self) -> None:
        if self._epoch is None:
            return
        self._epoch = self._revision = None
        metrics.LEADER.set(0)
        self._on_change(None)

    async def _watch(self, kv: KeyValue) -> None:
        watcher = await kv.watch(KEY)
        try:
            async for entry in watcher:
                if entry is None:
                    continue
                if entry.operation in (KV_DEL, KV_PURGE):
                    self._tell_try()
                elif entry.value != self._me.encode():
                    # Someone else renewed: if no renewal follows within the
                    # TTL, the entry has expired (kill -9) and we try then.
                    self._arm(self._ttl + 0.25)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _arm(self, delay: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = asyncio.get_running_loop().call_later(delay, self._tell_try)

    def _tell_try(self) -> None:
        if self.ref.alive and self._epoch is None:
            with contextlib.suppress(Exception):
                self.ref.tell(TryLead())

    async def on_stop(self, error: BaseException | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        revision, was_leading = self._revision, self._epoch is not None
        self._step_down()
        if was_leading and revision is not None and self._kv is not None:
            # Resign: the delete wakes the followers' watchers at once.
            try:
                await asyncio.wait_for(self._kv.delete(KEY, last=revision), timeout=2.0)
                log.info("resigned leadership", extra={"epoch": revision})
            except Exception as exc:
                log.warning("resign failed; the lease expires by itself (%r)", exc)
