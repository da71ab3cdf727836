"""Events other CRM services consume, published on JetStream so none is lost.

One stream per subject prefix (``MAILER_EVENTS_<prefix with _ for .>``) captures
``<prefix>.events.>``:

* ``<prefix>.events.campaign.<event>``: ``CampaignEvent`` (queued, started, deferred,
  resumed, paused, progress, sent, completed_with_errors, cancelled);
* ``<prefix>.events.notify.<owner>``: ``Notification`` for the campaign's owner;
* ``<prefix>.events.unsubscribe``: ``UnsubscribeEvent``, with the full address: updating
  the CRM's records of that address is the event's whole purpose. Logs never carry it.

A consumer that was down catches up from the stream (kept ``max_age``, 7 days by
default). Core NATS subscribers on the same subjects still see every message live.

Publishing is best effort by design: the database holds the truth, so a publish that
fails is logged and counted (``mailer_events_publish_failures_total``), never raised into
the sending path. Each event with a natural identity carries ``Nats-Msg-Id`` so a repeated
publish (a retry, a restarted actor re-announcing) is stored once within the stream's
duplicate window.
"""

from __future__ import annotations

import logging
import re
from datetime import datetime
from typing import Final, Literal, get_args
from zoneinfo import ZoneInfo

import nats.errors
from msgspec import Struct
from nats.js import api
from nats.js.errors import BadRequestError
from prometheus_client import Counter

from mailer.bus import STREAM_CONFIG_DIFFERS, Bus, encode
from mailer.config import Settings
from mailer.messages import CampaignEvent, Notice
from mailer.texts import TEXTS, fields_of, reason_key, reason_values, text, tz_label

__all__ = [
    "EVENTS_PUBLISH_FAILURES",
    "MSG_ID_HEADER",
    "JetStreamEvents",
    "Notification",
    "SuppressionEvent",
    "UnsubscribeEvent",
    "notification_for",
    "owner_token",
    "stream_name",
]

log = logging.getLogger("mailer.events")

MSG_ID_HEADER: Final = "Nats-Msg-Id"

EventKind = Literal["campaign", "notify", "unsubscribe", "suppression"]

EVENTS_PUBLISH_FAILURES: Final = Counter(
    "mailer_events_publish_failures_total",
    "Events that could not be stored on JetStream (the database still holds the truth).",
    ["kind"],
)
for _event_kind in get_args(EventKind):  # a series from the start: increase() sees the first
    EVENTS_PUBLISH_FAILURES.labels(kind=_event_kind)

# Subject tokens may not contain '.', '*', '>' or whitespace; '%' is escaped too so
# the encoding stays reversible.
_UNSAFE_TOKEN_CHAR = re.compile(r"[.*>%\s\x00-\x1f\x7f]")


class Notification(Struct, kw_only=True):
    """Something the campaign's owner should see, e.g. why their campaign waits."""

    owner_id: str
    campaign_id: int
    kind: str  # deferred | paused | completed_with_errors
    reason_code: str
    message: str  # Russian, ready to show
    deferred_until: datetime | None = None
    at: datetime


class UnsubscribeEvent(Struct, kw_only=True):
    email: str  # the full address: other services update their records by it
    email_hash: str
    email_domain: str
    source: str
    campaign_id: int | None
    at: datetime  # when the unsubscribe was first recorded


class SuppressionEvent(Struct, kw_only=True):
    """An address added to the suppression list by a bounce, a complaint or an admin."""

    email: str  # the full address: other services update their records by it
    email_hash: str
    email_domain: str
    reason: str  # hard_bounce | soft_bounce | complaint | manual
    source: str  # dsn | arf | other | webhook | api
    campaign_id: int | None
    recipient_id: int | None
    detail: str
    at: datetime


def stream_name(prefix: str) -> str:
    """``t3.mailer`` -> ``MAILER_EVENTS_t3_mailer`` (stream names may not hold dots)."""
    return "MAILER_EVENTS_" + prefix.replace(".", "_")


def owner_token(owner_id: str) -> str:
    """An owner id as one subject token: unsafe characters percent-encoded.

    CRM user ids are normally plain, so they read as themselves; an odd one
    (``a.b``) cannot break out into another subject level.
    """
    token = _UNSAFE_TOKEN_CHAR.sub(lambda m: "".join(f"%{b:02X}" for b in m[0].encode()), owner_id)
    return token or "%00"


def _subject_token(name: str) -> str:
    return _UNSAFE_TOKEN_CHAR.sub("_", name) or "_"


def notification_for(
    event: CampaignEvent, *, settings: Settings | None = None, **values: object
) -> Notification | None:
    """The owner's notification for a campaign event, or None if it needs none.

    The reason text is the manager's view's (``texts.reason_values``: the
    hourly limit, working hours, retry delay and when the wait ends, worded
    from ``settings`` relative to the event's time); ``event.details``, then
    ``values``, add or override values (``sent`` and ``limit`` for
    daily_limit). A reason whose text would keep a placeholder unfilled gets
    the generic deferral text instead: the owner never reads a literal ``{limit}``.
    """
    if event.event == "deferred":
        reason = event.defer_reason or "deferred"
    elif event.event == "paused":
        reason = event.defer_reason or "paused"
    elif event.event == "completed_with_errors":
        reason = "completed_with_errors"
    else:
        return None
    s = settings or Settings()
    until = event.deferred_until
    # The SMTP account the wait is for: the campaign names it with several accounts.
    account = (event.details or {}).get("account", "")
    fill: dict[str, object] = reason_values(
        s, until=until, now=event.at, lang="ru", account=account
    )
    fill["campaign_id"] = event.campaign_id
    if until is not None:
        tz = ZoneInfo(s.timezone)
        # A date, a time and the zone: the owner reads it on any day, anywhere.
        fill["until_at"] = f"{until.astimezone(tz).strftime('%d.%m.%Y %H:%M')} {tz_label(tz)}"
    if event.event == "completed_with_errors":
        counts = event.counts or {}
        code = "notify_completed_with_errors"
        fill["sent"] = counts.get("sent", 0)
        fill["failed"] = counts.get("failed", 0) + counts.get("in_doubt", 0)
    else:
        code = reason_key(reason, until=until, now=event.at, account=account)
    fill.update(event.details or {})
    fill.update(values)

    if code not in TEXTS or not fields_of(code) <= fill.keys():
        if event.event == "paused":
            code = "notify_paused"
        else:
            code = "notify_deferred_until" if until is not None else "notify_deferred"
        fill.setdefault("reason", reason)
    return Notification(
        owner_id=event.owner_id,
        campaign_id=event.campaign_id,
        kind=event.event,
        reason_code=reason,
        message=text(code, "ru", **fill),
        deferred_until=until,
        at=event.at,
    )


class JetStreamEvents:
    """The EventSink of campaign actors, plus notifications and unsubscribes.

    ``ensure_stream`` once at start (it raises: a service without its event
    stream should not come up); the publish methods never raise.
    """

    def __init__(
        self,
        bus: Bus,
        *,
        max_age_seconds: float = 7 * 24 * 3600,
        max_bytes: int = 1024**3,
        replicas: int = 1,
        duplicate_window_seconds: float = 15 * 60,
        publish_timeout: float = 2.0,
        settings: Settings | None = None,
    ) -> None:
        self._bus = bus
        self._settings = settings  # what the notification texts say of limits and hours
        self.stream = stream_name(bus.prefix)
        self._config = api.StreamConfig(
            name=self.stream,
            description="mailer events: campaigns, owner notifications, unsubscribes",
            subjects=[bus.subject("events", ">")],
            retention=api.RetentionPolicy.LIMITS,
            storage=api.StorageType.FILE,
            # Old events go first when full: consumers are days behind at worst,
            # and the database can answer anything older.
            discard=api.DiscardPolicy.OLD,
            max_age=max_age_seconds,
            max_bytes=max_bytes,
            num_replicas=replicas,
            # Long enough to cover a publish retried after a reconnect or a
            # restarted actor re-announcing; ids are kept in memory for this long.
            # (The server refuses a window longer than max_age.)
            duplicate_window=min(duplicate_window_seconds, max_age_seconds),
        )
        self._timeout = publish_timeout

    async def ensure_stream(self) -> api.StreamInfo:
        """Creates the stream, or brings an existing one to this configuration.

        Idempotent and safe when several pods start at once: creating a stream
        that exists with the same configuration is a no-op on the server.
        """
        js = self._bus.nc.jetstream(timeout=self._timeout * 2)
        try:
            return await js.add_stream(self._config)
        except BadRequestError as exc:
            if exc.err_code != STREAM_CONFIG_DIFFERS:
                raise
        info = await js.update_stream(self._config)
        log.info("event stream updated to the configured limits", extra={"stream": self.stream})
        return info

    # --- the EventSink of campaign actors ----------------------------------------------

    async def emit(self, event: CampaignEvent) -> None:
        # Progress events repeat with the same timestamp under a still clock and
        # carry no identity of their own: they get no dedup id.
        msg_id = (
            None
            if event.event == "progress"
            else f"{event.campaign_id}:{event.event}:{event.at.isoformat()}"
        )
        subject = self._bus.subject("events", "campaign", _subject_token(event.event))
        await self._publish("campaign", subject, encode(event), msg_id, event.campaign_id)

    def notice(self, event: CampaignEvent) -> Notice | None:
        """The owner's notification for ``event``, ready for the outbox (None if it needs none).

        Whether one is due is the caller's call: the campaign actor asks once per
        ongoing reason (the queue entry remembers which reason was notified) and
        stores the notice in the same transaction as the deferral.
        """
        note = notification_for(event, settings=self._settings)
        return None if note is None else self.notification_notice(note)

    def event_notice(self, event: CampaignEvent) -> Notice:
        """A campaign event as an outbox row: the same subject and dedup id as ``emit``."""
        return Notice(
            kind="campaign",
            subject=self._bus.subject("events", "campaign", _subject_token(event.event)),
            msg_id=f"{event.campaign_id}:{event.event}:{event.at.isoformat()}",
            payload=encode(event),
            campaign_id=event.campaign_id,
        )

    def unsubscribe_notice(self, event: UnsubscribeEvent) -> Notice:
        """An unsubscribe as an outbox row: the same subject and dedup id as ``unsubscribed``."""
        return Notice(
            kind="unsubscribe",
            subject=self._bus.subject("events", "unsubscribe"),
            msg_id=f"unsubscribe:{event.email_hash}:{event.at.isoformat()}",
            payload=encode(event),
            campaign_id=event.campaign_id,
        )

    def suppression_notice(self, event: SuppressionEvent) -> Notice:
        """``<prefix>.events.suppression.<reason>``, once per address and record time."""
        return Notice(
            kind="suppression",
            subject=self._bus.subject("events", "suppression", _subject_token(event.reason)),
            msg_id=f"suppression:{event.email_hash}:{event.at.isoformat()}",
            payload=encode(event),
            campaign_id=event.campaign_id,
        )

    def notification_notice(self, note: Notification) -> Notice:
        when = (note.deferred_until or note.at).isoformat()
        return Notice(
            kind="notify",
            subject=self._bus.subject("events", "notify", owner_token(note.owner_id)),
            msg_id=f"notify:{note.campaign_id}:{note.kind}:{note.reason_code}:{when}",
            payload=encode(note),
            campaign_id=note.campaign_id,
        )

    async def publish_notice(self, notice: Notice) -> bool:
        """Publishes a stored notice; False if JetStream did not confirm it."""
        return await self._publish(
            _kind(notice.kind), notice.subject, notice.payload, notice.msg_id, notice.campaign_id
        )

    async def unsubscribed(self, event: UnsubscribeEvent) -> None:
        # One unsubscribe per address and record time: a repeat is the same fact.
        msg_id = f"unsubscribe:{event.email_hash}:{event.at.isoformat()}"
        subject = self._bus.subject("events", "unsubscribe")
        await self._publish("unsubscribe", subject, encode(event), msg_id, event.campaign_id)

    async def _publish(
        self,
        kind: EventKind,
        subject: str,
        payload: bytes,
        msg_id: str | None,
        campaign_id: int | None,
    ) -> bool:
        headers = {MSG_ID_HEADER: msg_id} if msg_id is not None else None
        try:
            js = self._bus.nc.jetstream(timeout=self._timeout)
            await js.publish(subject, payload, timeout=self._timeout, headers=headers)
            return True
        except (nats.errors.Error, RuntimeError, TimeoutError) as exc:
            # TimeoutError: stored or not, unknown (a repeat would be deduplicated);
            # NoRespondersError: no stream; RuntimeError: the bus is closed.
            EVENTS_PUBLISH_FAILURES.labels(kind=kind).inc()
            log.warning(
                "event not stored on JetStream",
                extra={
                    "event_kind": kind,
                    "subject": subject,
                    "campaign_id": campaign_id,
                    "error": repr(exc),
                },
            )
            return False


def _kind(kind: str) -> EventKind:
    # Outbox rows are checked by the table; anything else counts as a notification.
    if kind == "campaign":
        return "campaign"
    if kind in ("unsubscribe", "suppression"):
        return "unsubscribe" if kind == "unsubscribe" else "suppression"
    return "notify"
