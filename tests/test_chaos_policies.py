"""The chaos checks' models of documented policies, on made-up rounds (no stack).

A relaxed invariant must still catch what the policy does not allow: each model is tried
with a case it must pass and one it must fail.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as redis

from mailer.logs import LineFormatter
from mailer.ratelimit import SendLimiter
from tests.chaos.checks import (
    DAY_ZONE,
    FAIL_OPEN_MARGIN,
    REBUILD_IN_FLIGHT,
    _daily_turn,
    _window_excess,
)
from tests.chaos.driver import Outcome, fail_open_grants
from tests.chaos.schedule import CampaignPlan, Limits, RoundPlan

T0 = 1_800_000_000.0


def test_no_outage_holds_the_limit() -> None:
    assert _window_excess([T0 + i for i in range(10)], 10, [], 0) is None
    assert _window_excess([T0 + i for i in range(11)], 10, [], 0) is not None


def test_fail_open_deliveries_are_not_counted_against_the_limit() -> None:
    spans = [(T0 + 100, T0 + 140 + FAIL_OPEN_MARGIN)]
    before = [T0 + i for i in range(6)]
    during = [T0 + 100 + i for i in range(30)]  # Redis down: granted without counting
    assert _window_excess(before + during, 10, spans, 30) is None
    # The logs say only 20 were granted so: the other 10 were counted, 16 > 10.
    assert _window_excess(before + during, 10, spans, 20) is not None


def test_counted_grants_beyond_the_limit_are_an_excess() -> None:
    spans = [(T0 + 100, T0 + 140 + FAIL_OPEN_MARGIN)]
    before = [T0 + i for i in range(11)]  # granted while Redis counted them
    during = [T0 + 100 + i for i in range(5)]
    assert _window_excess(before + during, 10, spans, 5) is not None


def test_after_the_rebuild_only_what_is_left_of_the_limit() -> None:
    end = T0 + 140 + FAIL_OPEN_MARGIN
    spans = [(T0 + 100, end)]
    sent = [T0 + 100 + i for i in range(12)]  # the outage used the window up
    late_ok = [end + 1 + i for i in range(REBUILD_IN_FLIGHT)]  # the log missed in-flight
    assert _window_excess(sent + late_ok, 10, spans, 12) is None
    # A counter lost and not rebuilt would hand the window out again.
    late_bad = [end + 1 + i for i in range(REBUILD_IN_FLIGHT + 1)]
    assert _window_excess(sent + late_bad, 10, spans, 12) is not None


def _outcome(campaigns: list[dict[str, Any]], recipients: list[dict[str, Any]]) -> Outcome:
    now = datetime(2026, 12, 2, 1, 0, tzinfo=UTC)
    plan = RoundPlan(
        seed=0,
        window=20,
        processes=3,
        limits=Limits(
            rate_per_hour=90, monthly_quota=10_000, daily_limited_owner="a", daily_limit=8
        ),
        campaigns=(CampaignPlan(0, "a", 1, 0, 0, 0, 0, 0),),
    )
    return Outcome.empty(plan, now, recipients=recipients, campaigns=campaigns)


def test_a_daily_wait_ends_on_its_own_turn_in_the_owners_queue() -> None:
    queued = datetime(2026, 12, 2, 0, 50, tzinfo=UTC)

    def campaign(cid: int, priority: int, owner: str = "a") -> dict[str, Any]:
        return {
            "id": cid,
            "owner_id": owner,
            "status": "sending",
            "completed_at": None,
            "priority": priority,
            "queued_at": queued + timedelta(seconds=cid),
            "queue_id": cid,
        }

    ahead, behind = campaign(1, 5), campaign(2, 0)
    recipients = [{"campaign_id": 1, "status": "pending"}] * 19
    recipients += [{"campaign_id": 2, "status": "pending"}] * 25
    o = _outcome([ahead, behind], recipients)
    midnight = datetime(2026, 12, 3, tzinfo=DAY_ZONE)
    # 19 ahead at 8 a day take two whole days and 3 of the third: its turn is then.
    turn = _daily_turn(o, behind, midnight)
    assert midnight + timedelta(days=2) <= turn <= midnight + timedelta(days=2, hours=1)
    # The one ahead waits for no one of its owner.
    assert _daily_turn(o, ahead, midnight) == midnight

    # The owner's campaign ahead sent 6 more on fail-open grants after the wait was
    # decided (its day was used up): the wait may have been decided for 25 ahead (seed
    # 5030). Grants of another owner change nothing; nor does any for the one ahead.
    o.fail_open_grants = [(T0, 4, "a"), (T0 + 1, 2, "a"), (T0 + 2, 50, "b")]
    turn = _daily_turn(o, behind, midnight)
    assert midnight + timedelta(days=3) <= turn <= midnight + timedelta(days=3, hours=1)
    assert _daily_turn(o, ahead, midnight) == midnight


async def test_fail_open_grants_are_read_from_the_process_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The limiter's ERROR line names whose sends went uncounted; the driver reads it."""
    client = redis.Redis(host="127.0.0.1", port=1, socket_connect_timeout=0.5)
    limiter = SendLimiter(client, key_prefix="t:", account="a", hourly_limit=10)
    now = datetime.now(UTC)
    with caplog.at_level(logging.ERROR, logger="mailer.ratelimit"):
        r = await limiter.reserve(4, now, owner_id="owner-b", day=now.date(), daily_limit=8)
    await client.aclose()
    assert r.failed_open and r.granted == 4
    lines = [LineFormatter().format(rec) for rec in caplog.records]
    (tmp_path / "p0-g0.log").write_text("\n".join(["noise", *lines, "more noise"]) + "\n")
    ((at, tokens, owner),) = fail_open_grants(tmp_path)
    assert (tokens, owner) == (4, "owner-b") and 0 <= at - int(now.timestamp()) < 30


def test_a_kill_may_leave_two_waves_in_doubt_for_each_campaign_it_was_sending() -> None:
    # Seed 4026 of the long run: a kill -9 of a process sending two campaigns left 4 + 1
    # in doubt; the bound counted two waves for the process, not for each campaign.
    from tests.chaos.checks import _in_doubt_bounded
    from tests.chaos.driver import MAX_ACTIVE, SMTP_CONNECTIONS, Applied
    from tests.chaos.schedule import Fault

    bound = 2 * SMTP_CONNECTIONS * MAX_ACTIVE

    def round_with(doubt: int) -> Outcome:
        o = _outcome(
            [], [{"id": i, "email": f"u-{i}@x", "status": "in_doubt"} for i in range(doubt)]
        )
        o.applied = [Applied(Fault(3.0, "kill9", "p1", 2.0), "p1-g0", at=0.0)]
        return o

    assert _in_doubt_bounded(round_with(bound)) == []
    (too_many,) = _in_doubt_bounded(round_with(bound + 1))
    assert too_many.invariant == "in_doubt_bound"
    assert _in_doubt_bounded(_outcome([], [{"id": 1, "email": "a@x", "status": "in_doubt"}])) != []
