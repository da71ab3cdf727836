"""``python -m tests.fault_worker``: ``mailer run`` with an actor that always crashes.

The scheduler crashes on every message it handles (the runtime's fault hook,
which production never sets), under a small restart intensity: the supervisor
gives up within a second and the process must exit 1, as ``mailer run`` does.
"""

from __future__ import annotations

import asyncio
import sys

from mailer.actors import RestartPolicy
from mailer.cli import serve
from mailer.config import load_settings
from mailer.logs import configure_logging
from mailer.service import Service


async def _crash_the_scheduler(name: str, message: object) -> None:
    if name == "scheduler":
        raise RuntimeError("injected crash of the scheduler")


async def _run() -> int:
    settings = load_settings()
    service = Service(
        settings,
        actor_fault=_crash_the_scheduler,
        restart_policy=RestartPolicy(
            max_restarts=3, window_seconds=60.0, backoff_base=0.01, backoff_max=0.05
        ),
    )
    await service.start()
    return await serve(service)


if __name__ == "__main__":
    s = load_settings()
    configure_logging(level=s.log_level, json=False, full_emails=False, hash_salt=s.log_hash_salt)
    sys.exit(asyncio.run(_run()))
