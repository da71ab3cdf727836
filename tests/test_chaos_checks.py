"""The chaos suite's own logic, without processes: when a round is settled, how a quota
wait is judged, which failovers an election fault overlapped."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.chaos.checks import check
from tests.chaos.driver import LEADER_TTL, Applied, Outcome, Round, waits_long
from tests.chaos.schedule import CampaignPlan, Fault, Limits, RoundPlan

NOW = datetime(2026, 12, 2, 1, 0, tzinfo=UTC)
HORIZON = NOW + timedelta(seconds=60)


def test_a_quota_wait_without_a_time_is_settled() -> None:
    # Since issue 8 a quota wait names no time; the settle loop waited for one and
    # every quota-bound round ran out its settle budget ("did not settle in time").
    assert waits_long("sending", "quota_exhausted", None, 0, HORIZON)
    assert waits_long("ready", "quota_exhausted", None, 0, HORIZON)
    assert not waits_long("sending", "quota_exhausted", None, 1, HORIZON), "a send in flight"
    assert not waits_long("paused", "quota_exhausted", None, 0, HORIZON)
    assert not waits_long("sending", "rate_per_hour", None, 0, HORIZON), "no time: not a wait"
    later = HORIZON + timedelta(minutes=5)
    assert waits_long("sending", "rate_per_hour", later, 0, HORIZON)
    assert not waits_long("sending", "rate_per_hour", NOW + timedelta(seconds=30), 0, HORIZON)
    assert not waits_long("sending", "transient_error", later, 0, HORIZON), "ends soon"


def _outcome(*, attempts: int, quota: int) -> Outcome:
    plan = RoundPlan(
        seed=1,
        window=20.0,
        processes=3,
        limits=Limits(10_000, quota, "nobody", 0),
        campaigns=(CampaignPlan(0, "owner-a", attempts + 1, 0, 0, 0, 0, 0),),
    )
    emails = [f"u-{j}@c0.chaos.test" for j in range(attempts + 1)]
    recipients: list[dict[str, Any]] = [
        {"id": j + 1, "campaign_id": 1, "email": e, "status": "sent", "error": None}
        for j, e in enumerate(emails)
    ]
    recipients[-1]["status"] = "pending"
    return Outcome.empty(
        plan,
        NOW,
        campaign_ids={0: 1},
        owners={1: "owner-a"},
        recipients=recipients,
        campaigns=[
            {
                "id": 1,
                "owner_id": "owner-a",
                "status": "sending",
                "defer_reason": "quota_exhausted",
                "deferred_until": None,
                "completed_at": None,
                "notified_reason": "quota_exhausted",
            }
        ],
        send_log=[
            {
                "id": j + 1,
                "campaign_id": 1,
                "recipient_id": j + 1,
                "email": e,
                "status": "sent",
                "is_test": False,
            }
            for j, e in enumerate(emails[:-1])
        ],
        deliveries=[(e, 0.0, "p0") for e in emails[:-1]],
        settle_seconds=1.0,
        finished_at=NOW + timedelta(minutes=2),
    )


def _stuck(o: Outcome) -> list[str]:
    return [str(v) for v in check(o) if v.invariant in ("stuck_campaign", "untrue_wait")]


def test_a_quota_wait_is_true_when_the_months_attempts_used_the_quota_up() -> None:
    # It used to raise TypeError (None > datetime) in the untrue-wait check.
    assert _stuck(_outcome(attempts=5, quota=5)) == []
    (stuck,) = _stuck(_outcome(attempts=4, quota=5))
    assert stuck.startswith("stuck_campaign: campaign 1 sending reason=quota_exhausted"), stuck


def test_failovers_overlapped_by_a_nats_or_postgres_restart_are_told_apart() -> None:
    plan = RoundPlan(seed=1, window=20.0, processes=3, limits=Limits(1, 1, "x", 0), campaigns=())
    rnd = Round(None, plan, tag="t", logs=Path("."))  # type: ignore[arg-type]
    t0 = 100.0
    cluster = Applied(Fault(1.0, "nats_cluster", "", 2.0), "nats", at=t0 - 5.0, ended=t0 - 2.5)
    rnd.applied = [cluster, Applied(Fault(2.0, "smtp_421", "", 2.0), "smtp", at=t0)]
    # The cluster was back 2.5 s before the kill: within a TTL of it, so it counts.
    assert rnd._election_faults(t0, 3.5) == ("nats_cluster",)
    cluster.ended = t0 - 2 * LEADER_TTL - 0.1  # long back before the failover's window
    assert rnd._election_faults(t0, 3.5) == ()
    late = Applied(Fault(9.0, "pg_restart", "", 1.0), "postgres", at=t0 + 3.0, ended=t0 + 4.0)
    rnd.applied.append(late)
    assert rnd._election_faults(t0, 3.5) == ("pg_restart",), "restarted during the election"
    assert rnd._election_faults(t0, 2.5) == (), "the new leader was in before it"
