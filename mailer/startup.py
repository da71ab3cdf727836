"""Start-up that explains itself: each dependency tried with backoff for a bounded time.

``mailer run`` waits for PostgreSQL and NATS for at most ``MAILER_STARTUP_TIMEOUT_SECONDS``
(together), one WARNING line per failed attempt naming the dependency, where it was looked
for (secrets masked) and why it failed. A failure that waiting cannot cure (an unknown
database, refused credentials, a JetStream that is off, an HTTP port in use) gives up at
once. Giving up raises ``StartupError``: the CLI prints its one line and exits
``EXIT_STARTUP`` (3) — distinct from 1 (the supervisor gave up) and 2 (bad configuration),
and never with a traceback. Redis is not waited for (sending fails open without it; a
WARNING says so) nor SMTP (its failures are per send, see ``mailer.smtphealth``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Final, TypeVar

import asyncpg

__all__ = [
    "EXIT_STARTUP",
    "Deadline",
    "StartupError",
    "describe",
    "retry_until",
]

log = logging.getLogger("mailer.startup")

T = TypeVar("T")

EXIT_STARTUP: Final = 3

# Waits between attempts: 0.5 s doubling to 5 s (within the deadline).
_FIRST_WAIT: Final = 0.5
_MAX_WAIT: Final = 5.0

# PostgreSQL answers that waiting will not change: give up at once.
_PG_FATAL: Final = (
    asyncpg.InvalidCatalogNameError,  # unknown database
    asyncpg.InvalidPasswordError,
    asyncpg.InvalidAuthorizationSpecificationError,  # unknown role, pg_hba refuses
)


class StartupError(Exception):
    """A dependency could not be reached (or used) at start; the process exits 3."""

    def __init__(self, dependency: str, target: str, cause: str, *, waited: float | None) -> None:
        self.dependency = dependency
        self.target = target
        self.cause = cause
        within = f" within {waited:.0f} s" if waited is not None else ""
        super().__init__(f"{dependency} at {target} not usable{within}: {cause}")


class Deadline:
    """The one start-up budget every dependency's waiting shares."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._end = asyncio.get_running_loop().time() + seconds

    def remaining(self) -> float:
        return max(0.0, self._end - asyncio.get_running_loop().time())


def describe(exc: BaseException) -> str:
    """A cause for one log line: the exception's class and message, no traceback."""
    text = str(exc).strip() or "no detail"
    if isinstance(exc, TimeoutError):
        text = "timed out"
    return f"{type(exc).__name__}: {text}"


async def retry_until(
    dependency: str,
    target: str,
    attempt: Callable[[], Awaitable[T]],
    deadline: Deadline,
    *,
    fatal: tuple[type[BaseException], ...] = _PG_FATAL,
    cut: bool = True,
) -> T:
    """Calls ``attempt`` until it succeeds, a ``fatal`` error, or the deadline.

    Each attempt gets what is left of the deadline (``cut=False``: an attempt
    bounded by its own timeouts runs to its end, so one begun just before the
    deadline is not cut halfway); a failure is logged (one WARNING line naming
    the dependency, ``target`` — already masked — the attempt's number and the
    cause) and retried after a growing wait.
    """
    wait = _FIRST_WAIT
    n = 0
    while True:
        n += 1
        try:
            if not cut:
                return await attempt()
            return await asyncio.wait_for(attempt(), timeout=max(0.1, deadline.remaining()))
        except fatal as exc:
            raise StartupError(dependency, target, describe(exc), waited=None) from None
        except Exception as exc:
            left = deadline.remaining()
            if left <= 0:
                raise StartupError(
                    dependency, target, describe(exc), waited=deadline.seconds
                ) from None
            pause = min(wait, left)
            log.warning(
                "waiting for %s",
                dependency,
                extra={
                    "dependency": dependency,
                    "target": target,
                    "attempt": n,
                    "cause": describe(exc),
                    "retry_in_s": round(pause, 2),
                },
            )
            await asyncio.sleep(pause)
            wait = min(wait * 2, _MAX_WAIT)
