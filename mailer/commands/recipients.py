"""``mailer recipients import|list|remove``: CSV import in chunks, with a progress bar."""

from __future__ import annotations

import asyncio
import csv
import io
import sys
from pathlib import Path
from typing import get_args

import click
import msgspec
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from mailer.api.routes import LARGE_PAYLOAD
from mailer.client import MAX_RECIPIENTS_PER_CALL, MailerClient
from mailer.commands.common import Cli, client_command
from mailer.messages import ImportProgress, RecipientIn, RecipientStatus

__all__ = ["Row", "read_csv", "recipients"]

# Room for the JSON around the recipients in a request.
_ENVELOPE = 1024


@click.group(help="Add, list and remove a campaign's recipients.")
def recipients() -> None:
    pass


class Row(msgspec.Struct, frozen=True):
    line: int
    recipient: RecipientIn | None
    # Why the line cannot be sent (None: it is sent).
    problem: str | None = None
    email: str = ""


def read_csv(source: io.TextIOBase | io.TextIOWrapper, cli: Cli) -> list[Row]:
    """Rows of a CSV whose header names ``email``, optionally ``name``, and variables.

    Column names are matched without case; an empty cell is no value. A line
    the API could not take at all (no address, more fields than the header)
    is reported here, with its line number; the API judges the addresses.
    """
    reader = csv.reader(source)
    header = next(reader, None)
    names = [h.strip() for h in header or []]
    lowered = [n.lower() for n in names]
    if "email" not in lowered:
        cli.fail(cli.t("cli_csv_no_email_column"))
    at_email = lowered.index("email")
    at_name = lowered.index("name") if "name" in lowered else None
    rows: list[Row] = []
    for fields in reader:
        line = reader.line_num
        if not any(f.strip() for f in fields):
            continue  # a blank line
        email = fields[at_email].strip() if at_email < len(fields) else ""
        if len(fields) > len(names):
            rows.append(Row(line, None, cli.t("cli_csv_extra_fields"), email))
            continue
        if not email:
            rows.append(Row(line, None, cli.t("cli_csv_empty_email"), email))
            continue
        name = fields[at_name].strip() if at_name is not None and at_name < len(fields) else ""
        variables = {
            names[i]: value
            for i, value in enumerate(fields)
            if i not in (at_email, at_name) and value != ""
        }
        recipient = RecipientIn(email=email, name=name or None, variables=variables)
        rows.append(Row(line, recipient, None, email))
    return rows


def _chunks(rows: list[Row], max_bytes: int) -> list[list[Row]]:
    """Consecutive rows per request: at most 5000, and under the request size limit."""
    chunks: list[list[Row]] = []
    current: list[Row] = []
    size = _ENVELOPE
    for row in rows:
        assert row.recipient is not None
        n = len(msgspec.json.encode(row.recipient)) + 1
        if current and (len(current) >= MAX_RECIPIENTS_PER_CALL or size + n > max_bytes):
            chunks.append(current)
            current, size = [], _ENVELOPE
        current.append(row)
        size += n
    if current:
        chunks.append(current)
    return chunks


class ImportSummary(msgspec.Struct, kw_only=True):
    campaign_id: int
    added: int = 0
    duplicates: int = 0
    # Each line not added for a reason other than being a duplicate.
    invalid: list[dict[str, object]] = msgspec.field(default_factory=list)


#: A file larger than this goes through recipients.import (one upload, one transaction);
#: a smaller one, or stdin, through recipients.add calls of up to 5000.
BULK_FROM_BYTES = 1024 * 1024


@client_command(recipients, "import", help="Add recipients from a CSV file ('-': stdin).")
@click.argument("campaign_id", type=int)
@click.argument("file", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option(
    "--bulk/--no-bulk",
    default=None,
    help="Upload the file and import it at once (recipients.import); "
    "default: for files over 1 MiB.",
)
async def import_(
    cli: Cli, client: MailerClient, *, campaign_id: int, file: Path, bulk: bool | None
) -> None:
    """The header row names the columns: email, name, and any variables ({{city}}…)."""
    if bulk is None:
        bulk = str(file) != "-" and await asyncio.to_thread(_large, file)
    if bulk:
        await _import_bulk(cli, client, campaign_id, file)
        return
    try:
        if str(file) == "-":
            rows = read_csv(io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig"), cli)
        else:
            with file.open(encoding="utf-8-sig", newline="") as f:
                rows = read_csv(f, cli)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        cli.fail(f"{file}: {exc}")
    summary = ImportSummary(campaign_id=campaign_id)
    summary.invalid = [
        {"line": r.line, "email": r.email, "reason": r.problem} for r in rows if r.problem
    ]
    good = [r for r in rows if r.recipient is not None]
    max_bytes = min(LARGE_PAYLOAD, client.nc.max_payload) - _ENVELOPE
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=cli.err,
        disable=cli.json,
        transient=False,
    ) as progress:
        task = progress.add_task(cli.t("cli_import_progress"), total=len(good))
        for chunk in _chunks(good, max_bytes):
            reply = await client.add_recipients(
                campaign_id, [r.recipient for r in chunk if r.recipient is not None]
            )
            summary.added += reply.added
            summary.duplicates += reply.duplicates
            lines: dict[str, list[int]] = {}
            for r in chunk:
                lines.setdefault(r.email, []).append(r.line)
            for bad in reply.invalid:
                found = lines.get(bad.email) or [0]
                summary.invalid.append(
                    {"line": found.pop(0), "email": bad.email, "reason": bad.reason}
                )
            progress.advance(task, len(chunk))
    summary.invalid.sort(key=lambda i: int(str(i["line"])))
    if cli.json:
        cli.emit(summary)
        return
    cli.say(
        cli.t(
            "cli_import_summary",
            added=summary.added,
            duplicates=summary.duplicates,
            invalid=len(summary.invalid),
        )
    )
    for line in summary.invalid:
        cli.say(cli.t("cli_import_invalid", **line))


def _large(file: Path) -> bool:
    return file.is_file() and file.stat().st_size > BULK_FROM_BYTES


async def _import_bulk(cli: Cli, client: MailerClient, campaign_id: int, file: Path) -> None:
    if str(file) == "-":
        cli.fail(cli.t("cli_import_bulk_stdin"))
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f}"),
        console=cli.err,
        disable=cli.json,
        transient=False,
    ) as progress:
        task = progress.add_task(cli.t("cli_import_progress"), total=None)

        def on_progress(event: ImportProgress) -> None:
            progress.update(task, completed=event.lines)

        result = await client.import_recipients(campaign_id, file, on_progress=on_progress)
    summary = ImportSummary(
        campaign_id=campaign_id,
        added=result.added,
        duplicates=result.duplicates,
        invalid=[{"line": i.line, "email": i.email, "reason": i.reason} for i in result.invalid],
    )
    if cli.json:
        cli.emit(summary)
        return
    cli.say(
        cli.t(
            "cli_import_summary",
            added=summary.added,
            duplicates=summary.duplicates,
            invalid=result.invalid_count,
        )
    )
    for line in summary.invalid:
        cli.say(cli.t("cli_import_invalid", **line))


@client_command(recipients, "list", help="List a campaign's recipients in id order.")
@click.argument("campaign_id", type=int)
@click.option(
    "--status",
    type=click.Choice(list(get_args(RecipientStatus))),
    help="Only this status.",
)
@click.option("--limit", type=int, default=100, show_default=True, help="How many (1–500).")
@click.option("--cursor", type=int, help="Go on from this next_cursor.")
async def list_(
    cli: Cli,
    client: MailerClient,
    *,
    campaign_id: int,
    status: str | None,
    limit: int,
    cursor: int | None,
) -> None:
    page = await client.list_recipients(campaign_id, status=status, limit=limit, cursor=cursor)
    if cli.json:
        cli.emit(page)
        return
    rows = [[str(r.id), r.email, r.name or "", r.status, r.error or ""] for r in page.items]
    cli.table(["id", "email", "name", "status", "error"], rows)
    if page.next_cursor is not None:
        cli.say(cli.t("cli_more", cursor=page.next_cursor))


@client_command(recipients, "remove", help="Remove pending recipients by address.")
@click.argument("campaign_id", type=int)
@click.argument("emails", nargs=-1, required=True)
async def remove(
    cli: Cli, client: MailerClient, *, campaign_id: int, emails: tuple[str, ...]
) -> None:
    reply = await client.remove_recipients(campaign_id, list(emails))
    if cli.json:
        cli.emit(reply)
        return
    cli.say(cli.t("cli_removed", removed=reply.removed, kept=len(reply.not_removed)))
    for n in reply.not_removed:
        cli.say(cli.t("cli_not_removed", email=n.email, reason=n.reason))


@client_command(
    recipients, "resolve", help="Settle in-doubt recipients (admin): sent, failed or retry."
)
@click.argument("campaign_id", type=int)
@click.argument("recipient_ids", type=int, nargs=-1, required=True)
@click.option(
    "--to",
    "to",
    type=click.Choice(["sent", "failed", "retry"]),
    required=True,
    help="sent: the provider has it; failed: it never left; retry: send again (may duplicate).",
)
@click.option("--note", default="", help="Why (a ticket), for the audit log.")
async def resolve(
    cli: Cli,
    client: MailerClient,
    *,
    campaign_id: int,
    recipient_ids: tuple[int, ...],
    to: str,
    note: str,
) -> None:
    reply = await client.resolve_recipients(
        campaign_id,
        list(recipient_ids),
        to,  # type: ignore[arg-type]  # click.Choice checked it
        note=note,
    )
    if cli.json:
        cli.emit(reply)
        return
    cli.say(cli.t("cli_resolved", count=len(reply.resolved), to=to, status=reply.campaign.status))
    if reply.warning:
        cli.say(cli.t("cli_warning", message=reply.warning))
