"""``mailer dev``: the real service on the embedded stack.

Any of MAILER_NATS_URL, MAILER_DATABASE_URL, MAILER_REDIS_URL or
MAILER_SMTP_HOST(+PORT) that is set points at that real server instead of
starting an embedded one. Ctrl-C stops the service, then every server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from zoneinfo import ZoneInfo

import msgspec

from mailer.config import Settings
from mailer.db import migrate
from mailer.devstack import EmbeddedStack, StackEndpoints, StackOverrides
from mailer.rules import WorkingHours

__all__ = ["dev_stack", "limits_in_force", "run_dev", "second_terminal", "with_endpoints"]

# Settings that lift the sending limits for a try on the dev stack.
LIFT_LIMITS = (
    "MAILER_WORKING_HOURS_START=00:00 MAILER_WORKING_HOURS_END=24:00 MAILER_RATE_PER_HOUR=100000"
)


def second_terminal(s: Settings) -> str:
    """What a second terminal runs to drive this service with the ``mailer`` CLI."""
    lines = [
        "In another terminal, to use the mailer CLI:",
        f"  export MAILER_NATS_URL={s.nats_url}",
    ]
    if s.subject_prefix != Settings().subject_prefix:
        lines.append(f"  export MAILER_SUBJECT_PREFIX={s.subject_prefix}")
    lines.append("  mailer campaign create --help")
    return "\n".join(lines)


def limits_in_force(s: Settings, now: datetime) -> str:
    """The sending limits a first campaign meets, and how to lift them for a try.

    A newcomer's campaign started at night otherwise waits silently until the
    morning's working hours.
    """
    hours = WorkingHours.from_settings(s)
    tz = ZoneInfo(s.timezone)
    daily = f", {s.daily_limit_default}/day per manager" if s.daily_limit_default else ""
    lines = [
        f"Limits in force: working hours {s.working_hours_start}-{s.working_hours_end} "
        f"{s.timezone} (days {s.working_days}), {s.rate_per_hour} emails/hour{daily}, "
        f"{s.monthly_quota} a month."
    ]
    opens = hours.next_open(now)
    if opens > now:
        lines.append(
            "  It is outside working hours now: a campaign started now waits until "
            f"{opens.astimezone(tz):%Y-%m-%d %H:%M} {s.timezone}."
        )
    lines.append(f"  To lift them for a try: {LIFT_LIMITS} make run")
    return "\n".join(lines)


def with_endpoints(settings: Settings, e: StackEndpoints) -> Settings:
    return msgspec.structs.replace(
        settings,
        nats_url=e.nats_url,
        database_url=e.database_url,
        redis_url=e.redis_url,
        smtp_host=e.smtp_host,
        smtp_port=e.smtp_port,
    )


@contextlib.asynccontextmanager
async def dev_stack(
    settings: Settings, *, fresh_outbox: bool = False
) -> AsyncIterator[tuple[EmbeddedStack, Settings]]:
    stack = EmbeddedStack(settings.var_dir, StackOverrides.from_settings(settings))
    async with stack:
        if fresh_outbox and stack.sink is not None and stack.endpoints.outbox_dir is not None:
            for old in stack.endpoints.outbox_dir.glob("*.eml"):
                old.unlink()
        resolved = with_endpoints(settings, stack.endpoints)
        await migrate(resolved.database_url)
        yield stack, resolved


async def run_dev(settings: Settings) -> int:
    from mailer.cli import serve
    from mailer.service import Service

    async with dev_stack(settings) as (stack, resolved):
        service = Service(resolved)
        await service.start()
        e = stack.endpoints
        print(
            "mailer dev is running (Ctrl-C stops everything)\n"
            f"  NATS        {e.nats_url}   subjects {resolved.subject_prefix}.>\n"
            f"  PostgreSQL  {e.database_url}\n"
            f"  Redis       {e.redis_url}\n"
            f"  SMTP        {e.smtp_host}:{e.smtp_port}   outbox {e.outbox_dir or '-'}\n"
            f"  HTTP        http://{resolved.http_host}:{service.http_port}/metrics"
            f"   unsubscribe pages on :{service.public_http_port}\n"
            "\n"
            f"{second_terminal(resolved)}\n"
            "\n"
            f"{limits_in_force(resolved, datetime.now(UTC))}",
            flush=True,
        )
        return await serve(service)
