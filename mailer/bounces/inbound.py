"""From an inbound report to the suppression list: verify, classify, apply.

Both ways reports come in — the SMTP receiver and the provider webhook — end
here. A report is trusted only through a bounce address whose token verifies
(``verp.recipient_of``): the envelope recipient it was delivered to, or else
the one bounce address found inside it (a complaint carries the original
message's Return-Path). No verified address, or several different ones: the
report changes nothing and is counted as ``unverified``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from typing import Protocol

from mailer.bounces.parse import Kind, parse_report
from mailer.bounces.verp import recipient_of
from mailer.clock import Clock
from mailer.suppression import BOUNCE_REPORTS, Applied, PgSuppressions

__all__ = ["BounceProcessor"]

log = logging.getLogger("mailer.bounces")


class OutboxFlush(Protocol):
    async def flush(self) -> int: ...


class BounceProcessor:
    def __init__(
        self,
        *,
        domain: str,
        secrets: Sequence[str],
        store: PgSuppressions,
        clock: Clock,
        outbox: OutboxFlush | None = None,
    ) -> None:
        self._domain = domain
        self._secrets = list(secrets)
        self._store = store
        self._clock = clock
        self._outbox = outbox

    def recipient(self, addresses: Iterable[str]) -> int | None:
        """The one recipient the genuine bounce addresses among ``addresses`` name."""
        ids = {rid for a in addresses if (rid := recipient_of(self._secrets, self._domain, a))}
        return ids.pop() if len(ids) == 1 else None

    async def message(
        self, rcpt_tos: Sequence[str], data: bytes, *, channel: str = "smtp"
    ) -> Applied | None:
        """One message the SMTP receiver accepted (``channel`` "smtp") or the IMAP poller
        read from the bounce mailbox ("imap"; ``rcpt_tos``: the envelope recipients its
        delivery headers name). Raises only when the database fails (the receiver then
        answers 451 and the sender retries; the poller leaves the message unseen)."""
        report = parse_report(data)
        if report.kind is None:
            BOUNCE_REPORTS.labels(kind="ignored", source=channel).inc()
            log.info("inbound message is no bounce or complaint", extra={"format": report.format})
            return None
        rid = self.recipient(rcpt_tos)
        if rid is None:
            rid = self.recipient(report.verp)
        return await self.apply(
            rid, report.kind, source=report.format, detail=report.detail, channel=channel
        )

    async def apply(
        self,
        recipient_id: int | None,
        kind: Kind,
        *,
        source: str,
        detail: str,
        channel: str | None = None,
    ) -> Applied | None:
        """``channel``: how the report came (the metric's ``source``): smtp, imap,
        webhook; None: the webhook's reports ("webhook" source), else smtp."""
        if channel is None:
            channel = "webhook" if source == "webhook" else "smtp"
        if recipient_id is None:
            BOUNCE_REPORTS.labels(kind="unverified", source=channel).inc()
            log.warning(
                "bounce report without a valid bounce address: ignored",
                extra={"kind": kind, "source": source},
            )
            return None
        applied = await self._store.report(
            recipient_id, kind, source=source, detail=detail, now=self._clock.now()
        )
        BOUNCE_REPORTS.labels(kind=kind if applied.found else "unknown", source=channel).inc()
        log.info(
            "bounce report applied",
            extra={
                "recipient_id": recipient_id,
                "kind": kind,
                "source": source,
                "found": applied.found,
                "recipient_status": applied.recipient_status,
                "suppressed": applied.suppressed,
            },
        )
        if applied.suppressed and self._outbox is not None:
            try:
                await self._outbox.flush()
            except Exception:  # stored: the leader's relay publishes it later
                log.warning("suppression event left in the outbox", exc_info=True)
        return applied
