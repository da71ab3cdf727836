"""Structured logging and the PII policy of mailer.

Everything about how an email address may appear in a log line is decided here, so the
rest of the code never formats an address itself:

* ``email_fields(addr)`` gives the fields allowed at INFO: ``email_domain``,
  ``email_masked`` (``jo***@company.com``) and ``email_hash`` (salted HMAC, so support can
  find every line about one address without the address being in the logs).
* ``debug_email_fields(addr)`` gives ``{"email": addr}`` only when full addresses are
  allowed (DEBUG level and ``MAILER_LOG_FULL_EMAILS=true``), ``{}`` otherwise.
* A filter on the handler is the safety net: whatever slipped through (an address in a
  message, in an argument, in an exception text, in an extra field) is masked before the
  record is written, and ``email_hash`` is dropped from WARNING and above, which carry only
  masked + domain (MISSION, "Logging, privacy, security").

Usage::

    log = logging.getLogger(__name__)
    log.info("sent", extra={**email_fields(addr), "campaign_id": 3, "took_ms": 12.5})
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json as jsonlib
import logging
import re
import sys
import traceback
from collections.abc import Mapping
from dataclasses import dataclass
from typing import IO, Any, Final

from mailer.clock import Clock, SystemClock

__all__ = [
    "DEFAULT_HASH_SALT",
    "KNOWN_FIELDS",
    "EmailRedactionFilter",
    "JsonFormatter",
    "LineFormatter",
    "LogLimiter",
    "check_salt",
    "configure_logging",
    "debug_email_fields",
    "email_fields",
    "email_hash",
    "mask_email",
    "redact_emails",
]

DEFAULT_HASH_SALT: Final = "mailer-dev-salt-change-me"
MIN_SALT_LENGTH: Final = 16

# The fields the MISSION names. Any other ``extra=`` field is emitted too; this tuple is
# documentation for callers and dashboards (Loki/Elastic field mappings), not a whitelist.
KNOWN_FIELDS: Final = (
    "campaign_id",
    "queue_id",
    "recipient_id",
    "email_domain",
    "email_masked",
    "email_hash",
    "smtp_message_id",
    "provider",
    "took_ms",
    "rate_limit_count",
    "suppressed",
    "defer_reason",
    "deferred_until",
    "policy",
)

# Attributes every LogRecord has; whatever else sits in ``record.__dict__`` came from
# ``extra=`` and is a structured field. ``message``/``asctime`` are set by Formatter.format
# and ``taskName`` exists from Python 3.12 on.
_RECORD_ATTRS: Final = frozenset(
    logging.LogRecord("", logging.INFO, "", 0, "", (), None).__dict__
) | {"message", "asctime", "taskName"}

# Marks the handler configure_logging installs, so a second call replaces it instead of
# adding a duplicate (tests and `mailer dev` call configure_logging more than once).
_HANDLER_MARK: Final = "_mailer_logs_handler"

# Looks-like-an-email, for the safety net only (validation lives elsewhere). ``\w`` is
# Unicode-aware, so Cyrillic/IDN addresses (иван@пример.рф) are caught too. The local part
# deliberately excludes quotes, ``=``, ``:`` and ``/`` so that ``email='a@b.c'`` or
# ``mailto:a@b.c`` masks only the address, not its surroundings. ``*`` is included so a
# mask we produced is seen whole and recognised by _ALREADY_MASKED instead of half-matched.
_EMAIL_RE: Final = re.compile(r"[\w.+%!#$&*^~-]+@(?:[\w-]+\.)+[\w-]{2,}")
# Exactly what mask_email produces: one or two visible characters then "***".
_ALREADY_MASKED: Final = re.compile(r"[^@]{1,2}\*\*\*")

# Extra fields the filter leaves alone: masks are already safe, and a Message-ID
# (<id@host>) looks like an address but is not PII and must stay exact to be searchable
# in the provider's logs.
_NOT_REDACTED_FIELDS: Final = frozenset({"email_masked", "smtp_message_id"})

# Containers in extra fields are walked to this depth; deeper structures are rare in logs
# and the bound keeps a self-referencing structure from recursing forever.
_MAX_REDACT_DEPTH: Final = 4


class _State:
    """Process-wide settings from configure_logging, read by the helpers below."""

    hash_salt: str = DEFAULT_HASH_SALT
    full_emails: bool = False


# ---------------------------------------------------------------------------------------
# PII helpers
# ---------------------------------------------------------------------------------------


def _split(address: str) -> tuple[str, str]:
    address = address.strip()
    local, at, domain = address.rpartition("@")
    if not at:
        return "", ""
    return local, domain.lower()


def mask_email(address: str) -> str:
    """``john@Company.com`` → ``jo***@company.com``; ``j@x.ru`` → ``j***@x.ru``.

    At most two characters of the local part stay visible, and never all of a local part
    longer than one character (``jo@x.ru`` → ``j***@x.ru``): otherwise short addresses
    would be logged in full. Something without ``@`` masks to ``***``.
    """
    local, domain = _split(address)
    if not local and not domain:
        return "***"
    visible = local[: min(2, max(1, len(local) - 1))]
    return f"{visible}***@{domain}"


def email_hash(address: str, *, salt: str | None = None) -> str:
    """Salted HMAC-SHA256 of the lowercased address, first 16 hex chars.

    HMAC with a secret salt, not a bare hash, because a bare hash of an email address is
    reversible by hashing a list of known addresses. 64 bits are plenty to correlate log
    lines and short enough to read.
    """
    key = (salt if salt is not None else _State.hash_salt).encode()
    msg = address.strip().lower().encode()
    return hmac.new(key, msg, hashlib.sha256).hexdigest()[:16]


def email_fields(address: str) -> dict[str, str]:
    """The only way to put an address into a log record: domain, masked form and hash."""
    _, domain = _split(address)
    return {
        "email_domain": domain,
        "email_masked": mask_email(address),
        "email_hash": email_hash(address),
    }


def debug_email_fields(address: str) -> dict[str, str]:
    """``{"email": address}`` when full addresses may be logged, else ``{}``.

    Meant for DEBUG lines; even if used at a higher level, the filter masks the value.
    """
    if _State.full_emails:
        return {"email": address}
    return {}


def redact_emails(text: str) -> str:
    """Replace every address-looking substring with its masked form."""
    if "@" not in text:  # fast path: the overwhelming majority of log lines
        return text

    def _mask(match: re.Match[str]) -> str:
        found = match.group(0)
        local = found.rpartition("@")[0]
        if _ALREADY_MASKED.fullmatch(local):
            return found
        return mask_email(found)

    return _EMAIL_RE.sub(_mask, text)


def check_salt(env: str, salt: str) -> None:
    """Refuse to run production with the default or a short hash salt.

    With a known salt the email hashes in the logs can be reversed by brute force over
    address lists, which would make them PII again.
    """
    if env.strip().lower() != "production":
        return
    if salt == DEFAULT_HASH_SALT:
        raise ValueError(
            "MAILER_LOG_HASH_SALT is the development default; set a secret salt in production"
        )
    if len(salt) < MIN_SALT_LENGTH:
        raise ValueError(
            f"MAILER_LOG_HASH_SALT must be at least {MIN_SALT_LENGTH} characters in production"
        )


# ---------------------------------------------------------------------------------------
# The safety-net filter
# ---------------------------------------------------------------------------------------


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact_emails(value)
    if isinstance(value, bool | int | float | None | dt.datetime | dt.date):
        return value  # cannot hold an address; keep the type for the JSON output
    if depth >= _MAX_REDACT_DEPTH:
        return value
    # Containers are rebuilt only when something inside changed, so clean values keep
    # their identity and type.
    if isinstance(value, Mapping):
        mapped = {k: _redact_value(v, depth + 1) for k, v in value.items()}
        return value if all(mapped[k] is v for k, v in value.items()) else mapped
    if isinstance(value, list | tuple | set | frozenset):
        items = [_redact_value(v, depth + 1) for v in value]
        return value if all(a is b for a, b in zip(items, value, strict=True)) else items
    # Arbitrary objects end up as str() in the output, so look at that; replace the
    # object only when its text really contains an address, to keep types otherwise.
    try:
        text = str(value)
    except Exception:
        return value
    redacted = redact_emails(text)
    return value if redacted == text else redacted


class EmailRedactionFilter(logging.Filter):
    """Masks addresses in records that may not carry them; drops ``email_hash`` at WARNING+.

    Installed on the handler, so it sees every record that is written, whichever logger
    emitted it (libraries such as aiosmtplib included). It never rejects a record and never
    raises: a logging call must not fail because of the privacy net.
    """

    def __init__(self, *, full_emails: bool) -> None:
        super().__init__()
        self.full_emails = full_emails

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            self._apply(record)
        except Exception:  # pragma: no cover - defensive: never break the caller's log call
            record.msg = "<log record dropped by email redaction filter: it could not be redacted>"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True

    def _apply(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            record.__dict__.pop("email_hash", None)
        if record.levelno <= logging.DEBUG and self.full_emails:
            return

        self._redact_message(record)

        for key, value in list(record.__dict__.items()):
            if key in _RECORD_ATTRS or key in _NOT_REDACTED_FIELDS:
                continue
            record.__dict__[key] = _redact_value(value)

        if record.exc_info and not record.exc_text:
            # Formatter.format reuses exc_text when set, so rendering the traceback here
            # makes every formatter print the redacted one (SMTP errors quote addresses).
            record.exc_text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
        if record.exc_text:
            record.exc_text = redact_emails(record.exc_text)
        if record.stack_info:
            record.stack_info = redact_emails(record.stack_info)

    @staticmethod
    def _redact_message(record: logging.LogRecord) -> None:
        try:
            message = record.getMessage()
        except Exception:
            # Broken %-args: let the handler report the formatting error as usual, but
            # still mask what can be masked.
            if isinstance(record.msg, str):
                record.msg = redact_emails(record.msg)
            if isinstance(record.args, tuple):
                record.args = tuple(_redact_value(a) for a in record.args)
            return
        redacted = redact_emails(message)
        if redacted != message:
            # Freeze the already-merged, masked text: args may be objects whose str()
            # holds an address, which masking them one by one would miss.
            record.msg = redacted
            record.args = ()


# ---------------------------------------------------------------------------------------
# Formatters
# ---------------------------------------------------------------------------------------


def _timestamp(record: logging.LogRecord, *, millis: bool) -> str:
    when = dt.datetime.fromtimestamp(record.created, tz=dt.UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if millis:
        text += f".{int(record.msecs):03d}"
    return text + "Z"


def _extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, set | frozenset):
        return sorted(value, key=str)
    return str(value)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: timestamp, level, logger, message, extras, exception."""

    _BASE: Final = ("timestamp", "level", "logger", "message")

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "timestamp": _timestamp(record, millis=True),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in _extra_fields(record).items():
            # An extra named like a base key must not overwrite it (or hide the level).
            payload[f"extra_{key}" if key in payload else key] = value
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exception"] = record.exc_text
        if record.stack_info:
            payload["stack"] = self.formatStack(record.stack_info)
        return jsonlib.dumps(payload, ensure_ascii=False, default=_json_default)


def _line_value(value: Any) -> str:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        text = value.isoformat()
    elif isinstance(value, str):
        text = value
    else:
        text = str(value)
    if not text or any(c.isspace() or c in "\"'=" for c in text):
        return jsonlib.dumps(text, ensure_ascii=False)
    return text


class LineFormatter(logging.Formatter):
    """``2026-11-22T10:00:00Z INFO mailer.campaign sent batch campaign_id=3 took_ms=12.5``."""

    def format(self, record: logging.LogRecord) -> str:
        # Newlines in the message are escaped so one record stays one line and a value
        # cannot forge a line of its own; tracebacks follow on their own lines.
        message = record.getMessage().replace("\r", "\\r").replace("\n", "\\n")
        parts = [_timestamp(record, millis=False), record.levelname, record.name, message]
        parts.extend(f"{k}={_line_value(v)}" for k, v in _extra_fields(record).items())
        line = " ".join(parts)
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            line += "\n" + record.exc_text
        if record.stack_info:
            line += "\n" + self.formatStack(record.stack_info)
        return line


# ---------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------


def _parse_level(level: str) -> int:
    name = level.strip().upper()
    if name == "WARN":
        name = "WARNING"
    levels = logging.getLevelNamesMapping()
    if name not in levels:
        raise ValueError(f"unknown log level {level!r}")
    return levels[name]


def configure_logging(
    *,
    level: str,
    json: bool,
    full_emails: bool,
    hash_salt: str,
    stream: IO[str] | None = None,
) -> None:
    """Configure the root logger; calling again replaces the previous configuration.

    ``stream`` defaults to stderr so commands that print results on stdout stay pipeable;
    Kubernetes collects both streams.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        if getattr(handler, _HANDLER_MARK, False):
            root.removeHandler(handler)
            handler.close()

    _State.hash_salt = hash_salt
    _State.full_emails = full_emails

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    setattr(handler, _HANDLER_MARK, True)
    handler.setFormatter(JsonFormatter() if json else LineFormatter())
    handler.addFilter(EmailRedactionFilter(full_emails=full_emails))
    root.addHandler(handler)
    root.setLevel(_parse_level(level))


# ---------------------------------------------------------------------------------------
# Rate-limited lines
# ---------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Slot:
    last: dt.datetime
    suppressed: int = 0


class LogLimiter:
    """At most one line per ``key`` every ``every`` seconds; the rest are counted, not written.

    For failures that repeat as fast as they are retried (an SMTP server refusing every
    connection): the first line of a key goes out at once, later ones within ``every``
    seconds are dropped, and the next line written for that key carries
    ``suppressed=<how many were dropped>``. Keys must come from a small closed set (a cause,
    not an address): one slot is kept per key. The records go through the handler's PII
    filter like any other.
    """

    def __init__(
        self, logger: logging.Logger, *, every: float = 30.0, clock: Clock | None = None
    ) -> None:
        self._logger = logger
        self._every = dt.timedelta(seconds=every)
        self._clock: Clock = clock or SystemClock()
        self._slots: dict[str, _Slot] = {}

    def log(self, level: int, key: str, msg: str, *, extra: Mapping[str, Any]) -> bool:
        """Writes the line unless ``key`` had one less than ``every`` ago; True if written."""
        now = self._clock.now()
        slot = self._slots.get(key)
        if slot is not None and now - slot.last < self._every:
            slot.suppressed += 1
            return False
        suppressed = slot.suppressed if slot is not None else 0
        self._slots[key] = _Slot(last=now)
        self._logger.log(level, msg, extra={**extra, "suppressed": suppressed})
        return True
