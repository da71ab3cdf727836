"""Several SMTP accounts (issue 12): each with its own hour, quota and breaker, on the
embedded stack with two SMTP sinks; only the clock is fake.

- two accounts with different hourly limits sending at once: each exact at its own
  sink, each campaign waiting with a reason that names its account;
- a campaign failing over to its backup while its own account's breaker is open,
  and back on its own account when the breaker closes;
- a campaign naming an account that is not configured: a structured error, nothing
  changed;
- the configuration: validated at start (exit code 2 naming the variable).
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
from collections import Counter
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from email import message_from_bytes
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY

from mailer.accounts import ACCOUNT_SUFFIXES, accounts_of
from mailer.clock import FakeClock
from mailer.config import ConfigError, load_settings
from mailer.sink import SmtpSink
from tests.helpers import Crm, Events, people

# A Monday, 13:15 Moscow time.
MONDAY_1015_UTC = datetime(2026, 11, 23, 10, 15, tzinfo=UTC)


@pytest.fixture
async def second_sink() -> AsyncIterator[SmtpSink]:
    """The second provider's server: a sink of its own on its own port."""
    s = SmtpSink(None)
    await s.start()
    yield s
    await s.stop()


def account_vars(**accounts: dict[str, Any]) -> dict[str, Any]:
    """make_service overrides for MAILER_SMTP_ACCOUNTS and MAILER_SMTP_<NAME>_*."""
    pairs = [
        (f"MAILER_SMTP_{name.upper()}_{key.upper()}", str(value))
        for name, values in accounts.items()
        for key, value in values.items()
    ]
    return {"smtp_accounts": ",".join(accounts), "smtp_account_vars": tuple(sorted(pairs))}


def recipients(sink: SmtpSink) -> list[str]:
    return [r for m in sink.messages for r in m.rcpt_tos]


async def test_two_accounts_with_their_own_hourly_limits_send_at_once_each_exact(
    make_service, crm: Crm, events: Events, sink: SmtpSink, second_sink: SmtpSink, db, settings
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(
        clock=clock,
        max_active_campaigns=2,
        batch_size=10,
        **account_vars(
            main={"host": "127.0.0.1", "port": sink.port, "rate_per_hour": 3},
            bulk={
                "host": "127.0.0.1",
                "port": second_sink.port,
                "rate_per_hour": 5,
                "from_domain": "bulk.example.net",
            },
        ),
    )
    # Campaign a goes through main (the default: it names none) and names bulk as
    # its backup: bulk's free hour must never carry a's mail (only a breaker does).
    # Each account's first quota sync (at start) is done: the quotas below are exact.
    for _ in range(500):
        if await db.fetchval("SELECT count(*) FROM quota WHERE last_synced_at IS NULL") == 0:
            break
        await asyncio.sleep(0.02)
    a = await crm.campaign(people(7, domain="a.example.org"), backup_account="bulk")
    b = await crm.campaign(people(12, domain="b.example.org"), user="manager-2", account="bulk")
    assert (await crm.get(a))["account"] is None
    view_b = await crm.call("campaign.get", {"campaign_id": b}, user="manager-2")
    assert view_b["account"] == "bulk"
    await crm.start(a)
    await crm.call("campaign.start", {"campaign_id": b}, user="manager-2")

    sent_a, sent_b = 0, 0
    for hour, (more_a, more_b) in enumerate([(3, 5), (3, 5), (1, 2)]):
        sent_a, sent_b = sent_a + more_a, sent_b + more_b
        if hour == 2:
            for cid in (a, b):
                assert (await events.wait(cid, ("sent", "completed_with_errors")))[
                    "event"
                ] == "sent"
        else:
            for cid in (a, b):
                await events.wait_count(cid, "deferred", hour + 1)
                deferred = events.of(cid, "deferred")[hour]
                assert deferred["defer_reason"] == "rate_per_hour"
                assert datetime.fromisoformat(deferred["deferred_until"]) == datetime(
                    2026, 11, 23, 11 + hour, tzinfo=UTC
                )
            assert events.of(a, "deferred")[hour]["details"]["account"] == "main"
            assert events.of(b, "deferred")[hour]["details"]["account"] == "bulk"
        # Each account's server got exactly its hour, and only its campaign's mail.
        assert sorted(recipients(sink)) == sorted(f"user{i}@a.example.org" for i in range(sent_a))
        assert sorted(recipients(second_sink)) == sorted(
            f"user{i}@b.example.org" for i in range(sent_b)
        )
        if hour == 0:
            manager = await crm.call("manager.status", {})
            assert manager["reason_code"] == "rate_per_hour"
            assert manager["reason"] == (
                "Достигнут лимит 3 писем/час SMTP-аккаунта «main». Продолжим в 14:00."
            )
            [queued] = manager["queue"]
            assert (queued["account"], queued["defer_account"]) == ("main", "main")
            other = await crm.call("manager.status", {}, user="manager-2", lang="en")
            assert other["reason"] == (
                "The limit of 5 emails/hour of SMTP account “bulk” is reached."
                " We continue at 14:00."
            )
        clock.set(datetime(2026, 11, 23, 11 + hour, tzinfo=UTC))

    # Per clock hour and account, as the send log records them: each exactly its limit.
    rows = await db.fetch(
        "SELECT COALESCE(account, '') AS account, date_trunc('hour', created_at) AS hour,"
        " count(*) AS n FROM send_log GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert [(r["account"], r["hour"].hour, r["n"]) for r in rows] == [
        ("", 10, 3),
        ("", 11, 3),
        ("", 12, 1),
        ("bulk", 10, 5),
        ("bulk", 11, 5),
        ("bulk", 12, 2),
    ]
    # Each account's From and its own monthly quota.
    assert {m.mail_from for m in sink.messages} == {settings.from_email}
    assert {m.mail_from for m in second_sink.messages} == {"crm@bulk.example.net"}
    assert "bulk.example.net" in message_from_bytes(second_sink.messages[0].data)["From"]
    quota = {r["account"]: r["emails_available"] for r in await db.fetch("SELECT * FROM quota")}
    assert quota == {"": 15000 - 7, "bulk": 15000 - 12}


async def test_a_campaign_fails_over_to_its_backup_while_its_breaker_is_open_and_comes_back(
    make_service, crm: Crm, events: Events, sink: SmtpSink, second_sink: SmtpSink, db
) -> None:
    clock = FakeClock(MONDAY_1015_UTC)
    await make_service(
        clock=clock,
        batch_size=3,
        circuit_breaker_threshold=3,
        **account_vars(
            main={"host": "127.0.0.1", "port": sink.port},
            backup={"host": "127.0.0.1", "port": second_sink.port, "rate_per_hour": 4},
        ),
    )
    everyone = people(9)
    # main answers 421 to the first batch: its breaker opens (3 server failures).
    for r in everyone[:3]:
        sink.fail(r["email"], "421 4.3.2 Service shutting down", times=1)
    failovers = _failovers("main", "backup")
    cid = await crm.campaign(everyone, account="main", backup_account="backup")
    await crm.start(cid)

    # At once, not after the retry delay: the backup takes over, within its own
    # hour (4), and the campaign then waits for main's breaker — not for the
    # backup's next hour, and nothing beyond 4 goes through the backup.
    deferred = await events.wait(cid, ("deferred",))
    assert deferred["defer_reason"] == "transient_error"
    assert deferred["details"]["account"] == "main"
    assert datetime.fromisoformat(deferred["deferred_until"]) == MONDAY_1015_UTC + timedelta(
        minutes=5
    )
    assert len(second_sink.messages) == 4 and not sink.messages
    assert _failovers("main", "backup") == failovers + 1
    manager = await crm.call("manager.status", {})
    assert manager["reason"] == (
        "Временная ошибка отправки через SMTP-аккаунт «main». Повторим попытку через 5 минут."
    )
    assert manager["queue"][0]["defer_account"] == "main"

    # The breaker's cooldown ends: the campaign's probe goes through main, which
    # answers again, and the rest goes there.
    clock.advance(timedelta(minutes=5))
    done = await events.wait(cid, ("sent", "completed_with_errors"))
    assert done["event"] == "sent"
    assert len(sink.messages) == 5 and len(second_sink.messages) == 4
    got = Counter(recipients(sink) + recipients(second_sink))
    assert set(got) == {r["email"] for r in everyone} and max(got.values()) == 1
    # The three that main refused first went out once, through the backup.
    assert {r["email"] for r in everyone[:3]} <= set(recipients(second_sink))
    by_account = await db.fetch(
        "SELECT COALESCE(account, '') AS account, status, count(*) AS n FROM send_log"
        " GROUP BY 1, 2 ORDER BY 1, 2"
    )
    assert [(r["account"], r["status"], r["n"]) for r in by_account] == [
        ("", "sent", 5),
        ("", "transient", 3),
        ("backup", "sent", 4),
    ]


def _failovers(account: str, to: str) -> float:
    value = REGISTRY.get_sample_value(
        "mailer_account_failovers_total", {"account": account, "to": to}
    )
    return value or 0.0


async def test_a_campaign_naming_an_unknown_account_is_refused_and_nothing_changes(
    make_service, crm: Crm, db, second_sink: SmtpSink, sink: SmtpSink
) -> None:
    await make_service(
        **account_vars(
            main={"host": "127.0.0.1", "port": sink.port},
            backup={"host": "127.0.0.1", "port": second_sink.port},
        )
    )
    err = await crm.fails(
        "campaign.create", {"name": "x", "subject": "y", "body_text": "z", "account": "spare"}
    )
    assert err.status == 422
    assert err.body["error"]["code"] == "unknown_account"
    assert err.body["error"]["details"] == {
        "field": "account",
        "account": "spare",
        "accounts": "main, backup",
    }
    assert "«spare»" in err.body["error"]["message"]
    assert await db.fetchval("SELECT count(*) FROM campaign") == 0

    cid = await crm.campaign(people(1), account="backup")
    before = await db.fetchrow("SELECT * FROM campaign WHERE id = $1", cid)
    err = await crm.fails("campaign.update", {"campaign_id": cid, "backup_account": "spare"})
    assert err.body["error"]["code"] == "unknown_account"
    assert err.body["error"]["details"]["field"] == "backup_account"
    same = await crm.fails("campaign.update", {"campaign_id": cid, "backup_account": "backup"})
    assert same.body["error"]["code"] == "validation_error"
    assert await db.fetchrow("SELECT * FROM campaign WHERE id = $1", cid) == before
    audit = await db.fetchval(
        "SELECT count(*) FROM audit_log WHERE action = 'campaign.update' AND campaign_id = $1", cid
    )
    assert audit == 0

    # A good change is kept, and null goes back to the default.
    view = await crm.call("campaign.update", {"campaign_id": cid, "backup_account": "main"})
    assert (view["account"], view["backup_account"]) == ("backup", "main")
    # null: the default (main), which cannot be its own backup.
    same = await crm.fails("campaign.update", {"campaign_id": cid, "account": None})
    assert same.body["error"]["details"] == {"field": "backup_account", "account": "main"}
    view = await crm.call(
        "campaign.update", {"campaign_id": cid, "account": None, "backup_account": "backup"}
    )
    assert (view["account"], view["backup_account"]) == (None, "backup")


async def test_quota_endpoints_and_gauge_act_on_the_named_account(
    make_service, crm: Crm, db, sink: SmtpSink, second_sink: SmtpSink
) -> None:
    """quota.get/sync/set name an account (absent: the default); the sync reaches that
    account's own syncer; an unknown one changes nothing; the gauge is per account."""
    clock = FakeClock(MONDAY_1015_UTC)
    service = await make_service(
        clock=clock,
        **account_vars(
            main={"host": "127.0.0.1", "port": sink.port, "monthly_quota": 100},
            bulk={"host": "127.0.0.1", "port": second_sink.port, "monthly_quota": 50},
        ),
    )
    admin = {"user": "boss", "roles": "admin"}
    for _ in range(500):
        if await db.fetchval("SELECT count(*) FROM quota WHERE last_synced_at IS NULL") == 0:
            break
        await asyncio.sleep(0.02)
    main = await crm.call("quota.get", {})
    assert (main["account"], main["emails_available"], main["monthly_limit"]) == ("main", 100, 100)
    bulk = await crm.call("quota.get", {"account": "bulk"})
    assert (bulk["account"], bulk["emails_available"], bulk["monthly_limit"]) == ("bulk", 50, 50)

    # set: only bulk's row, audited with its name.
    bulk = await crm.call("quota.set", {"monthly_limit": 40, "account": "bulk"}, **admin)
    assert (bulk["account"], bulk["emails_available"], bulk["monthly_limit"]) == ("bulk", 40, 40)
    assert await crm.call("quota.get", {}) == main
    audit = await db.fetchval("SELECT details FROM audit_log WHERE action = 'quota.set'")
    assert json.loads(audit) == {"monthly_limit": 40, "from": 50, "to": 40, "account": "bulk"}

    # sync: bulk's syncer recounts bulk's month (one send through bulk, one through
    # main), and main's row is not touched (its stale value stays as it was).
    await db.execute(
        "INSERT INTO send_log (email, status, created_at, account) VALUES "
        "('a@example.org', 'sent', $1, 'bulk'), ('b@example.org', 'sent', $1, NULL)",
        clock.now(),
    )
    await db.execute("UPDATE quota SET emails_available = 77 WHERE account = ''")
    await db.execute("UPDATE quota SET emails_available = 1 WHERE account = 'bulk'")
    bulk = await crm.call("quota.sync", {"account": "bulk"}, **admin)
    assert (bulk["account"], bulk["emails_available"]) == ("bulk", 39)
    assert await db.fetchval("SELECT emails_available FROM quota WHERE account = ''") == 77
    main = await crm.call("quota.sync", {}, **admin)
    assert (main["account"], main["emails_available"]) == ("main", 99)
    assert (await crm.call("quota.get", {"account": "bulk"}))["emails_available"] == 39

    # An account that is not configured: the structured error, nothing asked or changed.
    before = await db.fetch("SELECT * FROM quota ORDER BY account")
    audits = await db.fetchval("SELECT count(*) FROM audit_log")
    for subject, body, who in (
        ("quota.get", {"account": "spare"}, {}),
        ("quota.sync", {"account": "spare"}, admin),
        ("quota.set", {"monthly_limit": 5, "account": "spare"}, admin),
    ):
        err = await crm.fails(subject, body, **who)
        assert err.status == 422, subject
        assert err.body["error"]["code"] == "unknown_account"
        assert err.body["error"]["details"] == {
            "field": "account",
            "account": "spare",
            "accounts": "main, bulk",
        }
    assert await db.fetch("SELECT * FROM quota ORDER BY account") == before
    assert await db.fetchval("SELECT count(*) FROM audit_log") == audits

    # The gauge: one series per account, the default's from the '' row.
    await service._refresh_gauges()
    for name, left in (("main", 99), ("bulk", 39)):
        value = REGISTRY.get_sample_value("mailer_quota_emails_available", {"account": name})
        assert value == left, name
        # The governor's and the SMTP session's counters: one series per account too.
        granted = REGISTRY.get_sample_value("mailer_tokens_granted_total", {"account": name})
        assert granted is not None, name
        for labels in ({"reason": "quota_exhausted"}, {"reason": "rate_per_hour"}):
            sample = REGISTRY.get_sample_value(
                "mailer_tokens_denied_total", {"account": name, **labels}
            )
            assert sample is not None, (name, labels)
        errors = REGISTRY.get_sample_value(
            "mailer_smtp_connection_errors_total", {"account": name, "cause": "connect"}
        )
        assert errors is not None, name


async def test_with_one_account_nothing_names_it(make_service, crm: Crm, sink: SmtpSink) -> None:
    """MAILER_SMTP_ACCOUNTS unset: the one account is MAILER_SMTP_*, named nowhere."""
    await make_service()
    err = await crm.fails(
        "campaign.create", {"name": "x", "subject": "y", "body_text": "z", "account": "main"}
    )
    assert err.body["error"]["details"] == {
        "field": "account",
        "account": "main",
        "accounts": "default",
    }
    cid = await crm.campaign(people(1), account="default")
    assert (await crm.get(cid))["account"] == "default"


# --- configuration -------------------------------------------------------------------------

MAIN = {"MAILER_SMTP_ACCOUNTS": "main,backup", "MAILER_SMTP_MAIN_HOST": "smtp.main.example"}
BACKUP = {"MAILER_SMTP_BACKUP_HOST": "smtp.backup.example"}


def test_accounts_from_the_environment() -> None:
    s = load_settings(
        {
            **MAIN,
            **BACKUP,
            "MAILER_SMTP_DEFAULT_ACCOUNT": "backup",
            "MAILER_SMTP_MAIN_RATE_PER_HOUR": "50",
            "MAILER_SMTP_MAIN_SECURITY": "tls",
            "MAILER_SMTP_MAIN_PORT": "465",
            "MAILER_SMTP_MAIN_USERNAME": "crm",
            "MAILER_SMTP_MAIN_PASSWORD": "secret",
            "MAILER_SMTP_MAIN_MONTHLY_QUOTA": "1000",
            "MAILER_SMTP_MAIN_CONNECTIONS": "2",
            "MAILER_SMTP_BACKUP_FROM_EMAIL": "news@backup.example",
            "MAILER_RATE_PER_HOUR": "70",
            "MAILER_SMTP_USERNAME": "flat-user",
        },
        dotenv=None,
    )
    accounts = accounts_of(s)
    assert accounts.several and accounts.names == ["main", "backup"]
    assert accounts.default.name == "backup"
    main, backup = accounts.get("main").settings, accounts.get("backup").settings
    assert (main.smtp_host, main.smtp_port, main.smtp_security) == ("smtp.main.example", 465, "tls")
    assert (main.smtp_username, main.smtp_password) == ("crm", "secret")
    assert (main.rate_per_hour, main.monthly_quota, main.smtp_connections) == (50, 1000, 2)
    # Limits are inherited from the flat settings; credentials never are.
    assert (backup.rate_per_hour, backup.smtp_username, backup.smtp_port) == (70, "", 25)
    assert backup.from_email == "news@backup.example"
    assert accounts.get("main").key == "main" and accounts.get("backup").key == ""


def test_a_backup_added_to_the_flat_account() -> None:
    """Naming MAILER_SMTP_ACCOUNT (``default``) in the list keeps the MAILER_SMTP_* account."""
    s = load_settings(
        {
            "MAILER_SMTP_ACCOUNTS": "default,backup",
            "MAILER_SMTP_HOST": "relay.example",
            "MAILER_SMTP_USERNAME": "crm",
            "MAILER_RATE_PER_HOUR": "300",
            **BACKUP,
        },
        dotenv=None,
    )
    flat, backup = accounts_of(s).get(None), accounts_of(s).get("backup")
    assert (flat.name, flat.key, flat.settings.smtp_host) == ("default", "", "relay.example")
    assert (flat.settings.smtp_username, flat.rate_per_hour) == ("crm", 300)
    assert (backup.settings.smtp_host, backup.settings.smtp_username) == ("smtp.backup.example", "")


def test_one_account_is_the_flat_settings() -> None:
    s = load_settings({"MAILER_SMTP_HOST": "relay", "MAILER_SMTP_ACCOUNT": "acme"}, dotenv=None)
    accounts = accounts_of(s)
    assert not accounts.several and accounts.names == ["acme"]
    assert accounts.default.settings is s


@pytest.mark.parametrize(
    "env,says",
    [
        ({**MAIN}, "MAILER_SMTP_BACKUP_HOST is required"),
        ({**MAIN, **BACKUP, "MAILER_SMTP_MAIN_PORT": "smtp"}, "MAILER_SMTP_MAIN_PORT='smtp'"),
        ({**MAIN, **BACKUP, "MAILER_SMTP_MAIN_RATE_PER_HOUR": "0"}, "MAILER_SMTP_MAIN_RATE_PER"),
        ({**MAIN, **BACKUP, "MAILER_SMTP_MAIN_SECURITY": "ssl"}, "MAILER_SMTP_MAIN_SECURITY"),
        ({**MAIN, **BACKUP, "MAILER_SMTP_MAIN_HOTS": "x"}, "MAILER_SMTP_MAIN_HOTS"),
        ({**MAIN, **BACKUP, "MAILER_SMTP_SPARE_HOST": "x"}, "MAILER_SMTP_SPARE_HOST"),
        ({**MAIN, **BACKUP, "MAILER_SMTP_DEFAULT_ACCOUNT": "spare"}, "MAILER_SMTP_DEFAULT"),
        ({**MAIN, **BACKUP, "MAILER_SMTP_ACCOUNTS": "main,main"}, "repeated"),
        ({"MAILER_SMTP_ACCOUNTS": "main-1"}, "MAILER_SMTP_ACCOUNTS='main-1'"),
        ({"MAILER_SMTP_MAIN_HOST": "x"}, "MAILER_SMTP_MAIN_HOST"),
        (
            {**MAIN, **BACKUP, "MAILER_SMTP_MAIN_FROM_DOMAIN": "not a domain"},
            "MAILER_SMTP_MAIN_FROM_DOMAIN",
        ),
        (
            {**MAIN, **BACKUP, "MAILER_SMTP_MAIN_DKIM_KEY_FILE": "/nonexistent/key.pem"},
            "MAILER_SMTP_MAIN_DKIM_KEY_FILE",
        ),
        (
            {**MAIN, **BACKUP, "MAILER_SMTP_BACKUP_QUOTA_PROVIDER": "http"},
            "MAILER_SMTP_BACKUP_QUOTA_HTTP_URL is required",
        ),
    ],
)
def test_a_bad_account_configuration_is_refused_naming_the_variable(
    env: dict[str, str], says: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env, dotenv=None)
    assert says in str(caught.value)


def test_production_refuses_an_account_sending_credentials_in_clear() -> None:
    production = {
        "MAILER_ENV": "production",
        "MAILER_NATS_URL": "nats://n:4222",
        "MAILER_DATABASE_URL": "postgresql://u@db/mailer",
        "MAILER_REDIS_URL": "redis://r:6379",
        "MAILER_LOG_HASH_SALT": "x" * 20,
        "MAILER_UNSUBSCRIBE_SECRET": "y" * 20,
        "MAILER_PUBLIC_URL": "https://mail.example.com",
    }
    ok = {**production, **MAIN, **BACKUP, "MAILER_SMTP_MAIN_SECURITY": "starttls"}
    load_settings({**ok, "MAILER_SMTP_MAIN_USERNAME": "u"}, dotenv=None)
    with pytest.raises(ConfigError, match="MAILER_SMTP_BACKUP_SECURITY='none'"):
        load_settings({**ok, "MAILER_SMTP_BACKUP_PASSWORD": "p"}, dotenv=None)


def test_the_process_exits_2_on_a_bad_account(tmp_path: Path) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MAILER_")},
        "MAILER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
        **MAIN,
        "MAILER_SMTP_BACKUP_PORT": "25",
    }
    done = subprocess.run(
        [sys.executable, str(Path(__file__).parent.parent / "cmd" / "main.py"), "migrate"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "MAILER_SMTP_BACKUP_HOST is required" in done.stderr
    assert "Traceback" not in done.stderr


def test_the_readme_lists_every_per_account_variable() -> None:
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    listed = re.findall(r"^\| `MAILER_SMTP_<NAME>_([A-Z_]+)` \|", readme, re.MULTILINE)
    assert listed == list(ACCOUNT_SUFFIXES)
