"""Prometheus metrics of mailer, declared once on the default registry.

Plain module constants: code does ``metrics.EMAILS_SENT.labels(kind="campaign").inc()``.
The Grafana dashboard and the alert rules in ``deploy/`` refer to these names, so a rename
here is a breaking change for them.

Label cardinality: every label below takes values from a small closed set, never an id.
Actor names carry ids (``campaign-123``), so actor metrics are labelled by
``actor_kind(name)`` instead, and the number of distinct kinds is capped besides.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Final

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector

__all__ = [
    "ACTOR_KINDS",
    "ACTOR_MAILBOX_DEPTH",
    "ACTOR_MAILBOX_FULL",
    "ACTOR_RESTARTS",
    "API_REQUESTS",
    "API_REQUEST_DURATION",
    "BUILD_INFO",
    "CAMPAIGNS_ACTIVE",
    "CAMPAIGNS_WAITING",
    "CIRCUIT_BREAKER_STATE",
    "CIRCUIT_CLOSED",
    "CIRCUIT_HALF_OPEN",
    "CIRCUIT_OPEN",
    "DEFERS",
    "DEPENDENCIES",
    "DEPENDENCY_UP",
    "EMAILS_FAILED",
    "EMAILS_SENT",
    "LEADER",
    "PROCESSING_OLDEST_SECONDS",
    "PROCESSING_SECONDS",
    "QUEUE_DEPTH",
    "QUOTA_AVAILABLE",
    "RATE_COUNTER_REBUILDS",
    "RATE_HOUR_LIMIT",
    "RATE_HOUR_USED",
    "RATE_LIMITER_REDIS_ERRORS",
    "RECIPIENTS_PENDING",
    "RECIPIENTS_SENDABLE",
    "RETENTION_DELETED",
    "SEND_DURATION",
    "SMTP_CONNECTION_ERRORS",
    "SMTP_ERROR_CAUSES",
    "TOKENS_DENIED",
    "TOKENS_GRANTED",
    "TOKEN_DENIAL_REASONS",
    "WAITING_REASONS",
    "actor_kind",
    "governor_series",
    "precreate_actor_series",
    "precreate_api_series",
    "register_mailbox",
    "render_latest",
    "set_build_info",
    "smtp_error_series",
    "unregister_mailbox",
]

# `_created` series double the output of every counter and nobody graphs them.
# (prometheus_client leaves this one function unannotated.)
disable_created_metrics()  # type: ignore[no-untyped-call]

# Label values used to pre-create series, so that alerts and rate() see a 0 instead of
# "no data" before the first event.
SEND_KINDS: Final = ("campaign", "test")
FAILURE_REASONS: Final = ("permanent", "transient", "in_doubt")
# The MISSION's defer reasons; other reasons still work, they just appear on first use.
KNOWN_DEFER_REASONS: Final = (
    "rate_per_hour",
    "quota_exhausted",
    "outside_hours",
    "daily_limit",
    "transient_error",
)

# The actors of a service (mailer.service) plus the per-campaign ones, by actor_kind(): their
# restart and mailbox-full series exist before the first crash. A kind not listed here gets
# its series when it starts (service.MetricsObserver).
ACTOR_KINDS: Final = (
    "smtp-sender",
    "rate-governor",
    "quota-sync",
    "api",
    "scheduler",
    "leader",
    "runner",
    "campaign",
)
# Why an SMTP session could not be opened or was lost without a reply (mailer.smtphealth).
SMTP_ERROR_CAUSES: Final = ("connect", "tls", "auth", "timeout", "protocol")
DEPENDENCIES: Final = ("postgres", "nats", "redis", "smtp")
# Why an unfinished campaign that nobody is sending right now waits (mailer.gauges):
# a deferral's reason, a pause, or "queued" (runnable, waiting for a free slot).
WAITING_REASONS: Final = (
    "queued",
    "rate_per_hour",
    "quota_exhausted",
    "outside_hours",
    "daily_limit",
    "transient_error",
    "circuit_breaker",
    "render_error",
    "paused",
    "scheduled",
)

# Circuit-breaker states as gauge values (ordered by severity so max() is meaningful).
CIRCUIT_CLOSED: Final = 0
CIRCUIT_HALF_OPEN: Final = 1
CIRCUIT_OPEN: Final = 2

# ---------------------------------------------------------------------------------------
# Sending
# ---------------------------------------------------------------------------------------

EMAILS_SENT: Final = Counter(
    "mailer_emails_sent_total",
    "Emails accepted by the SMTP server, by kind (campaign or test).",
    ["kind"],
)
EMAILS_FAILED: Final = Counter(
    "mailer_emails_failed_total",
    "Emails that failed: permanent (5xx, recipient failed), transient (4xx/timeout, "
    "campaign deferred) or in_doubt (connection lost after DATA; outcome unknown).",
    ["kind", "reason"],
)
SEND_DURATION: Final = Histogram(
    "mailer_send_duration_seconds",
    "Duration of one SMTP transaction (connect or reuse, MAIL FROM to the end of DATA).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)

# ---------------------------------------------------------------------------------------
# Rate governor
# ---------------------------------------------------------------------------------------

TOKENS_GRANTED: Final = Counter(
    "mailer_tokens_granted_total",
    "Send tokens granted by the SMTP account's rate governor (each one may become one SMTP send).",
    ["account"],
)
TOKENS_DENIED: Final = Counter(
    "mailer_tokens_denied_total",
    "Send tokens refused by the SMTP account's rate governor, by reason (e.g. rate_per_hour).",
    ["account", "reason"],
)
TOKEN_DENIAL_REASONS: Final = ("rate_per_hour", "daily_limit", "quota_exhausted", "outside_hours")
RATE_LIMITER_REDIS_ERRORS: Final = Counter(
    "mailer_rate_limiter_redis_errors_total",
    "Redis errors in the send-rate limiter; policy=fail_open means sending went on "
    "without the Redis window check.",
    ["policy"],
)
RATE_COUNTER_REBUILDS: Final = Counter(
    "mailer_rate_counter_rebuilds_total",
    "Send-rate counters found missing in Redis while the send log had sends in their "
    "window (Redis lost its data), rebuilt from the send log; window=hour|day.",
    ["window"],
)
API_THROTTLE_REDIS_ERRORS: Final = Counter(
    "mailer_api_throttle_redis_errors_total",
    "Redis errors in the API throttles (start, test email); policy=fail_closed means the "
    "request was refused as temporarily unavailable.",
    ["policy", "action"],
)

# ---------------------------------------------------------------------------------------
# Actor runtime
# ---------------------------------------------------------------------------------------

ACTOR_MAILBOX_FULL: Final = Counter(
    "mailer_actor_mailbox_full_total",
    "Messages that found an actor's mailbox full, by actor kind.",
    ["actor"],
)
ACTOR_RESTARTS: Final = Counter(
    "mailer_actor_restarts_total",
    "Actor restarts by the supervisor after a crash, by actor kind.",
    ["actor"],
)

# ---------------------------------------------------------------------------------------
# Campaigns and queue
# ---------------------------------------------------------------------------------------

CAMPAIGNS_ACTIVE: Final = Gauge(
    "mailer_campaigns_active",
    "Campaigns running across the cluster, as the leader counts them (0 on followers).",
)
QUEUE_DEPTH: Final = Gauge(
    "mailer_queue_depth",
    "Queue entries waiting to be processed (not completed, not cancelled).",
)
LEADER: Final = Gauge(
    "mailer_leader",
    "1 when this process holds the scheduler leadership, else 0.",
)
DEFERS: Final = Counter(
    "mailer_defers_total",
    "Campaign deferrals, by reason (rate_per_hour, quota_exhausted, outside_hours, ...).",
    ["reason"],
)
CIRCUIT_BREAKER_STATE: Final = Gauge(
    "mailer_circuit_breaker_state",
    "Circuit breaker of an SMTP account: 0 closed, 1 half-open, 2 open.",
    ["account"],
)
ACCOUNT_FAILOVERS: Final = Counter(
    "mailer_account_failovers_total",
    "Campaigns switching SMTP account: to their backup while their own account's breaker "
    "is open (to = the backup), and back (to = their own).",
    ["account", "to"],
)
PROCESSING_SECONDS: Final = Histogram(
    "mailer_processing_seconds",
    "Processing duration of a campaign, from start of sending to completion.",
    buckets=(1, 5, 15, 60, 300, 900, 1800, 3600, 7200, 14400, 43200, 86400),
)
# The histogram only sees campaigns that finished; a stuck one never gets there. This
# gauge is what the "processing > 30 min" alert watches.
PROCESSING_OLDEST_SECONDS: Final = Gauge(
    "mailer_processing_oldest_seconds",
    "Age in seconds of the oldest queue entry currently in processing (0 when none).",
)

RETENTION_DELETED: Final = Counter(
    "mailer_retention_deleted_total",
    "Rows the leader's retention removed, by table (send_log, audit_log, recipient, soft_bounce).",
    ["table"],
)
RETENTION_TABLES: Final = ("send_log", "audit_log", "recipient", "soft_bounce")
# ---------------------------------------------------------------------------------------
# Backlog, budgets and dependencies: read from PostgreSQL / Redis at scrape time
# (mailer.gauges). Cluster-wide facts: every process exports the same values, so alerts
# take max() over the job.
# ---------------------------------------------------------------------------------------

RECIPIENTS_PENDING: Final = Gauge(
    "mailer_recipients_pending",
    "Pending recipients of started, unfinished campaigns (running, waiting or paused).",
)
RECIPIENTS_SENDABLE: Final = Gauge(
    "mailer_recipients_sendable",
    "Pending recipients of campaigns that may send now: ready or sending, not deferred to a "
    "later time, not paused (by a manager, the breaker or render_error). Above 0 while "
    "nothing is sent means sending is stalled.",
)
CAMPAIGNS_WAITING: Final = Gauge(
    "mailer_campaigns_waiting",
    "Unfinished campaigns no process is sending right now, by why they wait: a defer reason, "
    "paused, circuit_breaker, render_error, or queued (may run now, waits for a free slot).",
    ["reason"],
)
QUOTA_AVAILABLE: Final = Gauge(
    "mailer_quota_emails_available",
    "Emails left of the SMTP account's monthly allowance from its provider (the quota table).",
    ["account"],
)
RATE_HOUR_USED: Final = Gauge(
    "mailer_rate_hour_used",
    "Send tokens of the current UTC clock hour already reserved for the SMTP account (Redis).",
    ["account"],
)
RATE_HOUR_LIMIT: Final = Gauge(
    "mailer_rate_hour_limit",
    "Send tokens allowed per clock hour for the SMTP account (MAILER_RATE_PER_HOUR).",
    ["account"],
)
DEPENDENCY_UP: Final = Gauge(
    "mailer_dependency_up",
    "1 when a dependency answered its last check, else 0. postgres, redis: a query/PING at "
    "scrape time; nats: the client is connected; smtp: 0 after a failed attempt to open a "
    "session, 1 after a success or before any attempt.",
    ["dependency"],
)
SMTP_CONNECTION_ERRORS: Final = Counter(
    "mailer_smtp_connection_errors_total",
    "SMTP sessions of the SMTP account that could not be opened or were lost without a "
    "reply, by cause (connect, tls, auth, timeout, protocol).",
    ["account", "cause"],
)

# ---------------------------------------------------------------------------------------
# Public NATS API
# ---------------------------------------------------------------------------------------

API_REQUESTS: Final = Counter(
    "mailer_api_requests_total",
    "Requests to the public NATS API, by subject (after the prefix) and result code: ok, or "
    "the error code of the reply (validation_error, throttled, internal_error, ...).",
    ["subject", "code"],
)
API_REQUEST_DURATION: Final = Histogram(
    "mailer_api_request_duration_seconds",
    "Time a request to the public NATS API took, from receipt to reply, by subject.",
    ["subject"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)

BUILD_INFO: Final = Info("mailer_build", "Version of the running mailer.")


def set_build_info(version: str | None = None, **labels: str) -> None:
    """Publish ``mailer_build_info{version=...}``; called at import with the package version."""
    if version is None:
        try:
            version = metadata.version("mailer")
        except metadata.PackageNotFoundError:
            version = "unknown"
    BUILD_INFO.info({"version": version, **labels})


set_build_info()

for _kind in SEND_KINDS:
    EMAILS_SENT.labels(kind=_kind)
    for _reason in FAILURE_REASONS:
        EMAILS_FAILED.labels(kind=_kind, reason=_reason)
for _reason in KNOWN_DEFER_REASONS:
    DEFERS.labels(reason=_reason)
for _reason in ("circuit_breaker", "render_error"):  # the engine's pauses count here too
    DEFERS.labels(reason=_reason)
RATE_LIMITER_REDIS_ERRORS.labels(policy="fail_open")
for _table in RETENTION_TABLES:
    RETENTION_DELETED.labels(table=_table)
for _window in ("hour", "day"):
    RATE_COUNTER_REBUILDS.labels(window=_window)
for _action in ("start", "test_email"):
    API_THROTTLE_REDIS_ERRORS.labels(policy="fail_closed", action=_action)
for _reason in WAITING_REASONS:
    CAMPAIGNS_WAITING.labels(reason=_reason)
# smtp: no failure seen yet; the others are set by their first check (at start, each scrape).
for _dependency in DEPENDENCIES:
    DEPENDENCY_UP.labels(dependency=_dependency).set(1 if _dependency == "smtp" else 0)

# ---------------------------------------------------------------------------------------
# Actor kinds
# ---------------------------------------------------------------------------------------

# A name segment that is an identifier rather than a word: a number, or a hex/uuid-ish
# token of 8+ characters that contains a digit.
_ID_SEGMENT: Final = re.compile(r"\d+|(?=[0-9a-fA-F]*\d)[0-9a-fA-F]{8,}")
_SEPARATORS: Final = re.compile(r"[-_:./]")
# Hard ceiling on distinct kinds: a naming mistake must not explode Prometheus' memory.
MAX_ACTOR_KINDS: Final = 50
OTHER_KIND: Final = "other"
_known_kinds: set[str] = set()
_kinds_lock = threading.Lock()


def actor_kind(name: str) -> str:
    """Map an actor name to a bounded label value: ``campaign-123`` → ``campaign``.

    The name is cut at its first id-like segment (all digits, or a hex/uuid token):
    ``campaign-42-retry`` → ``campaign``, ``rate-governor`` and ``scheduler`` stay as they
    are. Past MAX_ACTOR_KINDS distinct kinds everything new maps to ``other``.
    """
    pos = 0
    kind = name
    for sep in _SEPARATORS.finditer(name):
        segment = name[pos : sep.start()]
        if _ID_SEGMENT.fullmatch(segment):
            kind = name[: max(pos - 1, 0)]
            break
        pos = sep.end()
    else:
        if _ID_SEGMENT.fullmatch(name[pos:]):
            kind = name[: max(pos - 1, 0)]
    if not kind:
        kind = "unnamed"
    with _kinds_lock:
        if kind in _known_kinds:
            return kind
        if len(_known_kinds) >= MAX_ACTOR_KINDS:
            return OTHER_KIND
        _known_kinds.add(kind)
        return kind


for _kind in ACTOR_KINDS:
    ACTOR_RESTARTS.labels(actor=actor_kind(_kind))
    ACTOR_MAILBOX_FULL.labels(actor=actor_kind(_kind))


def precreate_actor_series(actor_name: str) -> None:
    """Restart and mailbox-full series of ``actor_name``'s kind, at 0 until the first event."""
    kind = actor_kind(actor_name)
    ACTOR_RESTARTS.labels(actor=kind)
    ACTOR_MAILBOX_FULL.labels(actor=kind)


def precreate_api_series(subjects: Iterable[str]) -> None:
    """For each API subject: its ``ok`` and ``internal_error`` counts, and its histogram.

    Other error codes appear on their first use: they depend on the subject, and every
    subject times every code would be hundreds of series that stay 0.
    """
    for subject in subjects:
        API_REQUESTS.labels(subject=subject, code="ok")
        API_REQUESTS.labels(subject=subject, code="internal_error")
        API_REQUEST_DURATION.labels(subject=subject)


# ---------------------------------------------------------------------------------------
# Mailbox depth: read at scrape time
# ---------------------------------------------------------------------------------------


class _MailboxDepthCollector(Collector):
    """Exports ``mailer_actor_mailbox_depth``: queued messages summed per actor kind.

    Depth is read from the mailboxes when Prometheus scrapes instead of being pushed on
    every put/get, which would cost a metric update per message. Summing per kind gives
    the total backlog of e.g. all campaign actors.
    """

    def __init__(self) -> None:
        self._sources: dict[str, Callable[[], int]] = {}
        self._lock = threading.Lock()  # scrapes may come from another thread in tests/tools

    def register(self, name: str, depth: Callable[[], int]) -> None:
        with self._lock:
            self._sources[name] = depth

    def unregister(self, name: str) -> None:
        with self._lock:
            self._sources.pop(name, None)

    def describe(self) -> Iterable[GaugeMetricFamily]:
        # Declared so the registry knows the name (and rejects a duplicate) up front.
        return [self._family()]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        with self._lock:
            sources = list(self._sources.items())
        totals: dict[str, int] = {}
        for name, depth in sources:
            try:
                value = depth()
            except Exception:  # noqa: S112 - a dying mailbox must not break the scrape
                continue
            kind = actor_kind(name)
            totals[kind] = totals.get(kind, 0) + value
        family = self._family()
        for kind, total in sorted(totals.items()):
            family.add_metric([kind], total)
        return [family]

    @staticmethod
    def _family() -> GaugeMetricFamily:
        return GaugeMetricFamily(
            "mailer_actor_mailbox_depth",
            "Messages waiting in actor mailboxes, summed per actor kind.",
            labels=["actor"],
        )


_MAILBOX_DEPTH: Final = _MailboxDepthCollector()
REGISTRY.register(_MAILBOX_DEPTH)
ACTOR_MAILBOX_DEPTH: Final = _MAILBOX_DEPTH


def register_mailbox(name: str, depth: Callable[[], int]) -> None:
    """Report ``depth()`` (e.g. ``queue.qsize``) of actor ``name`` in mailbox-depth scrapes.

    The runtime calls this when an actor starts and ``unregister_mailbox`` when it stops,
    so finished campaign actors disappear from the sum.
    """
    _MAILBOX_DEPTH.register(name, depth)


def unregister_mailbox(name: str) -> None:
    _MAILBOX_DEPTH.unregister(name)


def render_latest(accept: str | None = None) -> tuple[bytes, str]:
    """Exposition of the default registry and its content type.

    Without ``accept`` this is the classic text format; with the scraper's Accept header
    the format is negotiated (OpenMetrics when Prometheus asks for it).
    """
    if accept is None:
        return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
    encoder, content_type = choose_encoder(accept)
    return encoder(REGISTRY), content_type


def governor_series(account: str) -> None:
    """An SMTP account's governor counters, at 0 from its start (``account``: its name)."""
    TOKENS_GRANTED.labels(account=account)
    for reason in TOKEN_DENIAL_REASONS:
        TOKENS_DENIED.labels(account=account, reason=reason)


def smtp_error_series(account: str) -> None:
    """An SMTP account's connection-error counters, at 0 from its start."""
    for cause in SMTP_ERROR_CAUSES:
        SMTP_CONNECTION_ERRORS.labels(account=account, cause=cause)
