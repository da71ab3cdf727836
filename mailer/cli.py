"""The ``mailer`` command (Click): the service's commands, and the client's.

- ``mailer run``      the service against the configured NATS/PostgreSQL/Redis/SMTP
- ``mailer migrate``  applies the database migrations and exits
- ``mailer dev``      the service on the embedded stack (any MAILER_*_URL set wins)
- ``mailer demo``     dev stack + service + a sample campaign sent end to end
- ``mailer campaign|recipients|status|watch|quota|limits|unsubscribe|audit|events|ping``:
  a client of the NATS API (``mailer.commands``)

Exit codes of the service's commands: 0 normal, 1 the supervisor gave up
(restart intensity exceeded: let the orchestrator restart the pod), 2 bad
configuration (or a usage error), 3 start-up failed (a dependency not reachable
within MAILER_STARTUP_TIMEOUT_SECONDS, or unusable: see ``mailer.startup``).
The client's are in ``mailer.commands.common``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import click

from mailer import __version__
from mailer.actors import SupervisorEscalation
from mailer.commands import register as register_commands
from mailer.config import ConfigError, Settings, load_settings, mask_url
from mailer.db import migrate
from mailer.logs import check_salt, configure_logging
from mailer.service import Service
from mailer.startup import EXIT_STARTUP, Deadline, StartupError, retry_until

__all__ = ["main", "serve"]

log = logging.getLogger("mailer.cli")

EXIT_ESCALATED = 1
EXIT_CONFIG = 2


async def serve(service: Service, *, until: Callable[[], Awaitable[object]] | None = None) -> int:
    """Runs a started service until SIGTERM/SIGINT, ``until`` returns, or escalation."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    waiters: list[asyncio.Task[object]] = [
        asyncio.ensure_future(stop.wait()),
        asyncio.ensure_future(service.wait()),
    ]
    if until is not None:
        waiters.append(asyncio.ensure_future(until()))
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    await service.stop()
    for task in done:
        if not task.cancelled() and isinstance(task.exception(), SupervisorEscalation):
            log.error("supervisor gave up: exiting non-zero so the pod is restarted")
            return EXIT_ESCALATED
        if not task.cancelled() and task.exception() is not None:
            raise task.exception()  # type: ignore[misc]
    return 0


async def _start_unless_stopped(service: Service, settings: Settings) -> bool:
    """Starts the service in a task of its own; True once started, False when a SIGTERM
    or SIGINT came first (a pod stopped while migrating or starting).

    The signal does not cancel the caller: it cancels the start-up task and the caller
    goes on to stop the service. A cancellation can be swallowed on its way through
    the libraries (seen under load: the leader up, a child's cancelled start never
    ending, the process never stopping); here the caller does not depend on it: it
    waits for the start-up to end at most the shutdown timeout, then stops all the
    same. The handlers stay once started, until serve() replaces them with no await
    in between: removed, they would leave a moment with the default action, in which a
    SIGTERM kills the process (-15) instead of stopping it.
    """
    loop = asyncio.get_running_loop()
    asked = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, asked.set)

    async def start() -> None:
        await service.start(migrate_first=True)
        if settings.fault_injection:
            from mailer.faults import install

            await install(service.bus, service.supervisor, settings.effective_instance_id)

    starting = asyncio.ensure_future(start())
    stop = asyncio.ensure_future(asked.wait())
    try:
        await asyncio.wait([starting, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop.cancel()
    if not asked.is_set():
        starting.result()  # a start-up failure (StartupError...) raises here
        return True
    starting.cancel()
    await asyncio.wait([starting], timeout=settings.shutdown_timeout_seconds)
    if starting.done() and not starting.cancelled():
        starting.exception()  # retrieved: a start-up cut short is no error to report
    else:
        log.warning("start-up still running at the stop; stopping all the same")
    return False


async def _run(settings: Settings) -> int:
    missing = [
        name
        for name, value in (
            ("MAILER_NATS_URL", settings.nats_url),
            ("MAILER_DATABASE_URL", settings.database_url),
            ("MAILER_REDIS_URL", settings.redis_url),
            ("MAILER_SMTP_HOST", settings.smtp_host),
        )
        if not value
    ]
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set for `mailer run` (or use `mailer dev`)"
        )
    service = Service(settings)
    try:
        started = await _start_unless_stopped(service, settings)
    except StartupError:
        await service.stop()
        raise
    if not started:
        await service.stop()
        return 0
    return await serve(service)


async def _migrate(settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("MAILER_DATABASE_URL must be set")
    deadline = Deadline(settings.startup_timeout_seconds)
    target = mask_url(settings.database_url)
    applied = await retry_until(
        "postgres", target, lambda: migrate(settings.database_url), deadline
    )
    print(f"migrations applied: {applied or 'none (up to date)'}")
    return 0


async def _dev(settings: Settings) -> int:
    from mailer.devrun import run_dev

    return await run_dev(settings)


async def _demo(settings: Settings, *, recipients: int) -> int:
    from mailer.demo import run_demo

    return await run_demo(settings, recipients=recipients)


def _service_command(name: str, help_text: str) -> Callable[[Callable[..., Any]], click.Command]:
    """A command that runs the service (or a part of it) on this process's settings."""

    def wrap(f: Callable[..., Coroutine[Any, Any, int]]) -> click.Command:
        def command(**args: Any) -> None:
            raise SystemExit(_serve_command(lambda settings: f(settings, **args)))

        command.__doc__ = help_text
        return root.command(name, help=help_text)(command)

    return wrap


@click.group(
    name="mailer",
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
    help="Email-campaign engine of the CRM: the service, and a client of its NATS API.\n\n"
    "Client commands connect with MAILER_NATS_URL (and MAILER_NATS_*, "
    "MAILER_SUBJECT_PREFIX); `mailer dev` prints the line to export.",
)
@click.version_option(__version__, "--version", "-V", prog_name="mailer")
def root() -> None:
    pass


def _serve_command(make: Callable[[Settings], Coroutine[Any, Any, int]]) -> int:
    try:
        settings = load_settings()
        check_salt(settings.env, settings.log_hash_salt)
    except (ConfigError, ValueError) as exc:
        print(f"mailer: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    configure_logging(
        level=settings.log_level,
        json=settings.json_logs,
        full_emails=settings.log_full_emails,
        hash_salt=settings.log_hash_salt,
    )
    try:
        import uvloop

        return uvloop.run(make(settings))
    except ConfigError as exc:
        print(f"mailer: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except StartupError as exc:
        # One clear line, in the logs (JSON in production) and on stderr; no traceback.
        log.error("start-up failed; exiting %d", EXIT_STARTUP, extra={"error": str(exc)})
        print(f"mailer: start-up failed: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except KeyboardInterrupt:
        return 130


_service_command("run", "Run the service against the configured NATS/PostgreSQL/Redis/SMTP.")(_run)
_service_command("migrate", "Apply the database migrations and exit.")(_migrate)
_service_command(
    "dev", "Run the service on the embedded dev stack; prints the line a second terminal exports."
)(_dev)
click.option(
    "--recipients",
    type=click.IntRange(1, 5000),
    default=25,
    show_default=True,
    help="How many sample recipients.",
)(
    _service_command(
        "demo", "Send a sample campaign end to end on the dev stack (exit 0: all sent)."
    )(_demo)
)
register_commands(root)


def main(argv: list[str] | None = None) -> int:
    """Runs ``mailer`` with ``argv`` (default: the process's); returns the exit code."""
    try:
        root.main(args=argv, prog_name="mailer", standalone_mode=True)
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
