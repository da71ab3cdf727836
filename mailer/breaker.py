"""The circuit breaker of one SMTP account: the whole process backs off a dead server.

closed     every send goes out; consecutive transient failures are counted,
           any success resets the count;
open       after ``threshold`` consecutive transient failures: nothing is sent
           for ``cooldown``; sends are answered "transient, not attempted" at once;
half-open  after the cooldown one probe batch goes out (one campaign is told
           it may send it; the others wait for its verdict): a success closes
           the breaker, a failure opens it again for another cooldown.

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
    def __init__(
        self,
        account: str,
        *,
        threshold: int,
        cooldown: timedelta,
        probe_wait: timedelta = timedelta(seconds=30),
    ) -> None:
        self.account = account
        self.threshold = threshold
        self.cooldown = cooldown
        # How long others wait while one campaign sends the half-open probe,
        # and how long that campaign has to send it before another may.
        self.probe_wait = min(probe_wait, cooldown)
        self.failures = 0
        self.state = BreakerState.CLOSED
        self.open_until: datetime | None = None
        self._probe_promised_until: datetime | None = None  # a campaign may probe until then
        self._probing = False  # the probe batch is out
        self._publish()

    def blocked_until(self, now: datetime) -> datetime | None:
        """A campaign's check before it reserves tokens: until when to wait, or None.

        After the cooldown exactly one asker gets None and with it the probe
        (the next batch that goes out); the others wait ``probe_wait`` and look
        again, so a dead server costs them no tokens. A promised probe that
        never comes (the campaign was refused tokens) passes to the next asker.
        """
        if self.state is BreakerState.CLOSED:
            return None
        if self.state is BreakerState.OPEN:
            assert self.open_until is not None
            if now < self.open_until:
                return self.open_until
            self._set(BreakerState.HALF_OPEN)
        promised = self._probe_promised_until
        if not self._probing and (promised is None or now >= promised):
            self._probe_promised_until = now + self.probe_wait
            return None
        return now + self.probe_wait

    def allow(self, now: datetime) -> bool:
        """May a batch go out now? After the cooldown, one batch: the probe."""
        if self.state is BreakerState.CLOSED:
            return True
        if self.state is BreakerState.OPEN:
            assert self.open_until is not None
            if now < self.open_until:
                return False
            self._set(BreakerState.HALF_OPEN)
        if self._probing:
            return False
        self._probing, self._probe_promised_until = True, None
        return True

    def record(self, *, successes: int, transient_failures: int, now: datetime) -> None:
        """Feeds one batch's results (the order inside a batch is not known)."""
        probe, self._probing = self._probing, False
        if successes:
            self.failures = 0
            if self.state is not BreakerState.CLOSED:
                self._set(BreakerState.CLOSED)
            return
        if not transient_failures:
            return  # said nothing of the server (refused addresses): a probe may go again
        self.failures += transient_failures
        if probe or self.failures >= self.threshold:
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
