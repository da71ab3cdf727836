"""The invariants a round must hold, judged from the sink, the database and the stream.

Each check returns violations named after the invariant, so a report says which promise
broke and with what evidence; ``figures`` are the counts the long run prints.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, time, timedelta
from typing import Any
from zoneinfo import ZoneInfo

from tests.chaos.driver import (
    BATCH_SIZE,
    FINAL,
    LONG_REASONS,
    MAX_ACTIVE,
    SMTP_CONNECTIONS,
    SMTP_TIMEOUT,
    Outcome,
)

SETTLED_RECIPIENT = ("sent", "failed", "unsubscribed", "in_doubt")
FINAL_EVENTS = ("sent", "completed_with_errors")
DAY_ZONE = ZoneInfo("Europe/Moscow")  # the service's default zone: days of daily limits
QUOTA_SYNC_SECONDS = 3600.0  # the default MAILER_QUOTA_SYNC_INTERVAL_SECONDS


@dataclass(frozen=True)
class Violation:
    invariant: str
    detail: str

    def __str__(self) -> str:
        return f"{self.invariant}: {self.detail}"


def check(o: Outcome) -> list[Violation]:
    v: list[Violation] = []
    v += _at_most_once(o)
    v += _nothing_lost_or_stuck(o)
    v += _in_doubt_bounded(o)
    v += _limits(o)
    v += _honest_status(o)
    v += _send_log_agrees(o)
    v += _events(o)
    return v


def figures(o: Outcome) -> dict[str, Any]:
    received = Counter(a for a, _, _ in o.deliveries)
    by_status = Counter(r["status"] for r in o.recipients)
    return {
        "messages": len(o.deliveries),
        "fail_open_messages": fail_open_messages(o),
        "duplicates": sum(n - 1 for n in received.values() if n > 1),
        "in_doubt": by_status.get("in_doubt", 0),
        "sent": by_status.get("sent", 0),
        "failed": by_status.get("failed", 0),
        "pending": by_status.get("pending", 0),
        "sending": by_status.get("sending", 0),
        "faults": Counter(a.fault.kind for a in o.applied if a.resolved),
        "skipped_faults": sum(1 for a in o.applied if not a.resolved),
        "failovers": list(o.failovers),
        "unexpected_exits": list(o.unexpected_exits),
        "late_exits": list(o.late_exits),
        "resumes": o.resumes,
        "settle_seconds": round(o.settle_seconds, 1),
    }


def _campaign_of(o: Outcome) -> dict[str, int]:
    return {r["email"].lower(): r["campaign_id"] for r in o.recipients}


def _at_most_once(o: Outcome) -> list[Violation]:
    received = Counter(a.lower() for a, _, _ in o.deliveries)
    senders: dict[str, list[str]] = defaultdict(list)
    for a, _, who in o.deliveries:
        senders[a.lower()].append(who)
    return [
        Violation("duplicate_delivery", f"{a} received {n} times (sent by {senders[a]})")
        for a, n in sorted(received.items())
        if n > 1
    ]


def _nothing_lost_or_stuck(o: Outcome) -> list[Violation]:
    v: list[Violation] = []
    received = {a.lower() for a, _, _ in o.deliveries}
    status = {c["id"]: c for c in o.campaigns}
    for r in o.recipients:
        email, st = r["email"].lower(), r["status"]
        final = status[r["campaign_id"]]["status"] in FINAL
        if st == "sending":
            v.append(Violation("stuck_sending", f"{email} still 'sending' after the round"))
        elif st == "pending" and final and status[r["campaign_id"]]["status"] != "cancelled":
            v.append(Violation("lost", f"{email} 'pending' in a finished campaign"))
        if st == "sent" and email not in received:
            v.append(Violation("lost", f"{email} recorded 'sent' but never received"))
        if email in received and st not in ("sent", "in_doubt"):
            v.append(Violation("unrecorded_delivery", f"{email} received but recorded {st!r}"))
    horizon = o.finished_at
    for c in o.campaigns:
        if c["status"] in FINAL:
            continue
        waits = (
            c["status"] in ("ready", "sending")
            and c["defer_reason"] in LONG_REASONS
            and c["deferred_until"] is not None
            and c["deferred_until"] > horizon
        ) or _waits_for_a_top_up(o, c)
        if waits and (why := _untrue_wait(o, c)):
            v.append(Violation("untrue_wait", f"campaign {c['id']}: {why}"))
        if not waits:
            v.append(
                Violation(
                    "stuck_campaign",
                    f"campaign {c['id']} {c['status']} reason={c['defer_reason']} "
                    f"until={c['deferred_until']}",
                )
            )
    if not o.settled:
        v.append(Violation("stuck_campaign", "the round did not settle in time"))
    return v


def _waits_for_a_top_up(o: Outcome, c: dict[str, Any]) -> bool:
    """A quota wait names no time (issue 8: nothing can happen until a top-up): it is
    true when the month's attempts (the local provider's count) used the quota up."""
    if c["defer_reason"] != "quota_exhausted" or c["deferred_until"] is not None:
        return False
    attempts = sum(1 for row in o.send_log if not row.get("is_test"))
    return attempts >= o.plan.limits.monthly_quota


def _untrue_wait(o: Outcome, c: dict[str, Any]) -> str:
    """Why a campaign's wait at the end is not the one its reason gives ('' if it is).

    Every process runs open all day (00:00-24:00), only one owner has a daily limit, the
    quota is synced hourly: each reason has a latest end it may name."""
    end = o.finished_at
    reason, until = c["defer_reason"], c["deferred_until"]
    if until is None:
        # A quota wait with no time: _waits_for_a_top_up has judged it (the month's
        # attempts used the quota up); there is no time to compare.
        return ""
    slack = timedelta(minutes=1)
    if reason == "outside_hours":
        return "outside_hours while the hours are 00:00-24:00"
    if reason == "daily_limit":
        if c["owner_id"] != o.plan.limits.daily_limited_owner:
            return f"daily_limit for {c['owner_id']}, who has no daily limit"
        local = end.astimezone(DAY_ZONE)
        midnight = datetime.combine(local.date() + timedelta(days=1), time(), DAY_ZONE)
        latest = _daily_turn(o, c, midnight)
    elif reason == "rate_per_hour":
        latest = end.replace(minute=0, second=0, microsecond=0) + timedelta(hours=1)
        if c["owner_id"] == o.plan.limits.daily_limited_owner:
            # The reason is the limit refusing now; the time is when every limit
            # allows (mailer/nextsend.py's docstring): the hour may
            # reopen on a day the owner's campaigns ahead have used up, and then
            # the wait runs to that owner's turn on a later day (seed 4098).
            local = end.astimezone(DAY_ZONE)
            midnight = datetime.combine(local.date() + timedelta(days=1), time(), DAY_ZONE)
            latest = max(latest, _daily_turn(o, c, midnight))
    else:  # quota_exhausted: a sync restores it; the governor's safety net is 2 intervals
        latest = end + timedelta(seconds=2 * QUOTA_SYNC_SECONDS)
    if until > latest + slack:
        return f"{reason} until {until}, later than {latest}"
    return ""


def _queue_key(c: dict[str, Any]) -> tuple[int, datetime, int]:
    # The queue's order (README: priority first, then first come first served).
    return (-c["priority"], c["queued_at"], c["queue_id"])


def _daily_turn(o: Outcome, c: dict[str, Any], midnight: datetime) -> datetime:
    """The latest true end of a ``daily_limit`` wait: the queue-aware retry time.

    The owner's day is used up; from the next midnight their campaigns ahead in the
    queue take each reopened day first (the governor names the campaign's own turn, not
    the day's opening). So the wait ends on the day the owner's limit has covered every
    recipient still to send of their campaigns queued ahead of it, and within that day
    once the hour has served the campaigns ahead of it (others' included).

    What is still to send is read at the end of the round, the wait was decided earlier:
    only sends counted in no day can have shrunk it since (the owner's day was used up),
    i.e. what the owner was granted while Redis failed open (seed 5030). Those count as
    still to send, which gives the latest the wait may have been decided for."""
    lim = o.plan.limits
    left = Counter(r["campaign_id"] for r in o.recipients if r["status"] in ("pending", "sending"))
    queued = [
        q for q in o.campaigns if q["status"] in ("ready", "sending") and q["completed_at"] is None
    ]
    ahead = [q for q in queued if _queue_key(q) < _queue_key(c)]
    mine = sum(left[q["id"]] for q in ahead if q["owner_id"] == c["owner_id"])
    if any(q["owner_id"] == c["owner_id"] for q in ahead):
        mine += sum(n for _, n, owner in o.fail_open_grants if owner == c["owner_id"])
    days = mine // lim.daily_limit
    hours = -(-sum(left[q["id"]] for q in ahead) // lim.rate_per_hour)
    return midnight + timedelta(days=days, hours=hours)


def _in_doubt_bounded(o: Outcome) -> list[Violation]:
    """In doubt only for sends in flight when their owner could not record them (README
    "Failure policies"): at most two waves of a process's SMTP connections per kill -9 and
    campaign it was sending (the pipelined loop hands the next wave while one is sent,
    each campaign its own; MAX_ACTIVE at once; a SIGTERM drains: none),
    one wave per crash of a campaign actor or the sender, per process for a black-holed
    provider (sends that got no answer), and per PostgreSQL restart two waves of every
    campaign sending then (MAX_ACTIVE at once): an actor whose query fails crashes, its
    teardown cannot write either, so its handed, unrecorded waves are settled in doubt by
    the next owner, as after a kill -9 ("whatever could not be recorded is in_doubt")."""
    kills = sum(1 for a in o.applied if a.fault.kind == "kill9" and a.resolved)
    crashes = sum(
        1
        for a in o.applied
        if a.fault.kind == "actor_crash"
        and a.resolved
        and a.resolved.split("/")[1] not in ("None", "")
        and (a.fault.actor in ("campaign", "smtp-sender"))
    )
    holes = sum(1 for a in o.applied if a.fault.kind == "smtp_blackhole")
    pg = sum(1 for a in o.applied if a.fault.kind == "pg_restart" and a.resolved)
    waves = 2 * kills * MAX_ACTIVE + crashes + holes * o.plan.processes + 2 * pg * MAX_ACTIVE
    bound = SMTP_CONNECTIONS * waves
    doubt = [r["email"] for r in o.recipients if r["status"] == "in_doubt"]
    if len(doubt) > bound:
        return [
            Violation(
                "in_doubt_bound",
                f"{len(doubt)} in doubt > {bound} (= {SMTP_CONNECTIONS} connections x "
                f"(2 x {kills} kill -9 x {MAX_ACTIVE} campaigns + {crashes} crashes + "
                f"{holes} black holes x "
                f"{o.plan.processes} processes + 2 x {pg} PostgreSQL restarts x "
                f"{MAX_ACTIVE} campaigns)): {doubt[:10]}",
            )
        ]
    return []


# The Redis outage model (README "Failure policies": Redis down / back empty).
# While Redis is down the limiter FAILS OPEN: what it grants then is counted nowhere. A
# grant is used at once (the batch was claimed before asking): its waves are handed to
# SMTP one after another, each done within the SMTP timeout, so a fail-open grant is
# delivered at most this long after the outage ends.
FAIL_OPEN_MARGIN = -(-BATCH_SIZE // SMTP_CONNECTIONS) * (SMTP_TIMEOUT + 1.0)
# Back empty, a counter is rebuilt from the send log at the first request; the log misses
# the batches in flight then (documented): at most one batch per campaign sending.
REBUILD_IN_FLIGHT = MAX_ACTIVE * BATCH_SIZE


def fail_open_spans(o: Outcome) -> list[tuple[float, float]]:
    """Wall-clock spans whose deliveries may have been granted while Redis was down."""
    end = o.finished_at.timestamp()
    return [
        (a.down_from, (a.down_until or end) + FAIL_OPEN_MARGIN)
        for a in o.applied
        if a.fault.kind == "redis_outage" and a.resolved and a.down_from
    ]


def _fail_open(at: float, spans: list[tuple[float, float]]) -> bool:
    return any(lo <= at <= hi for lo, hi in spans)


def fail_open_messages(o: Outcome) -> int:
    """Deliveries that may have gone out on a fail-open grant: those within the outages'
    spans, and no more than the processes logged granting so."""
    spans = fail_open_spans(o)
    within = sum(1 for _, at, _ in o.deliveries if _fail_open(at, spans))
    return min(within, sum(n for _, n, _ in o.fail_open_grants))


def _window_excess(
    times: list[float], limit: int, spans: list[tuple[float, float]], fail_open_tokens: int
) -> str | None:
    """Why one window's deliveries (wall times) broke its limit, None if they did not.

    Without an outage: at most ``limit``. With one, by policy: (1) what was granted
    while Redis was reachable stays within the limit — the deliveries outside the
    fail-open spans, and no more of those inside than the window's fail-open grants
    (``fail_open_tokens``, from the processes' logs), are counted; (2) after the last
    span, the counter rebuilt from the send log holds everything sent before it, so
    later deliveries only fill what is left of the limit (less the batches in flight at
    the rebuild, which the log missed)."""
    total = len(times)
    if total <= limit:
        return None
    if not spans:
        return f"{total} > {limit}"
    fail_open = min(sum(1 for t in times if _fail_open(t, spans)), fail_open_tokens)
    if total - fail_open > limit:
        return f"{total} - {fail_open} fail-open > {limit}"
    last = max(hi for _, hi in spans)
    after = sum(1 for t in times if t > last)
    room = max(0, limit - (total - after)) + REBUILD_IN_FLIGHT
    if after > room:
        return (
            f"{total}: {after} after Redis was back and rebuilt > the {room} left "
            f"(limit {limit}, {REBUILD_IN_FLIGHT} in flight at the rebuild)"
        )
    return None


def _hour(at: float) -> str:
    return datetime.fromtimestamp(at, UTC).strftime("%Y-%m-%d %H:00Z")


def _day(at: float) -> str:
    return datetime.fromtimestamp(at, DAY_ZONE).date().isoformat()


def _limits(o: Outcome) -> list[Violation]:
    v: list[Violation] = []
    lim = o.plan.limits
    spans = fail_open_spans(o)
    campaign_of = _campaign_of(o)
    # A grant is used in the window it was granted for (README: grants expire at its end).
    open_hour: Counter[str] = Counter()
    open_day: Counter[tuple[str, str]] = Counter()
    for at, n, granted_to in o.fail_open_grants:
        open_hour[_hour(at)] += n
        open_day[(granted_to, _day(at))] += n
    per_hour: dict[str, list[float]] = defaultdict(list)
    for _, at, _ in o.deliveries:
        per_hour[_hour(at)].append(at)
    for hour, times in sorted(per_hour.items()):
        if why := _window_excess(times, lim.rate_per_hour, spans, open_hour[hour]):
            v.append(Violation("hourly_limit", f"{hour}: {why} messages"))
    per_day: dict[tuple[str, str], list[float]] = defaultdict(list)
    for a, at, _ in o.deliveries:
        cid = campaign_of.get(a.lower())
        owner = o.owners.get(cid) if cid is not None else None
        if owner is not None:
            per_day[(owner, _day(at))].append(at)
    for (owner, day), times in sorted(per_day.items()):
        if owner == lim.daily_limited_owner and (
            why := _window_excess(times, lim.daily_limit, spans, open_day[(owner, day)])
        ):
            v.append(Violation("daily_limit", f"{owner} on {day}: {why} messages"))
    # The quota is PostgreSQL's: it holds whatever Redis does.
    if len(o.deliveries) > lim.monthly_quota:
        v.append(Violation("quota", f"{len(o.deliveries)} messages > quota {lim.monthly_quota}"))
    return v


def _honest_status(o: Outcome) -> list[Violation]:
    v: list[Violation] = []
    by_campaign: dict[int, Counter[str]] = defaultdict(Counter)
    for r in o.recipients:
        by_campaign[r["campaign_id"]][r["status"]] += 1
    for c in o.campaigns:
        counts = by_campaign[c["id"]]
        bad = counts["failed"] + counts["in_doubt"]
        open_ = counts["pending"] + counts["sending"]
        if c["status"] == "sent" and (bad or open_):
            v.append(
                Violation("dishonest_status", f"campaign {c['id']} 'sent' with {dict(counts)}")
            )
        if c["status"] == "completed_with_errors" and (not bad or open_):
            v.append(
                Violation(
                    "dishonest_status",
                    f"campaign {c['id']} 'completed_with_errors' with {dict(counts)}",
                )
            )
        if c["status"] in ("sent", "completed_with_errors") and c["completed_at"] is None:
            v.append(
                Violation("dishonest_status", f"campaign {c['id']} final, queue not completed")
            )
    return v


def _send_log_agrees(o: Outcome) -> list[Violation]:
    v: list[Violation] = []
    rows: dict[int, list[str]] = defaultdict(list)
    for s in o.send_log:
        if not s["is_test"] and s["recipient_id"] is not None:
            rows[s["recipient_id"]].append(s["status"])
    for r in o.recipients:
        log = rows.get(r["id"], [])
        sent = log.count("sent")
        if sent > 1:
            v.append(Violation("send_log_duplicate", f"{r['email']}: {sent} 'sent' rows"))
        if r["status"] == "sent" and sent != 1:
            v.append(Violation("send_log_mismatch", f"{r['email']} sent, log {log}"))
        if r["status"] != "sent" and sent:
            v.append(Violation("send_log_mismatch", f"{r['email']} {r['status']}, log {log}"))
        if r["status"] == "failed" and "failed" not in log and "transient" not in log:
            v.append(Violation("send_log_mismatch", f"{r['email']} failed, log {log}"))
        if r["status"] == "in_doubt" and "in_doubt" not in log:
            v.append(Violation("send_log_mismatch", f"{r['email']} in doubt, log {log}"))
    return v


def _events(o: Outcome) -> list[Violation]:
    v: list[Violation] = []
    status = {c["id"]: c for c in o.campaigns}
    campaign_events: dict[int, Counter[str]] = defaultdict(Counter)
    notices: Counter[tuple[Any, ...]] = Counter()
    noticed: dict[int, set[str]] = defaultdict(set)
    for subject, e in o.events:
        if ".events.campaign." in subject:
            campaign_events[e["campaign_id"]][e["event"]] += 1
        elif ".events.notify." in subject:
            # One notice per episode: its dedup id's fields (a pause has no end: its time).
            until = e.get("deferred_until") or e.get("at")
            key = (e["campaign_id"], e["kind"], e["reason_code"], until)
            notices[key] += 1
            noticed[e["campaign_id"]].add(e["reason_code"])
    for cid, c in status.items():
        seen = campaign_events[cid]
        if seen["queued"] != 1:
            v.append(Violation("events", f"campaign {cid}: {seen['queued']} 'queued' events"))
        finals = {e: seen[e] for e in FINAL_EVENTS if seen[e]}
        if c["status"] in FINAL_EVENTS:
            if finals != {c["status"]: 1}:
                v.append(
                    Violation("events", f"campaign {cid} {c['status']}: final events {finals}")
                )
        elif finals:
            v.append(Violation("events", f"campaign {cid} {c['status']}: final events {finals}"))
        if c["notified_reason"] and c["notified_reason"] not in noticed[cid]:
            v.append(
                Violation(
                    "notice_lost",
                    f"campaign {cid}: notified_reason {c['notified_reason']} never published",
                )
            )
    for key, n in notices.items():
        if n > 1:
            v.append(Violation("notice_duplicate", f"{key} published {n} times"))
    if o.outbox_left:
        v.append(Violation("events", f"{o.outbox_left} rows left in event_outbox"))
    return v
