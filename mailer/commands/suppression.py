"""``mailer suppression add|remove|check|list``: the suppression list."""

from __future__ import annotations

from typing import get_args

import click

from mailer.client import MailerClient
from mailer.commands.common import Cli, client_command
from mailer.messages import SuppressionReason, SuppressionView

__all__ = ["suppression"]


@click.group(help="The suppression list (bounces, complaints, unsubscribes, manual entries).")
def suppression() -> None:
    pass


def _show(cli: Cli, view: SuppressionView) -> None:
    if cli.json:
        cli.emit(view)
    elif view.suppressed:
        at = cli.when(view.created_at) if view.created_at else "-"
        cli.say(
            cli.t(
                "cli_suppressed",
                email=view.email,
                reason=view.reason or "-",
                source=view.source or "-",
                at=at,
            )
        )
    else:
        cli.say(cli.t("cli_not_suppressed", email=view.email))


@client_command(suppression, "add", help="Suppress an address by hand (admin).")
@click.argument("email")
@click.option("--detail", default="", help="Why, for the record.")
async def add(cli: Cli, client: MailerClient, *, email: str, detail: str) -> None:
    _show(cli, await client.suppression_add(email, detail=detail))


@client_command(suppression, "remove", help="Take an address off the list (admin).")
@click.argument("email")
async def remove(cli: Cli, client: MailerClient, *, email: str) -> None:
    reply = await client.suppression_remove(email)
    if cli.json:
        cli.emit(reply)
    elif reply.removed:
        cli.say(cli.t("cli_suppression_removed", email=reply.email, reason=reply.reason or "-"))
    else:
        cli.say(cli.t("cli_suppression_absent", email=reply.email))


@client_command(suppression, "check", help="Whether an address may be mailed, and if not why.")
@click.argument("email")
async def check(cli: Cli, client: MailerClient, *, email: str) -> None:
    _show(cli, await client.suppression_check(email))


@client_command(suppression, "list", help="Suppressed addresses in address order (admin).")
@click.option("--limit", type=int, default=100, show_default=True, help="How many (1–500).")
@click.option("--cursor", help="Go on from this next_cursor (an address).")
@click.option("--reason", type=click.Choice(get_args(SuppressionReason)), help="Only this reason.")
async def list_(
    cli: Cli, client: MailerClient, *, limit: int, cursor: str | None, reason: str | None
) -> None:
    page = await client.suppression_list(
        limit=limit,
        cursor=cursor,
        reason=reason,  # type: ignore[arg-type]  # click.Choice checked it
    )
    if cli.json:
        cli.emit(page)
        return
    rows = [
        [
            s.email,
            s.reason or "",
            s.source or "",
            str(s.campaign_id or ""),
            cli.when(s.created_at) if s.created_at else "",
        ]
        for s in page.items
    ]
    cli.table(["email", "reason", "source", "campaign", "at"], rows)
    if page.next_cursor is not None:
        cli.say(cli.t("cli_more", cursor=page.next_cursor))
