"""The ``mailer`` command: run, migrate, dev, demo.

- ``mailer run``      the service against the configured NATS/PostgreSQL/Redis/SMTP
- ``mailer migrate``  applies the database migrations and exits
- ``mailer dev``      the service on the embedded stack (any MAILER_*_URL set wins)
- ``mailer demo``     dev stack + service + a sample campaign sent end to end

Exit codes: 0 normal, 1 the supervisor gave up (restart intensity exceeded:
let the orchestrator restart the pod), 2 bad configuration.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from typing import Any

from mailer.actors import SupervisorEscalation
from mailer.config import ConfigError, Settings, load_settings
from mailer.db import migrate
from mailer.logs import check_salt, configure_logging
from mailer.service import Service

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


@contextlib.contextmanager
def _cancel_on_signals() -> Iterator[None]:
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, task.cancel)
    try:
        yield
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)


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
        # Until serve() takes over, a SIGTERM (a pod stopped while migrating
        # or starting) cancels the start-up instead of being ignored.
        with _cancel_on_signals():
            await migrate(settings.database_url)
            await service.start()
            if settings.fault_injection:
                from mailer.faults import install

                await install(service.bus, service.supervisor, settings.effective_instance_id)
    except asyncio.CancelledError:
        await service.stop()
        return 0
    return await serve(service)


async def _migrate(settings: Settings) -> int:
    if not settings.database_url:
        raise ConfigError("MAILER_DATABASE_URL must be set")
    applied = await migrate(settings.database_url)
    print(f"migrations applied: {applied or 'none (up to date)'}")
    return 0


async def _dev(settings: Settings) -> int:
    from mailer.devrun import run_dev

    return await run_dev(settings)


async def _demo(settings: Settings, recipients: int) -> int:
    from mailer.demo import run_demo

    return await run_demo(settings, recipients=recipients)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mailer", description="Email-campaign engine of the CRM")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="run the service against configured servers")
    sub.add_parser("migrate", help="apply database migrations")
    sub.add_parser("dev", help="run the service on the embedded dev stack")
    demo = sub.add_parser("demo", help="send a sample campaign end to end on the dev stack")
    demo.add_argument("--recipients", type=int, default=25)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
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
    commands: dict[str, Callable[[], Coroutine[Any, Any, int]]] = {
        "run": lambda: _run(settings),
        "migrate": lambda: _migrate(settings),
        "dev": lambda: _dev(settings),
        "demo": lambda: _demo(settings, args.recipients),
    }
    try:
        import uvloop

        return uvloop.run(commands[args.command]())
    except ConfigError as exc:
        print(f"mailer: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
