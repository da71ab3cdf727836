"""Wires one mailer process: connections, the supervisor and its actors, HTTP.

Start order (and, reversed, stop order):
  PostgreSQL pool, Redis, NATS  ->  supervisor: smtp-sender, rate-governor,
  api, scheduler (+ one campaign-N actor per running campaign)  ->  HTTP.
At shutdown the HTTP server closes first; then every campaign actor is told
to stop at once and the SMTP transport closes (see ``Service.stop``), the
campaign actors drain in parallel, and the other children stop in reverse
start order: the scheduler, the API, the governor, the sender; finally NATS
is drained and the pools closed. The campaign actors stop before the parts
they need (governor, sender), which are static children started before them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import redis.asyncio as redis

from mailer import __version__, metrics
from mailer.actors import (
    ActorDead,
    AlreadyRunning,
    ChildSpec,
    MailboxFull,
    Restart,
    RestartPolicy,
    Supervisor,
    SupervisorClosed,
)
from mailer.actors.api import ApiActor
from mailer.actors.campaign import CampaignActor, CampaignSettings, FaultHook
from mailer.actors.governor import GovernorActor, NatsTokenSource
from mailer.actors.leader import LeaderActor
from mailer.actors.runner import RunnerActor
from mailer.actors.scheduler import Leadership, SchedulerActor, wake_subject
from mailer.actors.sender import ActorMailer, SenderActor
from mailer.breaker import CircuitBreaker
from mailer.bus import Bus
from mailer.clock import Clock, SystemClock
from mailer.config import Settings
from mailer.db import Q, connect_pool
from mailer.events import JetStreamEvents
from mailer.http import HttpServer
from mailer.messages import Wake
from mailer.outbox import OutboxRelay
from mailer.quota import QuotaSyncActor, lift_deferrals
from mailer.ratelimit import SendLimiter
from mailer.store import PgStore
from mailer.transport import SmtpTransport
from mailer.unsubscribe import PgUnsubscribes, unsubscribe_url
from mailer.unsubscribe_http import UnsubscribePages

__all__ = ["MetricsObserver", "Service"]

log = logging.getLogger("mailer.service")

CAMPAIGN_PREFIX = "campaign-"
# The share of the shutdown deadline that SMTP transactions in flight get to
# finish; the rest is for recording their outcomes and releasing the leases.
SHUTDOWN_SEND_SHARE = 0.6


class MetricsObserver:
    """Feeds the runtime's events into Prometheus (labels by actor kind)."""

    def on_actor_started(self, actor_name: str, mailbox_depth: Callable[[], int]) -> None:
        metrics.register_mailbox(actor_name, mailbox_depth)

    def on_actor_stopped(self, actor_name: str) -> None:
        metrics.unregister_mailbox(actor_name)

    def on_mailbox_full(self, actor_name: str) -> None:
        metrics.ACTOR_MAILBOX_FULL.labels(actor=metrics.actor_kind(actor_name)).inc()

    def on_crash(self, actor_name: str, exc: BaseException) -> None:
        log.error(
            "actor crashed",
            extra={"actor": actor_name, "error": repr(exc)},
            exc_info=(type(exc), exc, exc.__traceback__),
        )

    def on_restart(self, actor_name: str) -> None:
        metrics.ACTOR_RESTARTS.labels(actor=metrics.actor_kind(actor_name)).inc()


class Service:
    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock | None = None,
        fault: FaultHook | None = None,
        restart_policy: RestartPolicy | None = None,
    ) -> None:
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self._fault = fault
        self._policy = restart_policy or RestartPolicy(
            max_restarts=20, window_seconds=60.0, backoff_base=0.1, backoff_max=5.0
        )
        self._pool: Any = None
        self._redis: redis.Redis | None = None
        self._bus: Bus | None = None
        self._store: PgStore | None = None
        self._supervisor: Supervisor | None = None
        self._http: HttpServer | None = None
        self._events: JetStreamEvents | None = None
        self._outbox: OutboxRelay | None = None
        self._transport: SmtpTransport | None = None
        self._stopped = False
        self._background: set[asyncio.Task[None]] = set()
        self.leader_epoch: int | None = None
        # Set while this process leads (tests and health checks wait on it).
        self.leadership = asyncio.Event()

    # --- parts, for tests and the CLI -------------------------------------------------

    @property
    def bus(self) -> Bus:
        assert self._bus is not None, "service not started"
        return self._bus

    @property
    def store(self) -> PgStore:
        assert self._store is not None, "service not started"
        return self._store

    @property
    def supervisor(self) -> Supervisor:
        assert self._supervisor is not None, "service not started"
        return self._supervisor

    @property
    def http_port(self) -> int | None:
        return self._http.port if self._http is not None else None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        s = self.settings
        self._pool = await connect_pool(
            s.database_url,
            size=s.database_pool_size,
            statement_timeout=s.database_statement_timeout_seconds,
        )
        self._store = PgStore(self._pool)
        self._redis = redis.Redis.from_url(
            s.redis_url, socket_timeout=2.0, socket_connect_timeout=2.0
        )
        self._bus = Bus(
            s.nats_url,
            prefix=s.subject_prefix,
            name=f"mailer-{s.effective_instance_id}",
            user=s.nats_user or None,
            password=s.nats_password or None,
            token=s.nats_token or None,
            creds_file=s.nats_creds_file or None,
            nkey_seed_file=s.nats_nkey_seed_file or None,
        )
        await self._bus.connect()
        # Events go to JetStream; without their stream the service does not come up.
        self._events = JetStreamEvents(self._bus, settings=s, max_bytes=s.events_max_bytes)
        await self._events.ensure_stream()
        self._outbox = OutboxRelay(self._pool, self._events)
        metrics.set_build_info(__version__)

        bus, store, clock = self._bus, self._store, self.clock
        redis_client, events, outbox = self._redis, self._events, self._outbox
        limiter = SendLimiter(
            self._redis,
            key_prefix=s.redis_key_prefix,
            account=s.smtp_account,
            hourly_limit=s.rate_per_hour,
        )
        # The account's breaker outlives sender restarts: a crash is no cure for a dead server.
        breaker = CircuitBreaker(
            s.smtp_account,
            threshold=s.circuit_breaker_threshold,
            cooldown=timedelta(minutes=s.transient_retry_delay_minutes),
        )
        children: list[ChildSpec[Any]] = [
            ChildSpec(
                "smtp-sender",
                lambda: SenderActor(self._new_transport(), breaker=breaker, clock=clock),
            ),
            ChildSpec(
                "rate-governor",
                lambda: GovernorActor.from_settings(
                    bus=bus, limiter=limiter, pool=self._pool, settings=s, clock=clock
                ),
            ),
            ChildSpec(
                "quota-sync",
                lambda: QuotaSyncActor.from_settings(
                    pool=self._pool,
                    settings=s,
                    clock=clock,
                    on_restored=self._quota_restored,
                    bus=bus,
                ),
            ),
            ChildSpec(
                "api",
                lambda: ApiActor(
                    bus=bus,
                    store=store,
                    clock=clock,
                    settings=s,
                    redis_client=redis_client,
                    # Started before the api child; a supervised ref follows its restarts.
                    sender=self.supervisor.get("smtp-sender"),
                    events=events,
                    version=__version__,
                ),
            ),
            ChildSpec(
                "scheduler",
                lambda: SchedulerActor(
                    bus=bus,
                    store=store,
                    clock=clock,
                    max_active=s.max_active_campaigns,
                    lease_seconds=s.campaign_lease_seconds,
                    reconcile_every=s.reconcile_interval_seconds,
                    stuck_after=timedelta(minutes=s.stuck_after_minutes),
                    events=events,
                    outbox=outbox,
                ),
            ),
            ChildSpec(
                "leader",
                lambda: LeaderActor(
                    bus=bus,
                    store=store,
                    clock=clock,
                    instance_id=s.effective_instance_id,
                    ttl=s.leader_ttl_seconds,
                    on_change=self._on_leadership,
                ),
            ),
            ChildSpec(
                "runner",
                lambda: RunnerActor(
                    bus=bus, spawn=self._spawn_campaign, instance_id=s.effective_instance_id
                ),
            ),
        ]
        self._supervisor = Supervisor(
            children,
            name="mailer",
            policy=self._policy,
            observer=MetricsObserver(),
            on_child_exit=self._on_child_exit,
            shutdown_deadline=s.shutdown_timeout_seconds,
        )
        await self._supervisor.start()
        if s.http_port or s.http_host:
            self._http = HttpServer(s.http_host, s.http_port, readiness=self.readiness)
            unsubscribe_pages = UnsubscribePages(
                secret=s.unsubscribe_secret,
                store=PgUnsubscribes(self._pool),
                events=self._events,
                clock=self.clock,
            )
            self._http.add_routes(unsubscribe_pages.routes())
            await self._http.start()
        log.info(
            "mailer started",
            extra={
                "instance": s.effective_instance_id,
                "subject_prefix": s.subject_prefix,
                "http_port": self.http_port,
            },
        )

    def _new_transport(self) -> SmtpTransport:
        s = self.settings
        # Kept so that stop() can close it while the campaign actors drain (see stop).
        self._transport = SmtpTransport(
            s.smtp_host,
            s.smtp_port,
            security=s.smtp_security,
            username=s.smtp_username or None,
            password=s.smtp_password or None,
            timeout=s.smtp_timeout_seconds,
            connections=s.smtp_connections,
        )
        return self._transport

    def _on_leadership(self, epoch: int | None) -> None:
        self.leader_epoch = epoch
        if epoch is None:
            self.leadership.clear()
        else:
            self.leadership.set()
        scheduler = self._supervisor.get("scheduler") if self._supervisor else None
        if scheduler is not None:
            with contextlib.suppress(ActorDead, MailboxFull):
                scheduler.tell(Leadership(epoch))

    async def _spawn_campaign(self, campaign_id: int, fence: int) -> bool:
        s = self.settings
        sup, bus, store = self.supervisor, self.bus, self.store
        sender = sup.get("smtp-sender")
        if sender is None:
            return False
        # A batch waits for at most every message's SMTP steps over the pool.
        batch_timeout = s.smtp_timeout_seconds * 4 * (s.batch_size / s.smtp_connections + 1)
        mailer = ActorMailer(sender, mail_from=s.from_email, timeout=batch_timeout)
        tokens = NatsTokenSource(bus, timeout=s.token_request_timeout_seconds)
        events, outbox = self._events, self._outbox
        assert events is not None and outbox is not None, "service not started"
        settings = CampaignSettings(
            instance_id=s.effective_instance_id,
            batch_size=s.batch_size,
            lease_seconds=s.campaign_lease_seconds,
            from_email=s.from_email,
            from_name=s.from_name,
            message_id_domain=s.effective_message_id_domain,
            transient_retry=timedelta(minutes=s.transient_retry_delay_minutes),
            breaker_threshold=s.circuit_breaker_threshold,
            window=s.smtp_connections,
        )

        def link(cid: int, email: str) -> str:
            return unsubscribe_url(s.public_url, s.unsubscribe_secret, cid, email)

        spec = ChildSpec(
            f"{CAMPAIGN_PREFIX}{campaign_id}",
            lambda: CampaignActor(
                campaign_id,
                fence=fence,
                store=store,
                tokens=tokens,
                mailer=mailer,
                events=events,
                outbox=outbox,
                clock=self.clock,
                settings=settings,
                unsubscribe_url=link,
                fault=self._fault,
            ),
            restart=Restart.TRANSIENT,
        )
        try:
            ref = await sup.spawn(spec)
        except (AlreadyRunning, SupervisorClosed):
            return False
        except Exception:
            log.exception("campaign actor failed to start", extra={"campaign_id": campaign_id})
            return False
        # An actor that could not take the lease has already asked to stop.
        return ref.alive

    def _on_child_exit(self, name: str, error: BaseException | None) -> None:
        # Wherever the leader runs, it must learn that a slot is free. Not while
        # this process shuts down (a stop, or the supervisor giving up): its
        # campaigns are released and the leader's next look sees that; a wake
        # now would only make a leader here dispatch to a runner that is going.
        closing = self._stopped or (self._supervisor is not None and self._supervisor.closing)
        if name.startswith(CAMPAIGN_PREFIX) and self._bus is not None and not closing:
            ended = int(name.removeprefix(CAMPAIGN_PREFIX))
            task = asyncio.get_running_loop().create_task(self._publish_wake(ended))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def _quota_restored(self) -> None:
        """A sync brought the quota back: campaigns waiting for it go on now."""
        lifted = await lift_deferrals(self._pool, "quota_exhausted", self.clock.now())
        log.info("quota restored; deferrals lifted", extra={"campaigns": lifted})
        await self._publish_wake()

    async def _publish_wake(self, ended: int | None = None) -> None:
        try:
            wake = Wake(campaign_id=ended, ended=ended is not None)
            await self.bus.publish(wake_subject(self.bus), wake)
        except Exception:  # the leader's timers and reconcile catch up
            log.warning("wake not published")

    async def readiness(self) -> dict[str, bool]:
        """Ready when NATS and PostgreSQL answer.

        Redis is left out on purpose: sending fails open without it, and the
        HTTP routes (unsubscribe, metrics) do not need it; a Redis outage must
        not take every pod out of its Service.
        """
        checks: dict[str, bool] = {"nats": self._bus is not None and self._bus.connected}
        try:
            assert self._pool is not None
            await self._pool.fetchval(Q["health-ping"])
            checks["postgres"] = True
        except Exception:
            checks["postgres"] = False
        return checks

    async def wait(self) -> None:
        """Returns when the supervisor shut down; raises SupervisorEscalation if it gave up."""
        await self.supervisor.wait()

    async def stop(self) -> None:
        """Graceful, idempotent: HTTP, actors (campaigns together, then the rest in
        reverse start order), NATS, pools.

        Stop means: claim nothing more, send nothing more, record what is known.
        Every campaign actor is told to stop at once (none claims or asks for
        tokens after that) and the SMTP transport closes at the same moment: a
        message not yet started is not attempted, one in flight gets until
        ``SHUTDOWN_SEND_SHARE`` of the deadline to finish, and then its
        connection is cut -- before its end of data it is simply not delivered
        and goes back to ``pending``; after it, the server may have it and it
        is recorded ``in_doubt``. The actors record all that before the
        deadline, which then cancels nothing.
        """
        if self._stopped:
            return
        self._stopped = True
        if self._http is not None:
            await self._http.stop()
        if self._supervisor is not None:
            deadline = self.settings.shutdown_timeout_seconds
            self._supervisor.begin_shutdown(deadline)
            transport = self._transport
            closing = None
            if transport is not None:
                # Directly, not through the sender's mailbox: the sender is busy
                # with the very sends this cuts short.
                closing = asyncio.create_task(transport.close(deadline * SHUTDOWN_SEND_SHARE))
            await self._supervisor.shutdown()
            if closing is not None:
                await asyncio.gather(closing, return_exceptions=True)
        if self._background:  # wakes still being published: let them finish
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._bus is not None:
            await self._bus.close()
        if self._redis is not None:
            with contextlib.suppress(Exception):
                await self._redis.aclose()
        if self._pool is not None:
            try:
                await asyncio.wait_for(self._pool.close(), timeout=10)
            except (TimeoutError, Exception):
                self._pool.terminate()
        log.info("mailer stopped")
