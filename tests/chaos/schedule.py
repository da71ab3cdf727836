"""A seeded fault schedule: kinds, targets and times decided up front.

The same seed gives the same schedule (and the same campaigns and limits), so a failing
round is replayed with ``--seed``. Targets that only exist at run time ("the leader") are
named symbolically and resolved when the fault fires.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

PROCESS_FAULTS = ("kill9", "sigterm", "actor_crash")
SERVER_FAULTS = ("pg_restart", "nats_node", "nats_cluster", "redis_outage")
SMTP_FAULTS = ("smtp_421", "smtp_blackhole", "smtp_slow")
KINDS = PROCESS_FAULTS + SERVER_FAULTS + SMTP_FAULTS

# Actors a crash may hit: every long-lived child, and a campaign actor.
ACTORS = (
    "scheduler",
    "leader",
    "rate-governor",
    "smtp-sender",
    "runner",
    "api",
    "quota-sync",
    "campaign",
)

OWNERS = ("owner-a", "owner-b", "owner-c")


@dataclass(frozen=True)
class Fault:
    at: float  # seconds after the fault window opens
    kind: str
    target: str  # "leader", "p<i>", "nats-<i>", "" (the server/sink named by kind)
    duration: float  # down time / outage length / delay before the restart
    actor: str = ""  # actor_crash only

    def describe(self) -> str:
        what = self.target or "-"
        if self.actor:
            what += f"/{self.actor}"
        return f"t+{self.at:5.1f}s {self.kind:<15} {what:<16} for {self.duration:.1f}s"


@dataclass(frozen=True)
class CampaignPlan:
    key: int
    owner: str
    normal: int  # recipients the sink accepts
    reject: int  # refused 550 at RCPT
    temp_then_ok: int  # 451 twice, then accepted
    temp_forever: int  # 451 every time
    attachment_bytes: int  # 0: none
    priority: int


@dataclass(frozen=True)
class Limits:
    rate_per_hour: int
    monthly_quota: int
    daily_limited_owner: str
    daily_limit: int


@dataclass(frozen=True)
class RoundPlan:
    seed: int
    window: float
    processes: int
    limits: Limits
    campaigns: tuple[CampaignPlan, ...]
    faults: tuple[Fault, ...] = field(default=())

    def describe(self) -> str:
        lines = [
            f"seed={self.seed} window={self.window:.0f}s processes={self.processes} "
            f"rate/h={self.limits.rate_per_hour} quota={self.limits.monthly_quota} "
            f"daily {self.limits.daily_limited_owner}={self.limits.daily_limit}",
        ]
        for c in self.campaigns:
            lines.append(
                f"  campaign {c.key}: {c.owner} ok={c.normal} reject={c.reject} "
                f"temp2={c.temp_then_ok} temp={c.temp_forever} "
                f"attachment={c.attachment_bytes}B priority={c.priority}"
            )
        lines.append(f"  faults ({len(self.faults)}):")
        lines += [f"    {f.describe()}" for f in self.faults]
        return "\n".join(lines)


def plan_round(
    seed: int,
    *,
    window: float = 20.0,
    processes: int = 3,
    faults: int = 5,
    redis_down: tuple[float, float] = (3.0, 6.0),
    kinds: tuple[str, ...] = KINDS,
) -> RoundPlan:
    """Everything a round does, from ``seed`` alone."""
    rng = random.Random(seed)
    if rng.random() < 0.5:  # the hour bites, or the quota does
        limits = Limits(
            rate_per_hour=rng.choice((60, 90)),
            monthly_quota=10_000,
            daily_limited_owner=rng.choice(OWNERS),
            daily_limit=rng.choice((8, 15)),
        )
    else:
        limits = Limits(
            rate_per_hour=10_000,
            monthly_quota=rng.choice((90, 120)),
            daily_limited_owner=rng.choice(OWNERS),
            daily_limit=rng.choice((8, 15)),
        )
    campaigns = []
    for key in range(rng.randint(4, 6)):
        campaigns.append(
            CampaignPlan(
                key=key,
                owner=OWNERS[key % len(OWNERS)],
                normal=rng.randint(10, 25),
                reject=rng.choice((0, 0, 1, 2)),
                temp_then_ok=rng.choice((0, 0, 1)),
                temp_forever=rng.choice((0, 0, 0, 1)),
                attachment_bytes=rng.choice((0, 0, 2048, 40_000)),
                priority=rng.choice((0, 0, 5)),
            )
        )
    schedule: list[Fault] = []
    busy: dict[str, float] = {}  # a server or the sink is faulted once at a time
    for _ in range(faults):
        kind = rng.choice(kinds)
        at = round(rng.uniform(1.0, window - 3.0), 1)
        target, actor = "", ""
        if kind in PROCESS_FAULTS:
            target = rng.choice(("leader", *(f"p{i}" for i in range(processes))))
            if kind == "actor_crash":
                actor = rng.choice(ACTORS)
                duration = 0.0
            else:
                duration = round(rng.uniform(0.5, 3.0), 1)  # until the restart
        elif kind == "nats_node":
            target = f"nats-{rng.randrange(3)}"
            duration = round(rng.uniform(1.0, 4.0), 1)
        elif kind == "redis_outage":
            duration = round(rng.uniform(*redis_down), 1)
        elif kind == "smtp_slow":
            duration = round(rng.uniform(3.0, 8.0), 1)
        elif kind in SMTP_FAULTS:
            duration = round(rng.uniform(2.0, 6.0), 1)
        else:  # pg_restart, nats_cluster
            duration = round(rng.uniform(0.5, 3.0), 1)
        resource = (
            "smtp"
            if kind in SMTP_FAULTS
            else ("nats" if kind.startswith("nats") else (kind if not target else ""))
        )
        if resource:
            at = max(at, busy.get(resource, 0.0))
            busy[resource] = at + duration + 1.0
        schedule.append(Fault(at=at, kind=kind, target=target, duration=duration, actor=actor))
    schedule.sort(key=lambda f: f.at)
    return RoundPlan(
        seed=seed,
        window=window,
        processes=processes,
        limits=limits,
        campaigns=tuple(campaigns),
        faults=tuple(schedule),
    )
