"""``mailer status`` (the manager's view) and ``mailer watch ID`` (a campaign, live)."""

from __future__ import annotations

import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import click
from rich.console import Group
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.text import Text

from mailer.client import MailerClient
from mailer.commands.common import EXIT_NOT_SENT, Cli, client_command, counts_line
from mailer.messages import CampaignView, ManagerStatus
from mailer.texts import duration_phrase

__all__ = ["status", "watch"]

FINAL = ("sent", "completed_with_errors", "cancelled")
# The rate is measured over this much of the recent past.
_RATE_WINDOW_SECONDS = 60.0


def _forecast(*sources: Any) -> datetime | None:
    """The API's forecast of completion, where it gives one (a newer service does)."""
    for source in sources:
        value = getattr(source, "estimated_completion_at", None)
        if isinstance(value, datetime):
            return value
        if isinstance(value, str):
            return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def _left(cli: Cli, until: datetime) -> str:
    seconds = max(0.0, (until - datetime.now(UTC)).total_seconds())
    # Whole minutes read better than "через 17893 секунд".
    minutes = round(seconds / 60) if seconds >= 60 else seconds / 60
    if minutes >= 120:
        minutes = round(minutes / 60) * 60
    return duration_phrase(minutes, cli.lang)


@client_command(
    click.Group(), "status", help="The manager's view: what sends, what waits, why, until when."
)
@click.option("--owner", help="Another manager's view (admin only).")
async def status(cli: Cli, client: MailerClient, *, owner: str | None) -> None:
    view = await client.manager_status(owner)
    if cli.json:
        cli.emit(view)
        return
    _print_status(cli, view)


def _print_status(cli: Cli, view: ManagerStatus) -> None:
    active = view.active_campaign
    if active is None:
        cli.say(cli.t("cli_status_none"))
    else:
        cli.say(
            cli.t(
                "cli_status_active",
                id=active.id,
                name=active.name,
                status=cli.status_word(active.status),
                counts=counts_line(active.counts),
            )
        )
    if view.reason:
        cli.say(view.reason)
    if view.next_run_at is not None:
        cli.say(
            cli.t("cli_until", when=cli.when(view.next_run_at), left=_left(cli, view.next_run_at))
        )
    forecast = _forecast(view, active)
    if forecast is not None:
        cli.say(cli.t("cli_forecast", when=cli.when(forecast)))
    cli.say(cli.t("cli_status_queue", queued=view.queued_count, paused=view.paused_count))
    if view.next_campaign_at is not None:
        cli.say(cli.t("cli_status_next", when=cli.when(view.next_campaign_at)))
    if view.queue:
        rows = [
            [
                str(q.id),
                q.name,
                cli.status_word(q.status),
                str(q.priority),
                (q.defer_reason or "")
                + (f" → {cli.when(q.deferred_until)}" if q.deferred_until else ""),
            ]
            for q in view.queue
        ]
        cli.table(["id", "name", "status", "priority", "waits"], rows)


class _Rate:
    """Emails settled (sent or failed) per minute over the last minute of watching."""

    def __init__(self) -> None:
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, done: int) -> float | None:
        now = time.monotonic()
        self._samples.append((now, done))
        while len(self._samples) > 2 and now - self._samples[1][0] > _RATE_WINDOW_SECONDS:
            self._samples.popleft()
        (t0, d0), (t1, d1) = self._samples[0], self._samples[-1]
        return (d1 - d0) / (t1 - t0) * 60 if t1 - t0 >= 1 else None


def _render(cli: Cli, view: CampaignView, waits: str | None, rate: float | None) -> Group:
    counts = view.counts
    sent, failed = counts.get("sent", 0), counts.get("failed", 0) + counts.get("in_doubt", 0)
    total = sum(counts.values())
    pending = total - sent - failed - counts.get("unsubscribed", 0)
    lines: list[Any] = [
        Text(
            cli.t(
                "cli_campaign_line", id=view.id, name=view.name, status=cli.status_word(view.status)
            )
        ),
        ProgressBar(total=max(total, 1), completed=total - pending, width=50),
        Text(cli.t("cli_progress", sent=sent, failed=failed, pending=pending)),
    ]
    if rate is not None:
        lines.append(Text(cli.t("cli_rate", rate=f"{rate:.1f}")))
    if waits:
        lines.append(Text(waits))
    forecast = _forecast(view)
    if forecast is not None:
        lines.append(Text(cli.t("cli_forecast", when=cli.when(forecast))))
    return Group(*lines)


async def _waits(cli: Cli, client: MailerClient, view: CampaignView) -> str | None:
    """Why the campaign waits and until when, in words (None while it sends)."""
    queue = view.queue
    if view.status in FINAL or queue is None:
        return None
    if queue.defer_reason is None:
        return cli.t("cli_sending") if view.status == "sending" else cli.t("cli_waits_turn")
    reason = queue.defer_reason
    # The service words the reason (its limits, its time zone) in the manager's view.
    owner = view.owner_id if view.owner_id != cli.user else None
    mine = await client.manager_status(owner)
    if mine.active_campaign is not None and mine.active_campaign.id == view.id and mine.reason:
        reason = mine.reason
    if queue.deferred_until is not None:
        until = cli.t(
            "cli_until", when=cli.when(queue.deferred_until), left=_left(cli, queue.deferred_until)
        )
        return f"{reason} {until}"
    return reason


@client_command(click.Group(), "watch", help="Follow a campaign live until it ends.")
@click.argument("campaign_id", type=int)
async def watch(cli: Cli, client: MailerClient, *, campaign_id: int) -> int:
    rate = _Rate()
    # The consumer exists before the first read: no change between the two is missed.
    async with client.campaign_events(campaign_id) as events:
        view = await client.get_campaign(campaign_id)
        deleted = False
        with Live(console=cli.out, auto_refresh=False, transient=False) as live:
            if cli.json:
                live.stop()
            while view.status not in FINAL:
                done = view.counts.get("sent", 0) + view.counts.get("failed", 0)
                waits = await _waits(cli, client, view)
                if cli.json:
                    cli.emit({"campaign": view, "waits": waits})
                else:
                    live.update(_render(cli, view, waits, rate.add(done)), refresh=True)
                event = await anext(events)
                if event.event == "deleted":
                    deleted = True
                    break
                view = await client.get_campaign(campaign_id)
            if not cli.json and not deleted:
                live.update(_render(cli, view, None, None), refresh=True)
    if cli.json:
        cli.emit({"campaign": view, "final": True, "deleted": deleted})
    elif deleted:
        cli.say(cli.t("cli_watch_deleted", id=campaign_id))
    else:
        c = view.counts
        cli.say(
            cli.t(
                "cli_watch_done",
                id=view.id,
                status=cli.status_word(view.status),
                sent=c.get("sent", 0),
                failed=c.get("failed", 0),
                unsubscribed=c.get("unsubscribed", 0),
                in_doubt=c.get("in_doubt", 0),
            )
        )
    return 0 if view.status == "sent" and not deleted else EXIT_NOT_SENT
