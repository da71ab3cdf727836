"""Leader election through a lease in NATS JetStream KV, fenced in PostgreSQL.

Exactly one process leads the scheduling. The lease is the key ``scheduler``
of a KV bucket whose entries live ``leader_ttl_seconds``; it says who may try
to lead, nothing more:

- a candidate ``create``s the key (succeeds only when it does not exist);
- the winner then takes the **fencing token** from PostgreSQL: one
  ``UPDATE leader_fence SET epoch = epoch + 1 ... RETURNING epoch``. The epoch
  only grows whatever happens to NATS (a bucket deleted, a server restarted
  without its JetStream storage, another subject prefix): a KV revision may
  start again from 1, the fence never goes back. Every write made on the
  leader's authority checks it, so a deposed leader that wakes up late
  changes nothing;
- the leader renews the key with ``update(last=revision)`` every third of the
  TTL; an update that fails (someone else's revision, no bucket, no answer)
  ends the leadership at once. After each renewal it reads the fence: if
  another process raised it meanwhile (a candidate that won the key, stalled,
  and fenced after the lease had passed on), the holder of the key fences
  again and re-announces its new epoch;
- a graceful stop deletes the key: watchers see the delete and a follower
  takes over within a second (the service stops this actor before its
  campaign actors drain, see ``service``);
- after a kill -9 the entry expires with the bucket's max age. A follower
  arms a timer at the moment the last renewal it watched expires (the
  entry's server time + TTL) and from then retries every ``RETRY_SECONDS``
  until it wins or sees a newer renewal: the server's expiry lags the max
  age a little, the follower does not add a third of the TTL to that.

A restarted incarnation (the supervisor restarts it after a crash) rebuilds
from the lease: the previous one resigned in its teardown; if that delete did
not reach NATS, the key still holds this process's instance id and the new
incarnation takes it over at once instead of waiting for it to expire. The
bucket is created or brought to the configured TTL and replicas at start and
whenever it has gone away. The lease lives in the NATS server's real time, so
this actor times its renewals with the event loop, not the injected clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Final, Protocol

import msgspec
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KV_DEL, KV_PURGE, KeyValue

from mailer import metrics
from mailer.actors.runtime import Actor
from mailer.bus import STREAM_CONFIG_DIFFERS, Bus
from mailer.clock import Clock

__all__ = ["RETRY_SECONDS", "FenceStore", "LeaderActor", "TryLead", "bucket_name", "open_bucket"]

log = logging.getLogger("mailer.leader")

KEY = "scheduler"
# How often a follower retries once the lease it watched is due to expire.
RETRY_SECONDS: Final = 0.15


class TryLead(msgspec.Struct):
    """Try to take the lease (it may be free now)."""


class FenceStore(Protocol):
    async def take_fence(self, holder: str, now: datetime) -> int: ...
    async def fence(self) -> tuple[int, str]: ...


def bucket_name(prefix: str) -> str:
    return "mailer_leader_" + re.sub(r"[^A-Za-z0-9_-]", "_", prefix)


async def open_bucket(
    js: JetStreamContext, bucket: str, *, ttl: float, replicas: int = 1
) -> KeyValue:
    """Creates the lease bucket, or brings an existing one to this TTL and replica count.

    ``create_key_value`` refuses a bucket that exists with another configuration
    (JetStream error 10058): a new TTL would keep every new pod from starting.
    The existing stream's configuration is then updated in place, keeping what
    nats-py set up for a KV bucket and changing only what mailer configures.
    """
    try:
        return await js.create_key_value(bucket=bucket, ttl=ttl, history=1, replicas=replicas)
    except BadRequestError as exc:
        if exc.err_code != STREAM_CONFIG_DIFFERS:
            raise
    stream = f"KV_{bucket}"
    info = await js.stream_info(stream)
    config = info.config.evolve(
        max_age=ttl,
        # As nats-py's create_key_value: the server refuses a window above max age.
        duplicate_window=min(120.0, ttl),
        num_replicas=replicas,
        max_msgs_per_subject=1,
    )
    await js.update_stream(config)
    log.info(
        "leader bucket updated to the configured TTL and replicas",
        extra={"bucket": bucket, "ttl_seconds": ttl, "replicas": replicas},
    )
    return await js.key_value(bucket)


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
        replicas: int = 1,
    ) -> None:
        self._bus = bus
        self._store = store
        self._clock = clock
        self._me = instance_id
        self._ttl = ttl
        self._replicas = replicas
        self._on_change = on_change
        self._kv: KeyValue | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._revision: int | None = None  # the last revision we wrote, while leading
        self._epoch: int | None = None  # the fence taken in PostgreSQL, while leading
        self._renewer: asyncio.Task[None] | None = None
        self._expiry: asyncio.TimerHandle | None = None
        # Loop time at which the lease another process holds is due to expire.
        self._due: float | None = None

    @property
    def epoch(self) -> int | None:
        return self._epoch

    async def on_start(self) -> None:
        await self._open()
        self.ref.tell(TryLead())

    async def _open(self) -> KeyValue:
        """(Re)opens the bucket and watches the key in it."""
        js = self._bus.nc.jetstream()
        kv = await open_bucket(
            js, bucket_name(self._bus.prefix), ttl=self._ttl, replicas=self._replicas
        )
        if self._watcher is not None:
            self._watcher.cancel()  # a watch on a bucket that went away sees nothing more
        self._kv = kv
        self._watcher = self.spawn_task(self._watch(kv), name="leader-watch")
        return kv

    async def handle(self, msg: TryLead) -> object:
        if self._epoch is None:
            await self._try_lead()
        return self._epoch

    async def _try_lead(self) -> None:
        try:
            kv = self._kv or await self._open()
            revision = await self._claim(kv)
        except KeyWrongLastSequenceError:
            self._arm_retry()
            return
        except Exception as exc:
            # NATS unreachable, or the bucket is gone (deleted, a server that lost
            # its storage): open it again on the next try.
            log.warning("leader election attempt failed: %r", exc)
            self._kv = None
            self._arm(min(1.0, self._ttl / 3))
            return
        try:
            epoch = await self._store.take_fence(self._me, self._clock.now())
        except Exception as exc:  # PostgreSQL away: let another process try
            log.warning("lease won but the fence could not be taken; resigning (%r)", exc)
            await self._resign(kv, revision)
            self._arm(self._ttl / 3)
            return
        try:
            # Still ours after fencing? A stall between the two steps may have
            # let the lease pass on; its holder fences again at its next renewal.
            revision = await kv.update(KEY, self._me.encode(), last=revision)
        except Exception as exc:
            log.warning("lease lost while taking the fence (%r)", exc, extra={"epoch": epoch})
            self._arm_retry()
            return
        self._revision, self._epoch, self._due = revision, epoch, None
        log.info("became leader", extra={"epoch": epoch, "instance": self._me})
        metrics.LEADER.set(1)
        self._renewer = self.spawn_task(self._renew(kv), name="leader-renew")
        self._on_change(epoch)

    async def _claim(self, kv: KeyValue) -> int:
        """Creates the key; takes over one this process still holds by name.

        That is a lease of this process's previous incarnation whose resign did
        not reach NATS: waiting for it to expire would leave no leader for a TTL.
        """
        try:
            return await kv.create(KEY, self._me.encode())
        except KeyWrongLastSequenceError:
            try:
                entry = await kv.get(KEY)
            except KeyNotFoundError:
                return await kv.create(KEY, self._me.encode())  # expired meanwhile
            if entry.value != self._me.encode() or entry.revision is None:
                # Its expiry is timed by the watcher, which sees the entry's age
                # (a get does not tell it).
                raise
            log.info("taking over this process's own lease", extra={"instance": self._me})
            return await kv.update(KEY, self._me.encode(), last=entry.revision)

    async def _renew(self, kv: KeyValue) -> None:
        while self._revision is not None:
            await asyncio.sleep(self._ttl / 3)
            try:
                self._revision = await asyncio.wait_for(
                    kv.update(KEY, self._me.encode(), last=self._revision),
                    timeout=self._ttl / 3,
                )
            except Exception as exc:
                # Not renewed in time: by the time it could be, another may lead.
                log.error("leadership lost: lease not renewed (%r)", exc)
                self._step_down()
                self.ref.tell(TryLead())
                return
            await self._check_fence()

    async def _check_fence(self) -> None:
        """We hold the lease: the fence must be ours. If not, fence again."""
        try:
            epoch, holder = await self._store.fence()
            if epoch == self._epoch:
                return
            log.error(
                "the fence moved while this process holds the lease; fencing again",
                extra={"epoch": self._epoch, "fence": epoch, "fence_holder": holder},
            )
            mine = await self._store.take_fence(self._me, self._clock.now())
        except Exception as exc:  # PostgreSQL away: nothing is written meanwhile anyway
            log.warning("fence check failed (%r)", exc)
            return
        if self._epoch is not None:
            self._epoch = mine
            self._on_change(mine)

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
                    self._due = None
                    self._tell_try()
                elif entry.value != self._me.encode():
                    self._follow(entry)
        finally:
            with contextlib.suppress(Exception):
                await watcher.stop()  # type: ignore[no-untyped-call]

    def _follow(self, entry: KeyValue.Entry) -> None:
        """Another process wrote the lease: try again the moment it expires."""
        age = 0.0
        created = entry.created
        if isinstance(created, datetime):
            # Server time against ours: a skew only moves the first retry, and
            # retries go on until a newer renewal is seen.
            age = min(max((datetime.now(UTC) - created).total_seconds(), 0.0), self._ttl)
        loop = asyncio.get_running_loop()
        self._due = loop.time() + self._ttl - age
        self._arm(self._due - loop.time())

    def _arm_retry(self) -> None:
        """Someone holds the lease: when to look again."""
        now = asyncio.get_running_loop().time()
        if self._due is None:
            # No entry watched yet (it comes with the watch): a safety net only.
            self._arm(self._ttl / 3)
        elif now < self._due:
            self._arm(self._due - now)
        elif now < self._due + self._ttl:
            self._arm(RETRY_SECONDS)  # due: the server's expiry lags its max age
        else:
            self._due = None  # long overdue and not renewed: back to the slow net
            self._arm(self._ttl / 3)

    def _arm(self, delay: float) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        self._expiry = asyncio.get_running_loop().call_later(max(delay, 0.0), self._tell_try)

    def _tell_try(self) -> None:
        if self.ref.alive and self._epoch is None:
            with contextlib.suppress(Exception):
                self.ref.tell(TryLead())

    async def _resign(self, kv: KeyValue, revision: int) -> None:
        # The delete wakes the followers' watchers at once.
        try:
            await asyncio.wait_for(kv.delete(KEY, last=revision), timeout=2.0)
            log.info("resigned leadership", extra={"instance": self._me})
        except Exception as exc:
            log.warning("resign failed; the lease expires by itself (%r)", exc)

    async def on_stop(self, error: BaseException | None) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
        revision, was_leading = self._revision, self._epoch is not None
        self._step_down()
        if was_leading and revision is not None and self._kv is not None:
            await self._resign(self._kv, revision)
