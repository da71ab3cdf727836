"""The circuit breaker of one SMTP account: the whole process backs off a dead server.

closed     every send goes out; consecutive transient failures are counted,
           any success resets the count;
open       after ``threshold`` consecutive transient failures: nothing is sent
           for ``cooldown``; sends are answered "transient, not attempted" at once;
half-open  after the cooldown one probe batch goes out: a success closes the
           breaker, a failure opens it again for another cooldown.

Campaigns have their own count (queue_entry.consecutive_transient_errors),
which pauses one campaign; this one protects the server and shows in metrics.
"""

from __future__ import annotations

import enum
import logging
from datetime import datetime, timedelta

from mailer import metrics

__all__ = ["BreakerState", "CircuitBreaker"]

log = logging.getLogger("mailer.breaker")


class BreakerState(enum.IntEnum):
    # The values are the gauge's: 0 closed, 1 half-open, 2 open.
    CLOSED = metrics.CIRCUIT_CLOSED
    HALF_OPEN = metrics.CIRCUIT_HALF_OPEN
    OPEN = metrics.CIRCUIT_OPEN


class CircuitBreaker:
    def __init__(self, account: str, *, threshold: int, cooldown: timedelta) -> None:
        self.account = account
        self.threshold = threshold
        self.cooldown = cooldown
        self.failures = 0
        self.state = BreakerState.CLOSED
        self.open_until: datetime | None = None
        self._publish()

    def allow(self, now: datetime) -> bool:
        """May a batch go out now? Moves open -> half-open when the cooldown is over."""
        if self.state is BreakerState.OPEN:
            assert self.open_until is not None
            if now < self.open_until:
                return False
            self._set(BreakerState.HALF_OPEN)
        return True

    def blocked_until(self, now: datetime) -> datetime | None:
        """When an open breaker lets the next probe through; None when sends may go now."""
        until = self.open_until
        if self.state is BreakerState.OPEN and until is not None and now < until:
            return until
        return None

    def record(self, *, successes: int, transient_failures: int, now: datetime) -> None:
        """Feeds one batch's results (the order inside a batch is not known)."""
        if successes:
            self.failures = 0
            if self.state is not BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)
            return
        if not transient_failures:
            return
        self.failures += transient_failures
        if self.state is BreakerState.HALF_OPEN or self.failures >= self.threshold:
            self.open_until = now + self.cooldown
            self._set(BreakerState.OPEN)

    def _set(self, state: BreakerState) -> None:
        if state is not self.state:
            log.warning(
                "smtp circuit breaker %s",
                state.name.lower(),
                extra={"provider": self.account, "consecutive_failures": self.failures},
            )
        self.state = state
        self._publish()

    def _publish(self) -> None:
        metrics.CIRCUIT_BREAKER_STATE.labels(account=self.account).set(int(self.state))
