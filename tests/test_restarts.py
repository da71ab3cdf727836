"""Actors crashed mid-work through the runtime's fault hook: the service goes on.

Policy under test (README, "Failure policies"): a long-lived actor that crashes is
restarted with backoff and rebuilds what it needs from the source of truth or from
its owner (a restarted scheduler asks whether this process leads; a restarted
leader resigned in its teardown and elects again); a campaign actor has its own
restart limit, past which that campaign alone is given up and dispatched again
later, while the long-lived actors share the process's limit (exceeded: the
process gives up).
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from mailer import metrics
from mailer.actors import RestartPolicy, SupervisorEscalation
from mailer.actors.campaign import Continue
from mailer.actors.leader import TryLead
from mailer.actors.scheduler import WakeUp
from mailer.actors.sender import SendBatch
from mailer.messages import RunCampaign, TokenRequest
from mailer.quota import SyncNow
from mailer.service import Service
from tests.helpers import Crm, Events, people

pytestmark = pytest.mark.timeout(90)


class Injected(RuntimeError):
    """The crash the test injects."""


class CrashOnce:
    """An ActorFault that crashes ``actor`` on its first message of type ``on``."""

    def __init__(self, actor: str, on: type[Any] | None) -> None:
        self.actor = actor
        self.on = on
        self.crashed = asyncio.Event()

    async def __call__(self, name: str, message: object) -> None:
        if self.crashed.is_set() or name != self.actor:
            return
        if self.on is None or isinstance(message, self.on):
            self.crashed.set()
            raise Injected(f"injected crash of {name}")


async def _restarted(service: Service, name: str, timeout: float = 15.0) -> None:
    """Waits for the supervisor to have a started incarnation of ``name`` again (its
    on_start done: alive alone would let a request race the api's re-subscription)."""
    async with asyncio.timeout(timeout):
        while True:
            ref = service.supervisor.get(name)
            if ref is not None and ref.running:
                return
            await asyncio.sleep(0.02)


async def _send_one_campaign(crm: Crm, events: Events, domain: str) -> int:
    cid = await crm.campaign(people(12, domain))
    await crm.start(cid)
    return cid


# actor -> (the message type whose handling crashes, how the test makes it come)
Trigger = Callable[[Service, Crm, Events], Awaitable[int | None]]


async def _by_a_campaign(service: Service, crm: Crm, events: Events) -> int | None:
    return await _send_one_campaign(crm, events, "before.example")


async def _by_a_try_lead(service: Service, crm: Crm, events: Events) -> int | None:
    ref = service.supervisor.get("leader")
    assert ref is not None
    ref.tell(TryLead())  # the leader gets it while leading: mid-term
    return None


async def _by_a_message(service: Service, crm: Crm, events: Events) -> int | None:
    ref = service.supervisor.get("api")
    assert ref is not None
    ref.tell(None)
    return None


async def _by_a_sync_request(service: Service, crm: Crm, events: Events) -> int | None:
    failed = await crm.fails("internal.quota.sync", {})  # the sync in the crash
    assert failed.status == 503
    return None


CASES: dict[str, tuple[type[Any], Trigger]] = {
    "scheduler": (WakeUp, _by_a_campaign),
    "leader": (TryLead, _by_a_try_lead),
    "rate-governor": (TokenRequest, _by_a_campaign),
    "smtp-sender": (SendBatch, _by_a_campaign),
    "runner": (RunCampaign, _by_a_campaign),
    "api": (type(None), _by_a_message),
    "quota-sync": (SyncNow, _by_a_sync_request),
}


@pytest.mark.parametrize("actor", list(CASES))
async def test_a_long_lived_actor_crashed_mid_work_is_restarted_and_every_duty_goes_on(
    actor: str, make_service, crm: Crm, events: Events, sink, db
) -> None:
    on, trigger = CASES[actor]
    crash = CrashOnce(actor, on)
    service = await make_service(actor_fault=crash, batch_size=5)
    async with asyncio.timeout(15):
        await service.leadership.wait()
    first_epoch = service.leader_epoch

    before = await trigger(service, crm, events)
    async with asyncio.timeout(15):
        await crash.crashed.wait()
    await _restarted(service, actor)

    # Leadership is acted upon: this process leads (a restarted leader took a
    # new epoch), the fence in PostgreSQL is its epoch, and the metric says so.
    async with asyncio.timeout(15):
        await service.leadership.wait()
    assert service.leader_epoch is not None and first_epoch is not None
    assert service.leader_epoch >= first_epoch
    assert await db.fetchval("SELECT epoch FROM leader_fence") == service.leader_epoch
    assert metrics.LEADER._value.get() == 1

    # A campaign started after the crash is sent to the end (and the one the
    # crash landed on, if any, too): the scheduler dispatches, the runner
    # starts, the governor grants, the sender sends. The api answered the start.
    after = await _send_one_campaign(crm, events, "after.example")
    done = await events.wait(after, ("sent", "completed_with_errors"), timeout=30)
    assert done["event"] == "sent", done
    assert (await crm.get(after))["counts"] == {"sent": 12}
    if before is not None:
        # Settled too; a batch the crash caught in the sender's hands is visibly
        # in doubt (nobody can know whether the provider took it), never re-sent.
        await events.wait(before, ("sent", "completed_with_errors"), timeout=30)
        counts = (await crm.get(before))["counts"]
        assert set(counts) <= {"sent", "in_doubt"} and sum(counts.values()) == 12, counts
        assert counts.get("in_doubt", 0) <= 5 if actor == "smtp-sender" else counts == {"sent": 12}
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert max(received.values()) == 1, "nobody twice"

    # A quota sync works.
    state = await crm.call("internal.quota.sync", {})
    assert state["last_synced_at"] is not None and state["sync_error"] is None


class CrashCampaigns:
    """Crashes every campaign actor on its first ``times`` batches."""

    def __init__(self, times: int) -> None:
        self.times = times
        self.crashes: Counter[str] = Counter()

    async def __call__(self, name: str, message: object) -> None:
        crashing = name.startswith("campaign-") and isinstance(message, Continue)
        if crashing and self.crashes[name] < self.times:
            self.crashes[name] += 1
            raise Injected(f"injected crash of {name}")


async def test_campaign_actors_crashing_together_give_up_alone_and_never_exit_the_process(
    make_service, crm: Crm, events: Events, sink, caplog
) -> None:
    # Four campaigns crash on each of their first seven batches (a dependency
    # blip): 4 x 5 restarts is far past the process's shared limit of 3, but
    # each campaign's restarts count against its own limit of 5 in 60 s.
    crash = CrashCampaigns(times=7)
    service = await make_service(
        actor_fault=crash,
        restart_policy=RestartPolicy(
            max_restarts=3, window_seconds=60.0, backoff_base=0.01, backoff_max=0.05
        ),
        max_active_campaigns=4,
        campaign_lease_seconds=2.0,
        start_throttle_per_hour=100,
    )
    async with asyncio.timeout(15):
        await service.leadership.wait()
    campaigns = [await crm.campaign(people(6, f"c{i}.example")) for i in range(4)]
    for cid in campaigns:
        await crm.start(cid)

    # Each is given up after its own limit, dispatched again a lease period
    # later, and sent to the end once the blip is over.
    for cid in campaigns:
        done = await events.wait(cid, ("sent", "completed_with_errors"), timeout=60)
        assert done["event"] == "sent", done
    assert not service.supervisor.escalated and not service.supervisor.closing
    assert all(n == 7 for n in crash.crashes.values()) and len(crash.crashes) == 4
    given_up = [
        r for r in caplog.records if r.getMessage() == "child restart limit exceeded; giving it up"
    ]
    assert {r.actor for r in given_up} == {f"campaign-{c}" for c in campaigns}  # type: ignore[attr-defined]
    received = Counter(r for m in sink.messages for r in m.rcpt_tos)
    assert len(received) == 24 and max(received.values()) == 1


class CrashAlways:
    def __init__(self, actor: str) -> None:
        self.actor = actor

    async def __call__(self, name: str, message: object) -> None:
        if name == self.actor:
            raise Injected(f"injected crash of {name}")


async def test_a_long_lived_actor_crashing_again_and_again_exceeds_the_process_limit(
    make_service,
) -> None:
    service = await make_service(
        actor_fault=CrashAlways("scheduler"),
        restart_policy=RestartPolicy(
            max_restarts=3, window_seconds=60.0, backoff_base=0.01, backoff_max=0.05
        ),
    )
    # Every Leadership the scheduler is told (and asks for after each restart)
    # crashes it: the shared limit is exceeded and the supervisor gives up.
    with pytest.raises(SupervisorEscalation):
        async with asyncio.timeout(30):
            await service.wait()
