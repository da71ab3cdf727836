"""``mailer campaign create|update|get|list|start|pause|resume|cancel|delete|test``."""

from __future__ import annotations

import mimetypes
from datetime import datetime
from pathlib import Path

import click
import msgspec

from mailer.client import MailerClient
from mailer.commands.common import Cli, client_command, counts_line
from mailer.messages import CampaignView

__all__ = ["campaign"]


@click.group(help="Create, change, start and stop campaigns.")
def campaign() -> None:
    pass


def _read(path: Path | None) -> str | None:
    if path is None:
        return None
    with click.open_file(str(path), encoding="utf-8") as f:
        body: str = f.read()
    return body


_FILE = click.Path(dir_okay=False, path_type=Path, allow_dash=True)


def _show(cli: Cli, view: CampaignView) -> None:
    if cli.json:
        cli.emit(view)
        return
    cli.say(
        cli.t("cli_campaign_line", id=view.id, name=view.name, status=cli.status_word(view.status))
    )


@client_command(campaign, "create", help="Create a draft campaign; prints its id.")
@click.option("--name", required=True, help="The campaign's name (one line).")
@click.option("--subject", required=True, help="The email's subject (no {{…}} placeholders).")
@click.option("--text", "text_file", type=_FILE, help="File with the text body ('-': stdin).")
@click.option("--html", "html_file", type=_FILE, help="File with the HTML body.")
@click.option(
    "--attach",
    multiple=True,
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    help="A file to attach (repeat for several).",
)
@click.option("--priority", type=int, default=0, show_default=True, help="-100…100, higher first.")
@click.option("--account", help="The SMTP account it goes through (default: the default one).")
@click.option("--backup-account", help="The SMTP account used while its own breaker is open.")
async def create(
    cli: Cli,
    client: MailerClient,
    *,
    name: str,
    subject: str,
    text_file: Path | None,
    html_file: Path | None,
    attach: tuple[Path, ...],
    priority: int,
    account: str | None,
    backup_account: str | None,
) -> None:
    view = await client.create_campaign(
        name,
        subject,
        body_text=_read(text_file),
        body_html=_read(html_file),
        priority=priority,
        account=account,
        backup_account=backup_account,
    )
    for path in attach:
        kind = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        att = await client.add_attachment(view.id, path.name, path.read_bytes(), kind)
        cli.say(cli.t("cli_attached", filename=att.filename, size=att.size))
    if attach:
        view = await client.get_campaign(view.id)
    if cli.json:
        cli.emit(view)
    else:
        cli.say(cli.t("cli_created", id=view.id))


@client_command(campaign, "update", help="Change a draft, queued or paused campaign.")
@click.argument("campaign_id", type=int)
@click.option("--name", help="A new name.")
@click.option("--subject", help="A new subject.")
@click.option("--text", "text_file", type=_FILE, help="File with a new text body.")
@click.option("--html", "html_file", type=_FILE, help="File with a new HTML body.")
@click.option("--no-text", is_flag=True, help="Remove the text body (the HTML one must remain).")
@click.option("--no-html", is_flag=True, help="Remove the HTML body (the text one must remain).")
@click.option("--priority", type=int, help="A new priority, -100…100.")
@click.option("--account", help="Another SMTP account ('' for the default one).")
@click.option("--backup-account", help="Another backup SMTP account ('' for none).")
async def update(
    cli: Cli,
    client: MailerClient,
    *,
    campaign_id: int,
    name: str | None,
    subject: str | None,
    text_file: Path | None,
    html_file: Path | None,
    no_text: bool,
    no_html: bool,
    priority: int | None,
    account: str | None,
    backup_account: str | None,
) -> None:
    unset = msgspec.UNSET
    view = await client.update_campaign(
        campaign_id,
        name=unset if name is None else name,
        subject=unset if subject is None else subject,
        body_text=None if no_text else (unset if text_file is None else _read(text_file)),
        body_html=None if no_html else (unset if html_file is None else _read(html_file)),
        priority=unset if priority is None else priority,
        account=unset if account is None else (account or None),
        backup_account=unset if backup_account is None else (backup_account or None),
    )
    _show(cli, view)


@client_command(campaign, "get", help="Show a campaign: status, recipients by status, queue.")
@click.argument("campaign_id", type=int)
async def get(cli: Cli, client: MailerClient, *, campaign_id: int) -> None:
    view = await client.get_campaign(campaign_id)
    if cli.json:
        cli.emit(view)
        return
    _show(cli, view)
    cli.say(f"  {cli.t('cli_col_counts')}: {counts_line(view.counts)}")
    queue = view.queue
    if queue is not None and queue.defer_reason:
        until = f" → {cli.when(queue.deferred_until)}" if queue.deferred_until else ""
        cli.say(f"  {cli.t('cli_col_waits')}: {queue.defer_reason}{until}")


@client_command(campaign, "list", help="List campaigns, newest first.")
@click.option("--status", multiple=True, help="Only these statuses (repeat for several).")
@click.option("--owner", help="Another owner's campaigns (admin only).")
@click.option("--limit", type=int, default=50, show_default=True, help="How many (1–500).")
@click.option("--cursor", type=int, help="Go on from this next_cursor.")
async def list_(
    cli: Cli,
    client: MailerClient,
    *,
    status: tuple[str, ...],
    owner: str | None,
    limit: int,
    cursor: int | None,
) -> None:
    page = await client.list_campaigns(owner_id=owner, status=status, limit=limit, cursor=cursor)
    if cli.json:
        cli.emit(page)
        return
    rows = [
        [
            str(c.id),
            c.name,
            cli.status_word(c.status),
            str(c.priority),
            counts_line(c.counts),
            cli.when(c.created_at),
        ]
        for c in page.items
    ]
    cli.table(["id", "name", "status", "priority", "counts", "created"], rows)
    if page.next_cursor is not None:
        cli.say(cli.t("cli_more", cursor=page.next_cursor))


@client_command(campaign, "start", help="Queue a draft for sending; prints the API's warnings.")
@click.argument("campaign_id", type=int)
@click.option(
    "--at",
    "send_at",
    type=click.DateTime(["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%d %H:%M:%S%z", "%Y-%m-%dT%H:%M%z"]),
    help="Start at this time instead of now, with its offset: 2026-12-01T09:00+03:00.",
)
async def start(
    cli: Cli, client: MailerClient, *, campaign_id: int, send_at: datetime | None
) -> None:
    reply = await client.start_campaign(campaign_id, send_at=send_at)
    if cli.json:
        cli.emit(reply)
        return
    _show(cli, reply.campaign)
    for w in reply.warnings:
        cli.say(cli.t("cli_warning", message=w.message))


@client_command(campaign, "retry", help="Send the failed recipients again, under every limit.")
@click.argument("campaign_id", type=int)
@click.option("--permanent", is_flag=True, help="Also those that failed permanently (5xx).")
async def retry(cli: Cli, client: MailerClient, *, campaign_id: int, permanent: bool) -> None:
    reply = await client.retry_failed(campaign_id, permanent=permanent)
    if cli.json:
        cli.emit(reply)
        return
    _show(cli, reply.campaign)
    cli.say(cli.t("cli_requeued", count=reply.requeued))


def _simple(name: str, help_text: str) -> None:
    @client_command(campaign, name, help=help_text)
    @click.argument("campaign_id", type=int)
    async def command(cli: Cli, client: MailerClient, *, campaign_id: int) -> None:
        method = {
            "pause": client.pause_campaign,
            "resume": client.resume_campaign,
            "cancel": client.cancel_campaign,
            "unschedule": client.unschedule_campaign,
        }[name]
        _show(cli, await method(campaign_id))


_simple("pause", "Pause a queued or sending campaign (the batch in flight finishes).")
_simple("resume", "Resume a paused campaign.")
_simple("cancel", "Cancel a campaign; its pending recipients stay pending, as history.")
_simple("unschedule", "Take a scheduled campaign back to draft before its time comes.")


@client_command(campaign, "delete", help="Delete a campaign that is not sending.")
@click.argument("campaign_id", type=int)
async def delete(cli: Cli, client: MailerClient, *, campaign_id: int) -> None:
    reply = await client.delete_campaign(campaign_id)
    if cli.json:
        cli.emit(reply)
    else:
        cli.say(cli.t("cli_deleted", id=campaign_id))


@client_command(campaign, "test", help="Send the campaign's message once to an address.")
@click.argument("campaign_id", type=int)
@click.option("--to", "to", required=True, help="The address to send the test email to.")
@click.option("--name", help="The {{name}} to personalize with.")
@click.option("--var", "variables", multiple=True, help="A variable as key=value (repeat).")
async def test(
    cli: Cli,
    client: MailerClient,
    *,
    campaign_id: int,
    to: str,
    name: str | None,
    variables: tuple[str, ...],
) -> None:
    pairs = dict(v.split("=", 1) for v in variables if "=" in v)
    if len(pairs) != len(variables):
        cli.fail("--var takes key=value")
    reply = await client.send_test(campaign_id, to, name=name, variables=pairs)
    if cli.json:
        cli.emit(reply)
    else:
        cli.say(cli.t("cli_test_sent", email=reply.email, answer=reply.provider_answer or "-"))
