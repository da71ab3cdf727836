"""How the SMTP server's health is seen: connection failures by cause, logged and counted.

The transport reports every SMTP session it could not open (connect, TLS, EHLO, AUTH) and
every transaction that lost its connection without a reply (a timeout, a disconnect). Each
report

* counts in ``mailer_smtp_connection_errors_total{account,cause}``, cause one of
  connect / tls / auth / timeout / protocol (``connection_error_cause``);
* logs a WARNING with the server, the cause and the error, at most one line per cause
  every 30 s (a dead server is retried by every batch); the next line says how many were
  left out (``suppressed``). Error texts can quote an address (an AUTH user): the log
  filter masks them like any other (mailer.logs);
* sets ``mailer_dependency_up{dependency="smtp"}`` to 0. A session opened or a message
  accepted sets it back to 1; before any attempt it is 1 (no failure seen). SMTP is not
  probed by itself: opening a session per scrape would cost the provider a connection.

One ``SmtpHealth`` per process (per SMTP account): it outlives restarts of the sender.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterator
from typing import Final, Literal

from aiosmtplib import SMTPAuthenticationError, SMTPException, SMTPResponseException

from mailer import metrics
from mailer.clock import Clock
from mailer.logs import LogLimiter

__all__ = ["LOG_EVERY_SECONDS", "Cause", "SmtpHealth", "connection_error_cause"]

log = logging.getLogger("mailer.smtp")

Cause = Literal["connect", "tls", "auth", "timeout", "protocol"]
LOG_EVERY_SECONDS: Final = 30.0
_MAX_ERROR_TEXT: Final = 300


def _chain(exc: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def connection_error_cause(exc: BaseException) -> Cause:
    """The cause of a failed or lost SMTP session, looking through wrapped exceptions.

    tls: a TLS handshake or certificate failure, or STARTTLS refused; auth: the server
    refused the login, or offers no AUTH; timeout: no answer in time (connecting or
    reading); protocol: the server answered, but not as SMTP requires (a refusing greeting,
    EHLO/HELO refused, a reply where none was due); connect: no TCP connection, or it was
    lost. Anything unrecognised is "protocol".
    """
    chain = list(_chain(exc))
    if any(isinstance(e, ssl.SSLError | ssl.CertificateError) for e in chain):
        return "tls"
    if any(isinstance(e, SMTPAuthenticationError) for e in chain):
        return "auth"
    if any(isinstance(e, TimeoutError) for e in chain):
        return "timeout"
    for e in chain:
        if type(e) is SMTPException:  # aiosmtplib's plain refusals name what is missing
            text = str(e)
            if "TLS" in text:
                return "tls"
            if "AUTH" in text:
                return "auth"
    if any(isinstance(e, SMTPResponseException) for e in chain):
        return "protocol"
    if any(isinstance(e, OSError) for e in chain):  # ConnectionError, SMTPConnectError, ...
        return "connect"
    return "protocol"


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= _MAX_ERROR_TEXT else text[: _MAX_ERROR_TEXT - 1] + "…"


class SmtpHealth:
    def __init__(self, host: str, port: int, *, account: str, clock: Clock | None = None) -> None:
        self.host = host
        self.port = port
        self.account = account
        metrics.smtp_error_series(account)
        self._log = LogLimiter(log, every=LOG_EVERY_SECONDS, clock=clock)
        self._up = True

    @property
    def up(self) -> bool:
        """False after a connection failure, until a session opens or a message is accepted."""
        return self._up

    def failed(self, exc: BaseException, *, stage: str) -> Cause:
        """A session could not be opened (``stage`` "connect") or was lost at ``stage``."""
        cause = connection_error_cause(exc)
        metrics.SMTP_CONNECTION_ERRORS.labels(account=self.account, cause=cause).inc()
        self._set(False)
        self._log.log(
            logging.WARNING,
            cause,
            "SMTP connection failed",
            extra={
                "smtp_host": self.host,
                "smtp_port": self.port,
                "provider": self.account,
                "cause": cause,
                "stage": stage,
                "error": _error_text(exc),
            },
        )
        return cause

    def succeeded(self) -> None:
        """A session opened, or the server answered a transaction."""
        if not self._up:
            log.info(
                "SMTP connection works again",
                extra={"smtp_host": self.host, "smtp_port": self.port, "provider": self.account},
            )
        self._set(True)

    def _set(self, up: bool) -> None:
        self._up = up
        metrics.DEPENDENCY_UP.labels(dependency="smtp").set(int(up))
