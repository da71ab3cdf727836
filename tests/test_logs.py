"""Structured logging and the PII policy (MISSION: "Logging, privacy, security")."""

from __future__ import annotations

import datetime as dt
import io
import json
import logging
from collections.abc import Iterator

import pytest

from mailer import logs
from mailer.logs import (
    DEFAULT_HASH_SALT,
    check_salt,
    configure_logging,
    debug_email_fields,
    email_fields,
    email_hash,
    mask_email,
    redact_emails,
)

SALT = "test-salt-0123456789abcdef"
log = logging.getLogger("mailer.test")


@pytest.fixture(autouse=True)
def _restore_root_logger() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back after every test."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    salt, full = logs._State.hash_salt, logs._State.full_emails
    yield
    for handler in list(root.handlers):
        if handler not in handlers:
            root.removeHandler(handler)
    root.setLevel(level)
    logs._State.hash_salt, logs._State.full_emails = salt, full


def _setup(*, json_out: bool = True, level: str = "DEBUG", full: bool = False) -> io.StringIO:
    stream = io.StringIO()
    configure_logging(level=level, json=json_out, full_emails=full, hash_salt=SALT, stream=stream)
    return stream


def _records(stream: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in stream.getvalue().splitlines() if line]


# -- formats ------------------------------------------------------------------------------


def test_json_lines_carry_base_keys_and_extra_fields() -> None:
    stream = _setup()
    until = dt.datetime(2026, 11, 22, 9, 0, tzinfo=dt.UTC)
    log.info(
        "sent batch",
        extra={
            "campaign_id": 3,
            "took_ms": 12.5,
            "defer_reason": "rate_per_hour",
            "deferred_until": until,
            "anything_else": ["a", 1],
        },
    )
    (rec,) = _records(stream)
    assert rec["level"] == "INFO"
    assert rec["logger"] == "mailer.test"
    assert rec["message"] == "sent batch"
    assert rec["campaign_id"] == 3
    assert rec["took_ms"] == 12.5
    assert rec["defer_reason"] == "rate_per_hour"
    assert rec["deferred_until"] == "2026-11-22T09:00:00+00:00"
    assert rec["anything_else"] == ["a", 1]
    stamp = str(rec["timestamp"])
    assert stamp.endswith("Z")
    parsed = dt.datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    assert abs((dt.datetime.now(dt.UTC) - parsed).total_seconds()) < 60


def test_json_exception_is_formatted() -> None:
    stream = _setup()
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("failed", extra={"campaign_id": 7})
    (rec,) = _records(stream)
    assert rec["level"] == "ERROR"
    assert "RuntimeError: boom" in str(rec["exception"])
    assert rec["campaign_id"] == 7


def test_extra_cannot_overwrite_base_keys() -> None:
    stream = _setup()
    log.warning("x", extra={"level": "fake"})
    (rec,) = _records(stream)
    assert rec["level"] == "WARNING"
    assert rec["extra_level"] == "fake"


def test_dev_line_format() -> None:
    stream = _setup(json_out=False)
    logging.getLogger("mailer.campaign").info(
        "sent batch", extra={"campaign_id": 3, "took_ms": 12.5, "note": "two words"}
    )
    line = stream.getvalue().rstrip("\n")
    assert "\n" not in line
    stamp, rest = line.split(" ", 1)
    dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ")
    assert rest == 'INFO mailer.campaign sent batch campaign_id=3 took_ms=12.5 note="two words"'


def test_dev_line_escapes_newlines_in_message() -> None:
    stream = _setup(json_out=False)
    log.info("line one\nfake 2026-01-01T00:00:00Z ERROR forged")
    assert len(stream.getvalue().splitlines()) == 1


def test_configure_logging_is_idempotent() -> None:
    _setup()
    stream = _setup()
    root = logging.getLogger()
    marked = [h for h in root.handlers if getattr(h, "_mailer_logs_handler", False)]
    assert len(marked) == 1
    log.info("once")
    assert len(_records(stream)) == 1


def test_level_is_applied_and_validated() -> None:
    stream = _setup(level="warning")
    log.info("hidden")
    log.warning("shown")
    assert [r["message"] for r in _records(stream)] == ["shown"]
    with pytest.raises(ValueError, match="unknown log level"):
        configure_logging(level="chatty", json=True, full_emails=False, hash_salt=SALT)


# -- PII helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "masked", "domain"),
    [
        ("john@company.com", "jo***@company.com", "company.com"),
        ("John.Smith@Company.COM", "Jo***@company.com", "company.com"),
        ("j@x.ru", "j***@x.ru", "x.ru"),
        ("jo@x.ru", "j***@x.ru", "x.ru"),  # never the whole local part
        ("иван@пример.рф", "ив***@пример.рф", "пример.рф"),
        ("Ёж@Почта.РФ", "Ё***@почта.рф", "почта.рф"),
        ("user@xn--e1afmkfd.xn--p1ai", "us***@xn--e1afmkfd.xn--p1ai", "xn--e1afmkfd.xn--p1ai"),
        (" padded@ex.org ", "pa***@ex.org", "ex.org"),
    ],
)
def test_email_fields_masking(address: str, masked: str, domain: str) -> None:
    fields = email_fields(address)
    assert fields["email_masked"] == masked
    assert fields["email_domain"] == domain
    assert len(fields["email_hash"]) == 16
    int(fields["email_hash"], 16)


def test_mask_without_at_sign() -> None:
    assert mask_email("not-an-address") == "***"


def test_hash_is_stable_case_insensitive_and_salt_dependent() -> None:
    a = email_hash("John@Company.com", salt=SALT)
    assert a == email_hash("john@company.com", salt=SALT)
    assert a == email_hash("john@company.com", salt=SALT)
    assert a != email_hash("john@company.com", salt=SALT + "x")
    assert a != email_hash("jane@company.com", salt=SALT)
    _setup()  # email_fields uses the configured salt
    assert email_fields("john@company.com")["email_hash"] == a


def test_redact_emails_leaves_masks_and_plain_text_alone() -> None:
    assert redact_emails("no address here") == "no address here"
    assert redact_emails("to jo***@company.com") == "to jo***@company.com"
    assert redact_emails("to j***@x.ru.") == "to j***@x.ru."
    assert redact_emails("email='john@company.com'") == "email='jo***@company.com'"
    assert redact_emails("mailto:иван@пример.рф,") == "mailto:ив***@пример.рф,"


def test_check_salt() -> None:
    with pytest.raises(ValueError, match="default"):
        check_salt("production", DEFAULT_HASH_SALT)
    with pytest.raises(ValueError, match="16"):
        check_salt("production", "short")
    check_salt("production", "a-long-enough-secret-salt")
    check_salt("development", DEFAULT_HASH_SALT)
    check_salt("test", "")


# -- the safety net -----------------------------------------------------------------------


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING, logging.ERROR])
def test_full_address_in_message_is_redacted_above_debug(level: int) -> None:
    stream = _setup(full=True)  # full_emails never applies above DEBUG
    log.log(level, "sent to john.smith@company.com")
    log.log(level, "sent to %s via %s", "иван@пример.рф", "smtp")
    log.log(level, "sent", extra={"to": "john.smith@company.com", "rcpts": ["a.b@c.de"]})
    text = stream.getvalue()
    assert "john.smith@" not in text
    assert "иван@" not in text
    assert "a.b@" not in text
    recs = _records(stream)
    assert recs[0]["message"] == "sent to jo***@company.com"
    assert recs[1]["message"] == "sent to ив***@пример.рф via smtp"
    assert recs[2]["to"] == "jo***@company.com"
    assert recs[2]["rcpts"] == ["a.***@c.de"]


def test_address_in_arbitrary_object_and_exception_is_redacted() -> None:
    class Rcpt:
        def __str__(self) -> str:
            return "Rcpt(john@company.com)"

    stream = _setup()
    log.info("rcpt %s", Rcpt(), extra={"obj": Rcpt()})
    try:
        raise ValueError("refused: john@company.com")
    except ValueError:
        log.error("smtp failed", exc_info=True)
    assert "john@" not in stream.getvalue()
    recs = _records(stream)
    assert recs[0]["message"] == "rcpt Rcpt(jo***@company.com)"
    assert recs[0]["obj"] == "Rcpt(jo***@company.com)"
    assert "refused: jo***@company.com" in str(recs[1]["exception"])


def test_dev_lines_are_redacted_too() -> None:
    stream = _setup(json_out=False)
    log.warning("bounce from john@company.com", extra={"to": "john@company.com"})
    line = stream.getvalue()
    assert "john@" not in line
    assert "bounce from jo***@company.com to=jo***@company.com" in line


def test_debug_shows_full_address_only_with_full_emails() -> None:
    stream = _setup(full=False)
    assert debug_email_fields("john@company.com") == {}
    log.debug("to john@company.com", extra=debug_email_fields("john@company.com"))
    (rec,) = _records(stream)
    assert rec["message"] == "to jo***@company.com"
    assert "email" not in rec

    stream = _setup(full=True)
    assert debug_email_fields("john@company.com") == {"email": "john@company.com"}
    log.debug("to john@company.com", extra=debug_email_fields("john@company.com"))
    log.info("to john@company.com", extra=debug_email_fields("john@company.com"))
    debug_rec, info_rec = _records(stream)
    assert debug_rec["message"] == "to john@company.com"
    assert debug_rec["email"] == "john@company.com"
    assert info_rec["message"] == "to jo***@company.com"
    assert info_rec["email"] == "jo***@company.com"


def test_info_keeps_hash_warning_and_error_drop_it() -> None:
    stream = _setup()
    fields = email_fields("john@company.com")
    log.info("sent", extra=fields)
    log.warning("deferred", extra=fields)
    log.error("failed", extra=fields)
    info, warning, error = _records(stream)
    assert info["email_hash"] == fields["email_hash"]
    assert info["email_masked"] == "jo***@company.com"
    for rec in (warning, error):
        assert "email_hash" not in rec
        assert rec["email_masked"] == "jo***@company.com"
        assert rec["email_domain"] == "company.com"


def test_bad_format_args_do_not_break_the_caller() -> None:
    stream = _setup()
    # logging reports the formatting error on stderr itself; the call must not raise.
    logging.raiseExceptions = False
    try:
        log.info("%d items for john@company.com", "not-a-number")
    finally:
        logging.raiseExceptions = True
    assert "john@company.com" not in stream.getvalue()


def test_smtp_message_id_field_is_not_mangled() -> None:
    stream = _setup()
    log.info("sent", extra={"smtp_message_id": "<170.42.1@mail.company.com>"})
    (rec,) = _records(stream)
    assert rec["smtp_message_id"] == "<170.42.1@mail.company.com>"
