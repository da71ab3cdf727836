"""``mailer quota``, ``unsubscribe add|remove|check|list``, ``audit``, ``events``, ``ping``."""

from __future__ import annotations

import sys
from typing import Literal

import click
import msgspec

from mailer.client import MailerClient
from mailer.commands.common import Cli, client_command
from mailer.messages import UnsubscribeView

__all__ = ["audit", "events", "limits", "ping", "quota", "unsubscribe"]


@client_command(click.Group(), "quota", help="The provider's monthly allowance left.")
@click.option("--sync", is_flag=True, help="Ask the provider now (admin only).")
@click.option(
    "--set",
    "set_to",
    type=click.IntRange(min=0),
    default=None,
    help="Set the local monthly allowance now (admin only, local quota only).",
)
@click.option(
    "--account",
    default=None,
    help="The SMTP account whose quota (MAILER_SMTP_ACCOUNTS; default: the default account).",
)
async def quota(
    cli: Cli, client: MailerClient, *, sync: bool, set_to: int | None, account: str | None
) -> None:
    if set_to is not None:
        view = await client.set_quota(set_to, account=account)
    else:
        view = await (client.sync_quota(account) if sync else client.quota(account))
    if cli.json:
        cli.emit(view)
        return
    synced = cli.when(view.last_synced_at)
    # The http provider may not say its monthly limit: then none is shown.
    limit = "-" if view.monthly_limit is None else view.monthly_limit
    key = "cli_quota" if account is None else "cli_quota_account"
    cli.say(
        cli.t(
            key,
            available=view.emails_available,
            limit=limit,
            synced=synced,
            account=view.account,
        )
    )
    if view.sync_error:
        cli.say(cli.t("cli_quota_error", error=view.sync_error))


@client_command(
    click.Group(),
    "limits",
    help="Decide every limit's deferral again under the limits in force (admin only).",
)
@click.option("--reload", "reload_", is_flag=True, required=True, help="Do it now.")
async def limits(cli: Cli, client: MailerClient, *, reload_: bool) -> None:
    reply = await client.reload_limits()
    if cli.json:
        cli.emit(reply)
        return
    cli.say(cli.t("cli_limits_reloaded", count=reply.reevaluated))


@click.group(help="The unsubscribe list: add, remove (admin), check, list (admin).")
def unsubscribe() -> None:
    pass


def _show_unsubscribe(cli: Cli, view: UnsubscribeView) -> None:
    if cli.json:
        cli.emit(view)
    elif view.unsubscribed:
        at = cli.when(view.created_at) if view.created_at else "-"
        cli.say(cli.t("cli_unsubscribed", email=view.email, source=view.source or "-", at=at))
    else:
        cli.say(cli.t("cli_subscribed", email=view.email))


@client_command(unsubscribe, "add", help="Unsubscribe an address from every later campaign.")
@click.argument("email")
@click.option("--source", default="cli", show_default=True, help="Where the request came from.")
async def add(cli: Cli, client: MailerClient, *, email: str, source: str) -> None:
    _show_unsubscribe(cli, await client.unsubscribe_add(email, source=source))


@client_command(unsubscribe, "remove", help="Take an address off the unsubscribe list.")
@click.argument("email")
async def remove(cli: Cli, client: MailerClient, *, email: str) -> None:
    reply = await client.unsubscribe_remove(email)
    if cli.json:
        cli.emit(reply)
    else:
        key = "cli_unsubscribe_removed" if reply.removed else "cli_unsubscribe_absent"
        cli.say(cli.t(key, email=reply.email))


@client_command(unsubscribe, "check", help="Whether an address may be mailed.")
@click.argument("email")
async def check(cli: Cli, client: MailerClient, *, email: str) -> None:
    _show_unsubscribe(cli, await client.unsubscribe_check(email))


@client_command(unsubscribe, "list", help="Unsubscribed addresses in address order.")
@click.option("--limit", type=int, default=100, show_default=True, help="How many (1–500).")
@click.option("--cursor", help="Go on from this next_cursor (an address).")
async def list_(cli: Cli, client: MailerClient, *, limit: int, cursor: str | None) -> None:
    page = await client.unsubscribe_list(limit=limit, cursor=cursor)
    if cli.json:
        cli.emit(page)
        return
    rows = [
        [u.email, u.source or "", cli.when(u.created_at) if u.created_at else ""]
        for u in page.items
    ]
    cli.table(["email", "source", "at"], rows)
    if page.next_cursor is not None:
        cli.say(cli.t("cli_more", cursor=page.next_cursor))


@client_command(click.Group(), "audit", help="Who did what to a campaign, in time order.")
@click.argument("campaign_id", type=int)
@click.option("--limit", type=int, default=100, show_default=True, help="How many (1–500).")
@click.option("--cursor", type=int, help="Go on from this next_cursor.")
async def audit(
    cli: Cli, client: MailerClient, *, campaign_id: int, limit: int, cursor: int | None
) -> None:
    page = await client.audit(campaign_id, limit=limit, cursor=cursor)
    if cli.json:
        cli.emit(page)
        return
    rows = [
        [
            a.at.astimezone(cli.tz).strftime("%d.%m %H:%M:%S"),
            a.actor_id,
            a.action,
            msgspec.json.encode(a.details).decode() if a.details else "",
        ]
        for a in page.items
    ]
    cli.table(["at", "actor", "action", "details"], rows)
    if page.next_cursor is not None:
        cli.say(cli.t("cli_more", cursor=page.next_cursor))


@client_command(click.Group(), "events", help="Tail mailer's events as JSON lines (Ctrl-C stops).")
@click.option("--campaign", "campaign_id", type=int, help="Only this campaign's events.")
@click.option(
    "--from-start", is_flag=True, help="From the first stored event (kept 7 days), not from now."
)
@click.option("--count", type=int, help="Stop after this many events.")
async def events(
    cli: Cli, client: MailerClient, *, campaign_id: int | None, from_start: bool, count: int | None
) -> None:
    deliver: Literal["new", "all"] = "all" if from_start else "new"
    subjects = "campaign.>" if campaign_id is not None else ">"
    seen = 0
    async with client.events(subjects, deliver=deliver) as stream:
        async for msg in stream:
            payload = msg.json()
            if campaign_id is not None and payload.get("campaign_id") != campaign_id:
                continue
            line = {"subject": msg.subject, "sequence": msg.sequence, "event": payload}
            sys.stdout.write(msgspec.json.encode(line).decode() + "\n")
            sys.stdout.flush()
            seen += 1
            if count is not None and seen >= count:
                return


@client_command(click.Group(), "ping", help="Which mailer instances answer, and their version.")
@click.option(
    "--wait", type=float, default=0.5, show_default=True, help="Seconds to collect answers."
)
@click.option("--all", "every", is_flag=True, help="Every prefix's instances, not only ours.")
async def ping(cli: Cli, client: MailerClient, *, wait: float, every: bool) -> int:
    found = [i for i in await client.ping(wait=wait) if every or i.subject_prefix == client.prefix]
    if cli.json:
        cli.emit(found)
    elif not found:
        cli.err.print(cli.t("cli_no_instances", prefix=client.prefix), markup=False)
    else:
        rows = [
            [i.id, i.version, i.subject_prefix, str(i.endpoints), f"{i.rtt_ms:.1f}"] for i in found
        ]
        cli.table(["instance", "version", "prefix", "endpoints", "rtt"], rows)
    return 0 if found else 6
