"""What every client command shares: the options, the connection, output, exit codes.

Exit codes of the client commands (``mailer campaign …``, ``recipients``,
``status``, ``watch``, ``quota``, ``unsubscribe``, ``audit``, ``events``, ``ping``):

- 0   done
- 2   a usage or configuration error (a bad option, a bad ``MAILER_*`` value, an unreadable file)
- 4   the API refused the request (its message is printed); retrying it unchanged will not help
- 5   the API refused for now (throttled, a limit, a backend down): the same request
  may succeed later
- 6   mailer could not be reached (no NATS server, no mailer instance, no reply in time)
- 7   ``mailer watch``: the campaign ended but not as ``sent`` (completed with errors,
  cancelled or deleted)
"""

from __future__ import annotations

import asyncio
import functools
import getpass
import sys
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, NoReturn, TypeVar
from zoneinfo import ZoneInfo

import click
import msgspec
from rich.console import Console
from rich.table import Table

from mailer.client import ClientOptions, MailerClient, MailerError
from mailer.client.errors import ConnectionFailed, NoResponders, RequestTimeout
from mailer.config import ConfigError, Settings, load_settings
from mailer.texts import Lang, resume_phrase, text

__all__ = [
    "EXIT_API",
    "EXIT_NOT_SENT",
    "EXIT_RETRY",
    "EXIT_UNREACHABLE",
    "EXIT_USAGE",
    "Cli",
    "client_command",
]

EXIT_USAGE = 2
EXIT_API = 4
EXIT_RETRY = 5
EXIT_UNREACHABLE = 6
EXIT_NOT_SENT = 7

F = TypeVar("F", bound=Callable[..., Any])


class Cli:
    """One command's run: its settings, identity, language and output."""

    def __init__(
        self,
        *,
        settings: Settings,
        user: str,
        roles: tuple[str, ...],
        lang: Lang,
        json: bool,
        nats_url: str | None,
    ) -> None:
        self.settings = settings
        self.user = user
        self.roles = roles
        self.lang: Lang = lang
        self.json = json
        self.options = ClientOptions.from_settings(settings, url=nats_url, name="mailer-cli")
        # Tables and progress go to stdout; with --json only the JSON does.
        self.out = Console(highlight=False, soft_wrap=True)
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        self.tz = ZoneInfo(settings.timezone)

    def t(self, key: str, **values: object) -> str:
        return text(key, self.lang, **values)

    def say(self, line: str) -> None:
        """A line for people (not printed with --json)."""
        if not self.json:
            self.out.print(line, markup=False)

    def emit(self, value: Any) -> None:
        """A reply as JSON (with --json)."""
        sys.stdout.write(msgspec.json.encode(value).decode() + "\n")
        sys.stdout.flush()

    def table(self, columns: list[str], rows: list[list[str]]) -> None:
        table = Table(*[self.t(f"cli_col_{c}") for c in columns])
        for row in rows:
            table.add_row(*row)
        self.out.print(table)

    def when(self, at: datetime | None) -> str:
        """A moment in words in the service's time zone: ``завтра в 09:00 МСК``."""
        if at is None:
            return self.t("cli_never")
        return resume_phrase(at, now=datetime.now(at.tzinfo), tz=self.tz, lang=self.lang)

    def status_word(self, status: str) -> str:
        word = text(f"status_{status}", self.lang)
        return status if word == f"status_{status}" else word

    async def connect(self) -> MailerClient:
        return await MailerClient.connect(
            self.options, user=self.user, roles=self.roles, lang=self.lang
        )

    def fail(self, message: str, code: int = EXIT_USAGE) -> NoReturn:
        self.err.print(f"mailer: {message}", markup=False)
        raise SystemExit(code)


def _common_options(f: F) -> F:
    options = [
        click.option(
            "--user",
            "-u",
            default=None,
            help="Who acts (header Mailer-User): the CRM user id. Default: your login name.",
        ),
        click.option(
            "--roles",
            default="",
            help="Comma-separated roles (header Mailer-Roles), e.g. admin.",
        ),
        click.option(
            "--lang",
            type=click.Choice(["ru", "en"]),
            default="ru",
            show_default=True,
            help="Language of messages, the API's and this command's.",
        ),
        click.option(
            "--json",
            "as_json",
            is_flag=True,
            help="Print machine-readable JSON (the API's replies) instead of text.",
        ),
        click.option(
            "--nats-url",
            default=None,
            help="NATS server URL (default: MAILER_NATS_URL). Auth, prefix: MAILER_NATS_*, "
            "MAILER_SUBJECT_PREFIX.",
        ),
    ]
    for option in reversed(options):
        f = option(f)
    return f


def client_command(group: click.Group, name: str, **kw: Any) -> Callable[[F], click.Command]:
    """Declares ``async def body(cli: Cli, client: MailerClient, *, **args) -> int | None``
    as a command of ``group`` with the common options; runs it and maps errors to exit codes."""

    def wrap(body: F) -> click.Command:
        @functools.wraps(body)
        def command(
            user: str | None,
            roles: str,
            lang: Lang,
            as_json: bool,
            nats_url: str | None,
            **args: Any,
        ) -> None:
            try:
                settings = load_settings()
            except ConfigError as exc:
                click.echo(f"mailer: configuration error: {exc}", err=True)
                raise SystemExit(EXIT_USAGE) from None
            cli = Cli(
                settings=settings,
                user=user if user is not None else getpass.getuser(),
                roles=tuple(r.strip() for r in roles.split(",") if r.strip()),
                lang=lang,
                json=as_json,
                nats_url=nats_url,
            )
            raise SystemExit(_run(cli, lambda client: body(cli, client, **args)))

        return group.command(name, **kw)(_common_options(command))

    return wrap


def _run(cli: Cli, body: Callable[[MailerClient], Awaitable[int | None]]) -> int:
    async def go() -> int:
        client = await cli.connect()
        try:
            return await body(client) or 0
        finally:
            await client.close()

    try:
        return _loop_run(go())
    except (ConnectionFailed, NoResponders, RequestTimeout) as exc:
        return _report(cli, exc, EXIT_UNREACHABLE)
    except MailerError as exc:
        return _report(cli, exc, EXIT_RETRY if exc.retryable else EXIT_API)
    except KeyboardInterrupt:
        return 130


def _report(cli: Cli, exc: MailerError, code: int) -> int:
    if cli.json:
        error = {"code": exc.code, "message": exc.message, "details": exc.details or None}
        cli.emit({"error": error})
    elif code == EXIT_UNREACHABLE:
        cli.err.print(cli.t("cli_unreachable", message=exc.message), markup=False)
    else:
        cli.err.print(f"{exc.message} [{exc.code}]", markup=False)
    return code


def _loop_run(coro: Awaitable[int]) -> int:
    try:
        import uvloop

        return uvloop.run(coro)  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - Windows
        return asyncio.run(coro)  # type: ignore[arg-type]


def counts_line(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "-"
