"""Wires one mailer process: connections, the supervisor and its actors, HTTP.

Start order:
  PostgreSQL pool, Redis, NATS  ->  supervisor: smtp-sender, rate-governor,
  quota-sync, api, scheduler, leader, runner (+ one campaign-N actor per
  running campaign)  ->  HTTP.
At shutdown the HTTP servers close first; then every campaign actor is told
to stop at once and the SMTP transport closes (see ``Service.stop``); the
runner (no new campaign comes here) and the leader stop first, the leader
resigning at once so another process leads within a second while this one
drains; the campaign actors drain in parallel (their sends in flight are
recorded, the rest released, their leases given back and the new leader
woken for each); then the scheduler, the API, the governor, the sender;
finally NATS is drained and the pools closed. The campaign actors stop
before the parts they need (governor, sender), static children started
before them.

Restarts: the long-lived actors share the supervisor's restart intensity
(exceeded: the process exits 1). Each campaign actor has its own limit
(``CAMPAIGN_RESTARTS``): past it, that campaign alone is given up, its lease
is free, and the leader is woken to dispatch it again after a lease period.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import timedelta
from typing import Any, Final

import redis.asyncio as redis
from nats.js.errors import BadRequestError

from mailer import __version__, metrics
from mailer.accounts import Account, accounts_of
from mailer.actors import (
    ActorDead,
    ActorFault,
    AlreadyRunning,
    ChildLimit,
    ChildSpec,
    MailboxFull,
    Restart,
    RestartPolicy,
    Supervisor,
    SupervisorClosed,
)
from mailer.actors.api import ApiActor
from mailer.actors.campaign import (
    CampaignActor,
    CampaignSettings,
    FaultHook,
    Route,
    StageHook,
)
from mailer.actors.governor import GovernorActor, NatsTokenSource
from mailer.actors.leader import LeaderActor
from mailer.actors.runner import RunnerActor
from mailer.actors.scheduler import Leadership, SchedulerActor, wake_subject
from mailer.actors.sender import ActorMailer, SenderActor
from mailer.bounces.imap import BounceMailbox
from mailer.bounces.setup import Bounces, envelope_sender
from mailer.breaker import CircuitBreaker
from mailer.bus import Bus, NatsAuthError
from mailer.clock import Clock, SystemClock
from mailer.config import Settings, mask_url
from mailer.db import Q, connect_pool, migrate
from mailer.dkim import dkim_signer
from mailer.events import JetStreamEvents
from mailer.gauges import ScrapeGauges
from mailer.http import HttpServer
from mailer.messages import RunCampaign, Wake
from mailer.outbox import OutboxRelay
from mailer.quota import PgQuota, QuotaSyncActor, lift_deferrals
from mailer.ratelimit import SendLimiter
from mailer.redisconn import connect_redis, redis_up
from mailer.retention import Retention, RetentionPolicy
from mailer.rules import WorkingHours
from mailer.smtphealth import SmtpHealth
from mailer.startup import Deadline, StartupError, describe, retry_until
from mailer.store import PgStore
from mailer.suppression import PgSuppressions
from mailer.transport import SmtpTransport
from mailer.unsubscribe import PgUnsubscribes, secrets_of, unsubscribe_url
from mailer.unsubscribe_http import UnsubscribePages

__all__ = ["MetricsObserver", "Service"]

# JetStream's "no suitable peers for placement, peer offline": a 400 that passes once the
# cluster's nodes are back (a stream of R replicas needs R of them).
NO_PEERS_FOR_PLACEMENT: Final = 10005

log = logging.getLogger("mailer.service")

CAMPAIGN_PREFIX = "campaign-"
# campaign-<id>.<shard>: a helper shard's actor (the home's is campaign-<id>).
SHARD_SEPARATOR = "."
# A campaign actor crashing more often than this is given up (not the process).
CAMPAIGN_RESTARTS = ChildLimit(max_restarts=5, window_seconds=60.0)
# The share of the shutdown deadline that SMTP transactions in flight get to
# finish; the rest is for recording their outcomes and releasing the leases.
SHUTDOWN_SEND_SHARE = 0.6


class MetricsObserver:
    """Feeds the runtime's events into Prometheus (labels by actor kind)."""

    def on_actor_started(self, actor_name: str, mailbox_depth: Callable[[], int]) -> None:
        metrics.register_mailbox(actor_name, mailbox_depth)
        metrics.precreate_actor_series(actor_name)

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
        stage_fault: StageHook | None = None,
        restart_policy: RestartPolicy | None = None,
        actor_fault: ActorFault | None = None,
    ) -> None:
        """``fault``, ``stage_fault`` and ``actor_fault`` are test hooks (None in
        production): the campaign actor's, between a batch's send and its record,
        and at each stage of a wave, and the runtime's, before every message any
        actor handles (raising crashes it)."""
        self.settings = settings
        self.clock: Clock = clock or SystemClock()
        self._fault = fault
        self._stage_fault = stage_fault
        self._actor_fault = actor_fault
        self._policy = restart_policy or RestartPolicy(
            max_restarts=20, window_seconds=60.0, backoff_base=0.1, backoff_max=5.0
        )
        self._pool: Any = None
        self._redis: redis.Redis | None = None
        self._bus: Bus | None = None
        self._store: PgStore | None = None
        self._supervisor: Supervisor | None = None
        self._http: HttpServer | None = None
        self._public_http: HttpServer | None = None
        self._bounces: Bounces | None = None
        self._gauges: ScrapeGauges | None = None
        self._started = False
        self._events: JetStreamEvents | None = None
        self._outbox: OutboxRelay | None = None
        self.accounts = accounts_of(settings)
        # Per SMTP account; outlive restarts of its sender, like its breaker: seen
        # across its transports.
        self._smtp_health = {
            a.name: SmtpHealth(
                a.settings.smtp_host, a.settings.smtp_port, account=a.name, clock=self.clock
            )
            for a in self.accounts.accounts
        }
        self._transports: dict[str, SmtpTransport] = {}
        self._stopped = False
        self._background: set[asyncio.Task[None]] = set()
        self._delayed: set[asyncio.TimerHandle] = set()
        self.leader_epoch: int | None = None
        # Set while this process leads (tests and health checks wait on it).
        self.leadership = asyncio.Event()
        self._leader_changed = asyncio.Event()  # replaced after every change

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
        """The internal server's port (metrics, probes)."""
        return self._http.port if self._http is not None else None

    @property
    def bounce_smtp_port(self) -> int | None:
        """The bounce receiver's port (None: not configured or not started)."""
        return self._bounces.smtp_port if self._bounces is not None else None

    @property
    def bounce_mailbox(self) -> BounceMailbox | None:
        """The IMAP poller of the bounce mailbox (None: not configured)."""
        return self._bounces.mailbox if self._bounces is not None else None

    @property
    def suppressions(self) -> PgSuppressions | None:
        return self._bounces.store if self._bounces is not None else None

    @property
    def public_http_port(self) -> int | None:
        """The public server's port (unsubscribe pages)."""
        return self._public_http.port if self._public_http is not None else None

    # --- lifecycle ------------------------------------------------------------------------

    async def start(self, *, migrate_first: bool = False) -> None:
        """Starts the process's parts; raises ``StartupError`` (exit 3) when a dependency
        cannot be had within ``MAILER_STARTUP_TIMEOUT_SECONDS`` (see ``mailer.startup``).

        The internal HTTP server listens first, so the probes can tell "starting"
        (``/healthz`` answers, ``/readyz`` names what is missing) from "dead".
        ``migrate_first``: apply the migrations once PostgreSQL answers (``mailer run``).
        """
        s = self.settings
        deadline = Deadline(s.startup_timeout_seconds)
        self._http = HttpServer(
            s.http_host,
            s.http_port,
            readiness=self.readiness,
            report=self.dependency_report,
            before_scrape=self._refresh_gauges,
        )
        await _listen(self._http)
        db = mask_url(s.database_url)
        if migrate_first:
            await retry_until("postgres", db, lambda: migrate(s.database_url), deadline)
        self._pool = await retry_until(
            "postgres",
            db,
            lambda: connect_pool(
                s.database_url,
                size=s.database_pool_size,
                statement_timeout=s.database_statement_timeout_seconds,
            ),
            deadline,
        )
        self._store = PgStore(self._pool, max_transient_attempts=s.max_transient_attempts)
        self._redis = connect_redis(s.redis_url)
        await self._check_redis()
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
        await self._connect_nats(deadline)
        # Events go to JetStream; without their stream the service does not come up.
        self._events = JetStreamEvents(
            self._bus, settings=s, max_bytes=s.events_max_bytes, replicas=s.nats_replicas
        )
        # A stream config the server refuses (no permission, no room) will not change by
        # waiting; a timeout or "unavailable" is JetStream electing its leaders after
        # a restart (or off: the same answer), waited for within the start-up deadline.
        events_ = self._events

        async def ensure_stream() -> None:
            try:
                await events_.ensure_stream()
            except BadRequestError as exc:
                if exc.err_code == NO_PEERS_FOR_PLACEMENT:
                    # A node of the cluster is still down or rejoining: it will be back.
                    raise ConnectionError(str(exc)) from exc
                raise

        await retry_until(
            "nats (JetStream: the events stream)",
            self._bus.shown_url,
            ensure_stream,
            deadline,
            fatal=(BadRequestError,),
        )
        self._outbox = OutboxRelay(self._pool, self._events)
        metrics.set_build_info(__version__)

        bus, store, clock = self._bus, self._store, self.clock
        redis_client, events, outbox = self._redis, self._events, self._outbox
        # Every account has its own row from the start (the default's is the migration's).
        for account in self.accounts.accounts:
            if not account.default:
                await PgQuota(self._pool, account.key).ensure(account.settings.monthly_quota)
        limiters = {
            a.name: SendLimiter(
                self._redis,
                key_prefix=s.redis_key_prefix,
                account=a.name,
                hourly_limit=a.settings.rate_per_hour,
            )
            for a in self.accounts.accounts
        }
        limiter = limiters[self.accounts.default.name]
        # An account's breaker outlives sender restarts: a crash is no cure for a dead server.
        breakers = {
            a.name: CircuitBreaker(
                a.name,
                threshold=s.circuit_breaker_threshold,
                cooldown=timedelta(minutes=s.transient_retry_delay_minutes),
            )
            for a in self.accounts.accounts
        }
        retention = Retention(
            self._pool,
            RetentionPolicy(
                send_log_days=s.retention_send_log_days,
                audit_log_days=s.retention_audit_log_days,
                recipients_days=s.retention_recipients_days,
                soft_bounce_days=s.soft_bounce_window_days,
                batch=s.retention_batch_size,
            ),
        )

        def sender(a: Account) -> ChildSpec[Any]:
            return ChildSpec(
                _child("smtp-sender", a),
                lambda: SenderActor(self._new_transport(a), breaker=breakers[a.name], clock=clock),
            )

        def governor(a: Account) -> ChildSpec[Any]:
            return ChildSpec(
                _child("rate-governor", a),
                lambda: GovernorActor.from_settings(
                    bus=bus,
                    limiter=limiters[a.name],
                    pool=self._pool,
                    settings=a.settings,
                    clock=clock,
                    account=a.key,
                    # A quota block given back to an empty allowance restores it.
                    on_quota_restored=self._quota_restored,
                ),
            )

        def quota_sync(a: Account) -> ChildSpec[Any]:
            return ChildSpec(
                _child("quota-sync", a),
                lambda: QuotaSyncActor.from_settings(
                    pool=self._pool,
                    settings=a.settings,
                    clock=clock,
                    on_restored=self._quota_restored,
                    # quota.sync (the API) reaches each account's syncer on its subject.
                    bus=bus,
                    account=a.key,
                    name=a.name if self.accounts.several else None,
                ),
            )

        every = self.accounts.accounts
        for own in every:  # every series from the start, at 0 (README: Logs and metrics)
            for to in every:
                metrics.ACCOUNT_FAILOVERS.labels(account=own.name, to=to.name)
        children: list[ChildSpec[Any]] = [
            *(sender(a) for a in every),
            *(governor(a) for a in every),
            *(quota_sync(a) for a in every),
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
                    # A restarted scheduler asks whether this process leads.
                    leadership=lambda: self.leader_epoch,
                    retention=retention,
                    shard_min_recipients=s.shard_min_recipients,
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
                    replicas=s.nats_replicas,
                    on_change=self._on_leadership,
                ),
                stop_first=True,  # resign before the campaign actors drain
            ),
            ChildSpec(
                "runner",
                lambda: RunnerActor(
                    bus=bus,
                    spawn=self._spawn_campaign,
                    instance_id=s.effective_instance_id,
                    load=self._campaign_load,
                ),
                stop_first=True,  # no new campaign for a process that is stopping
            ),
        ]

        async def start_actors() -> Supervisor:
            # A fresh supervisor per attempt: a failed start shut the last one down.
            self._supervisor = Supervisor(
                children,
                name="mailer",
                policy=self._policy,
                observer=MetricsObserver(),
                on_child_exit=self._on_child_exit,
                shutdown_deadline=s.shutdown_timeout_seconds,
                fault=self._actor_fault,
            )
            await self._supervisor.start()
            return self._supervisor

        # A long-lived actor whose start fails (its JetStream bucket unavailable while
        # the cluster elects its leaders, PostgreSQL restarting) is a start-up failure
        # like a dependency away: tried again within the deadline, then exit 3 — not
        # the supervisor giving up (exit 1), which is for restarts in a running pod.
        await retry_until(
            "nats and postgres (the actors' start)",
            self._bus.shown_url,
            start_actors,
            deadline,
            fatal=(StartupError,),
            cut=False,  # each actor's start is bounded by its own timeouts
        )
        await self._reevaluate_deferrals()
        self._gauges = ScrapeGauges(
            pool=self._pool,
            redis_client=self._redis,
            nats_connected=lambda: bus.connected,
            hour_key=limiter.hour_key,
            account=self.accounts.default.name,
            hourly_limit=self.accounts.default.rate_per_hour,
            clock=clock,
            more_accounts=[
                (a.name, limiters[a.name].hour_key, a.rate_per_hour) for a in every if not a.default
            ],
        )
        self._public_http = HttpServer(
            s.public_http_host, s.public_http_port, readiness=None, name="public"
        )
        unsubscribe_pages = UnsubscribePages(
            secrets=secrets_of(s),
            store=PgUnsubscribes(self._pool),
            events=self._events,
            outbox=self._outbox,
            clock=self.clock,
        )
        self._public_http.add_routes(unsubscribe_pages.routes())
        self._bounces = Bounces(
            s, pool=self._pool, events=self._events, outbox=self._outbox, clock=self.clock
        )
        # The leader may be chosen before the bounces exist: they hear it now.
        self._bounces.lead(self.leader_epoch is not None)
        try:
            await self._bounces.start(self._public_http)
        except OSError as exc:
            where = f"{s.bounce_smtp_host}:{s.bounce_smtp_port}"
            raise StartupError("smtp (bounces)", where, describe(exc), waited=None) from None
        await _listen(self._public_http)
        self._started = True
        log.info(
            "mailer started",
            extra={
                "instance": s.effective_instance_id,
                "subject_prefix": s.subject_prefix,
                "http_port": self.http_port,
                "public_http_port": self.public_http_port,
            },
        )

    async def _refresh_gauges(self) -> None:
        if self._gauges is not None:  # none until the service has started
            await self._gauges.refresh()

    async def _connect_nats(self, deadline: Deadline) -> None:
        """The first connection, bounded by the start-up deadline, one line per failed try."""
        bus = self.bus
        tries = 0
        last = "no answer"

        def failed(exc: Exception) -> None:
            nonlocal tries, last
            tries += 1
            last = describe(exc)
            log.warning(
                "waiting for nats",
                extra={
                    "dependency": "nats",
                    "target": bus.shown_url,
                    "attempt": tries,
                    "cause": last,
                },
            )

        try:
            await asyncio.wait_for(
                bus.connect(on_attempt_failed=failed), max(0.1, deadline.remaining())
            )
        except TimeoutError:
            raise StartupError("nats", bus.shown_url, last, waited=deadline.seconds) from None
        except NatsAuthError as exc:
            raise StartupError("nats", bus.shown_url, describe(exc), waited=None) from None

    async def _check_redis(self) -> None:
        """Redis is not required to start (sending fails open without it), but say so."""
        assert self._redis is not None
        up = await redis_up(self._redis)
        metrics.DEPENDENCY_UP.labels(dependency="redis").set(int(up))
        if not up:
            log.warning(
                "Redis does not answer at start; the send-rate limiter fails open (hourly and "
                "daily limits unchecked) and the API throttles fail closed until it does",
                extra={"policy": "fail_open"},
            )

    def _new_transport(self, account: Account) -> SmtpTransport:
        s = account.settings
        # Kept so that stop() can close it while the campaign actors drain (see stop).
        transport = SmtpTransport(
            s.smtp_host,
            s.smtp_port,
            security=s.smtp_security,
            username=s.smtp_username or None,
            password=s.smtp_password or None,
            timeout=s.smtp_timeout_seconds,
            connections=s.smtp_connections,
            health=self._smtp_health[account.name],
        )
        self._transports[account.name] = transport
        return transport

    async def wait_leading(self, above: int = 0) -> int:
        """Waits until this process leads with an epoch above ``above``; returns it."""
        while self.leader_epoch is None or self.leader_epoch <= above:
            await self._leader_changed.wait()
        return self.leader_epoch

    def _on_leadership(self, epoch: int | None) -> None:
        self.leader_epoch = epoch
        if epoch is None:
            self.leadership.clear()
        else:
            self.leadership.set()
        changed, self._leader_changed = self._leader_changed, asyncio.Event()
        changed.set()
        if self._bounces is not None:
            self._bounces.lead(epoch is not None)
        self._announce_leadership()

    def _announce_leadership(self) -> None:
        """Tells the scheduler the current epoch. A scheduler waiting out a restart
        asks for it in its on_start; a full mailbox is tried again shortly."""
        scheduler = self._supervisor.get("scheduler") if self._supervisor else None
        if scheduler is None:
            return
        try:
            scheduler.tell(Leadership(self.leader_epoch))
        except ActorDead:
            pass
        except MailboxFull:
            log.error("scheduler mailbox full: leadership re-announced shortly")
            self._later(0.1, self._announce_leadership)

    def _later(self, delay: float, callback: Callable[[], None]) -> None:
        def run() -> None:
            self._delayed.discard(handle)
            callback()

        handle = asyncio.get_running_loop().call_later(delay, run)
        self._delayed.add(handle)

    def _campaign_load(self) -> int:
        """Campaign actors (homes and shards) running in this process: the
        runner's answer to the leader's roll call."""
        if self._supervisor is None:
            return 0
        return sum(
            1
            for ref in self._supervisor.children()
            if ref.name.startswith(CAMPAIGN_PREFIX) and ref.alive
        )

    async def _spawn_campaign(self, run: RunCampaign) -> bool:
        campaign_id, fence = run.campaign_id, run.fence
        s = self.settings
        sup, store = self.supervisor, self.store
        sender = sup.get("smtp-sender")
        if sender is None:
            return False
        routes = {a.name: self._route(a) for a in self.accounts.accounts}
        if any(r is None for r in routes.values()):
            return False
        default_route = routes[self.accounts.default.name]
        assert default_route is not None
        mailer, tokens = default_route.mailer, default_route.tokens
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
            hours=WorkingHours.from_settings(s),
            log_each_send=s.log_each_send,
            window=s.smtp_connections,
            depth=s.pipeline_depth,
            dkim=dkim_signer(s),
        )

        verp = envelope_sender(s)

        def route_for(name: str | None) -> Route:
            route = routes[self.accounts.get(name).name]  # UnknownAccount: a LookupError
            assert route is not None
            return route

        def link(cid: int, email: str) -> str:
            return unsubscribe_url(s.public_url, s.unsubscribe_secret, cid, email)

        # A helper shard's actor is named apart: one process may run the home
        # and a shard of one campaign (a takeover when the other process died).
        name = f"{CAMPAIGN_PREFIX}{campaign_id}"
        if run.shard:
            name += f"{SHARD_SEPARATOR}{run.shard}"
        spec = ChildSpec(
            name,
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
                bounce_address=verp,
                stage_fault=self._stage_fault,
                route_for=route_for,
                shard=run.shard,
                shards=run.shards,
            ),
            restart=Restart.TRANSIENT,
            limit=CAMPAIGN_RESTARTS,
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

    def _route(self, a: Account) -> Route | None:
        """How a campaign sends through account ``a`` (None: its sender is not up)."""
        s = a.settings
        sender = self.supervisor.get(_child("smtp-sender", a))
        if sender is None:
            return None
        # A batch waits for at most every message's SMTP steps over the pool.
        batch_timeout = s.smtp_timeout_seconds * 4 * (s.batch_size / s.smtp_connections + 1)
        return Route(
            account=a.name if self.accounts.several else "",
            name=a.name,
            key=a.key,
            tokens=NatsTokenSource(
                self.bus, timeout=s.token_request_timeout_seconds, account=a.key
            ),
            mailer=ActorMailer(sender, mail_from=s.from_email, timeout=batch_timeout),
            from_email=s.from_email,
            from_name=s.from_name,
            message_id_domain=s.effective_message_id_domain,
            dkim=dkim_signer(s),
            window=s.smtp_connections,
        )

    def _on_child_exit(self, name: str, error: BaseException | None) -> None:
        # Wherever the leader runs, it must learn that a slot is free, also while
        # this process stops: by then this process's leader has resigned and its
        # runner left the queue group, so the new leader dispatches the campaign
        # elsewhere at once. A campaign given up after crashing again and again
        # is dispatched again only after a lease period (not in a hot loop).
        if not name.startswith(CAMPAIGN_PREFIX) or self._bus is None:
            return
        cid, _, k = name.removeprefix(CAMPAIGN_PREFIX).partition(SHARD_SEPARATOR)
        ended, shard = int(cid), int(k or 0)
        closing = self._stopped or (self._supervisor is not None and self._supervisor.closing)
        if error is not None and not closing:
            delay = self.settings.campaign_lease_seconds
            log.error(
                "campaign actor given up after repeated crashes; dispatched again later",
                extra={"campaign_id": ended, "retry_in_seconds": delay, "error": repr(error)},
            )
            self._later(delay, lambda: self._wake_soon(ended, shard))
            return
        self._wake_soon(ended, shard)

    def _wake_soon(self, ended: int | None, shard: int = 0) -> None:
        task = asyncio.get_running_loop().create_task(self._publish_wake(ended, shard))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _reevaluate_deferrals(self) -> None:
        """At start, every limit's deferral is decided again against the settings
        this process runs with (a restart with new limits takes effect at once,
        not at the old deferral's end). Best effort: the old times still hold."""
        try:
            ids = await self.store.reevaluate(self.clock.now())
        except Exception as exc:
            log.warning("deferrals not re-evaluated at start", extra={"error": repr(exc)})
            return
        if ids:
            log.info("deferrals re-evaluated at start", extra={"campaigns": ids})
            await self._publish_wake()

    async def _quota_restored(self) -> None:
        """A sync brought the quota back: campaigns waiting for it go on now."""
        lifted = await lift_deferrals(self._pool, "quota_exhausted", self.clock.now())
        log.info("quota restored; deferrals lifted", extra={"campaigns": lifted})
        await self._publish_wake()

    async def _publish_wake(self, ended: int | None = None, shard: int = 0) -> None:
        try:
            wake = Wake(campaign_id=ended, ended=ended is not None, shard=shard)
            await self.bus.publish(wake_subject(self.bus), wake)
        except Exception:  # the leader's timers and reconcile catch up
            log.warning("wake not published")

    async def readiness(self) -> dict[str, bool]:
        """Ready when NATS and PostgreSQL answer: the policy of ``/readyz``.

        Only these two decide, because without them the pod can do nothing useful (no
        request reaches it, no state can be read or written). Redis and SMTP are reported
        in the body (``dependency_report``) but do not decide, on purpose: without Redis
        sending fails open and the unsubscribe pages and metrics still work; an SMTP outage
        is the provider's, shared by every pod, and is handled by the retry policy and the
        circuit breaker. Taking every pod out of its Service for either would only take
        the unsubscribe pages down with it.
        """
        checks: dict[str, bool] = {"nats": self._bus is not None and self._bus.connected}
        # Still starting (dependencies awaited, actors not yet up): not ready.
        checks["started"] = self._started
        try:
            assert self._pool is not None
            await self._pool.fetchval(Q["health-ping"])
            checks["postgres"] = True
        except Exception:
            checks["postgres"] = False
        return checks

    async def dependency_report(self) -> dict[str, bool]:
        """Redis (a PING now) and SMTP (the last session attempt): shown, not deciding."""
        up = self._redis is not None and await redis_up(self._redis)
        metrics.DEPENDENCY_UP.labels(dependency="redis").set(int(up))
        return {"redis": up, "smtp": all(h.up for h in self._smtp_health.values())}

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
        for server in (self._public_http, self._http):
            if server is not None:
                await server.stop()
        if self._bounces is not None:
            await self._bounces.stop()
        if self._supervisor is not None:
            deadline = self.settings.shutdown_timeout_seconds
            self._supervisor.begin_shutdown(deadline)
            # Directly, not through the senders' mailboxes: the senders are busy
            # with the very sends this cuts short.
            closing = [
                asyncio.create_task(t.close(deadline * SHUTDOWN_SEND_SHARE))
                for t in self._transports.values()
            ]
            await self._supervisor.shutdown()
            await asyncio.gather(*closing, return_exceptions=True)
        for handle in self._delayed:
            handle.cancel()
        self._delayed.clear()
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


def _child(kind: str, account: Account) -> str:
    """An account's actor: ``smtp-sender`` for the default, ``smtp-sender-backup``..."""
    return kind if account.default else f"{kind}-{account.name}"


async def _listen(server: HttpServer) -> None:
    """Starts ``server``; a port that cannot be bound is a start-up failure (exit 3)."""
    try:
        await server.start()
    except OSError as exc:
        where = f"{server.host}:{server.port}"
        raise StartupError(f"http ({server.name})", where, describe(exc), waited=None) from None
