"""Settings from the environment and ``.env``: what a bad value says, what wins, exit code 2.

A bad value stops the process before it touches anything, with a message naming the
variable and what it allows; the `mailer` command exits with 2 on it.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from mailer.config import ConfigError, Settings, load_settings

MAILER = Path(sys.executable).parent / "mailer"

# What production needs besides safe values: real secrets and the servers.
PRODUCTION = {
    "MAILER_ENV": "production",
    "MAILER_LOG_HASH_SALT": "a-secret-salt-of-32-characters!!",
    "MAILER_UNSUBSCRIBE_SECRET": "a-secret-key-of-32-characters!!!",
    "MAILER_NATS_URL": "nats://nats:4222",
    "MAILER_DATABASE_URL": "postgresql://mailer@postgres/mailer",
    "MAILER_REDIS_URL": "redis://redis:6379/0",
    "MAILER_SMTP_HOST": "smtp.example.com",
    "MAILER_PUBLIC_URL": "https://mailer.example.com",
}


@pytest.mark.parametrize(
    "variable,value,allowed",
    [
        # a bounded integer: not a number, and out of range
        ("MAILER_RATE_PER_HOUR", "lots", "an integer >= 1"),
        ("MAILER_RATE_PER_HOUR", "0", "an integer >= 1"),
        ("MAILER_SMTP_PORT", "70000", "an integer >= 0 and <= 65535"),
        # a positive number of seconds
        ("MAILER_SMTP_TIMEOUT_SECONDS", "0", "a number > 0"),
        # a choice
        ("MAILER_ENV", "staging", "one of 'development', 'production'"),
        ("MAILER_SMTP_SECURITY", "ssl", "one of 'none', 'starttls', 'tls'"),
        # a flag
        ("MAILER_LOG_FULL_EMAILS", "maybe", "true or false"),
        # a string with a pattern
        ("MAILER_WORKING_HOURS_START", "9:00", "a string matching"),
        ("MAILER_SUBJECT_PREFIX", "a..b", "a string matching"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_allows(
    variable: str, value: str, allowed: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({variable: value}, dotenv=None)
    message = str(caught.value)
    assert message.startswith(f"{variable}="), message
    assert value in message
    assert f"is not allowed: expected {allowed}" in message


def test_good_values_are_converted_to_their_types() -> None:
    s = load_settings(
        {
            "MAILER_RATE_PER_HOUR": " 250 ",
            "MAILER_SMTP_TIMEOUT_SECONDS": "2.5",
            "MAILER_LOG_FULL_EMAILS": "yes",
            "MAILER_LOG_JSON": "off",
            "MAILER_SMTP_SECURITY": "starttls",
        },
        dotenv=None,
    )
    assert (s.rate_per_hour, s.smtp_timeout_seconds) == (250, 2.5)
    assert (s.log_full_emails, s.log_json, s.smtp_security) == (True, False, "starttls")
    assert load_settings({}, dotenv=None) == Settings()


def test_an_unknown_mailer_variable_is_refused() -> None:
    # A misspelt name would otherwise leave the default in force without a word.
    with pytest.raises(ConfigError, match=r"unknown setting.*MAILER_RATE_PER_HOURS"):
        load_settings({"MAILER_RATE_PER_HOURS": "50"}, dotenv=None)
    # Other variables are none of mailer's business.
    assert load_settings({"PATH": "/bin", "MAILERX": "1"}, dotenv=None) == Settings()


def test_dotenv_is_read_and_the_environment_wins(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# local development\n"
        "MAILER_RATE_PER_HOUR=250\n"
        "export MAILER_FROM_NAME='CRM рассылки'\n"
        'MAILER_TIMEZONE="Europe/Samara"\n'
        "\n"
        "not a setting line\n",
        encoding="utf-8",
    )
    s = load_settings({}, dotenv=dotenv)
    assert (s.rate_per_hour, s.from_name, s.timezone) == (250, "CRM рассылки", "Europe/Samara")

    s = load_settings({"MAILER_RATE_PER_HOUR": "300"}, dotenv=dotenv)
    assert (s.rate_per_hour, s.from_name) == (300, "CRM рассылки")

    # A bad value in .env is named like one in the environment.
    dotenv.write_text("MAILER_RATE_PER_HOUR=-5\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"^MAILER_RATE_PER_HOUR=-5 is not allowed"):
        load_settings({}, dotenv=dotenv)
    # ...unless the environment overrides it.
    assert load_settings({"MAILER_RATE_PER_HOUR": "7"}, dotenv=dotenv).rate_per_hour == 7

    # No .env is no error.
    assert load_settings({}, dotenv=tmp_path / "absent.env") == Settings()


@pytest.mark.parametrize(
    "url",
    [
        "http://mailer.example.com",
        "HTTP://mailer.example.com",
        "https://",
        "mailer.example.com",
        "ftp://mailer.example.com",
    ],
)
def test_production_refuses_a_public_url_that_is_not_https(url: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({**PRODUCTION, "MAILER_PUBLIC_URL": url}, dotenv=None)
    message = str(caught.value)
    assert message.startswith(f"MAILER_PUBLIC_URL={url!r} is not allowed in production"), message
    assert "https://" in message and "RFC 8058" in message


def test_production_accepts_https_and_development_keeps_http() -> None:
    s = load_settings(PRODUCTION, dotenv=None)
    assert s.public_url == "https://mailer.example.com"
    assert load_settings(
        {**PRODUCTION, "MAILER_PUBLIC_URL": "HTTPS://mailer.example.com:8443/mail"}, dotenv=None
    ).public_url.endswith("/mail")
    # Local development runs on http://localhost.
    assert load_settings({}, dotenv=None).public_url == "http://localhost:8081"
    dev = {**PRODUCTION, "MAILER_ENV": "development", "MAILER_PUBLIC_URL": "http://127.0.0.1:8080"}
    assert load_settings(dev, dotenv=None).public_url == "http://127.0.0.1:8080"


def test_nats_auth_settings_are_checked_at_load(tmp_path: Path) -> None:
    missing = tmp_path / "missing.creds"
    with pytest.raises(ConfigError) as caught:
        load_settings({"MAILER_NATS_CREDS_FILE": str(missing)}, dotenv=None)
    assert str(caught.value).startswith(f"MAILER_NATS_CREDS_FILE={str(missing)!r} is not allowed")
    assert "cannot be read" in str(caught.value)

    garbage = tmp_path / "garbage.creds"
    garbage.write_text("not a creds file\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"MAILER_NATS_CREDS_FILE=.*no user JWT"):
        load_settings({"MAILER_NATS_CREDS_FILE": str(garbage)}, dotenv=None)

    with pytest.raises(ConfigError, match=r"one NATS auth method.*MAILER_NATS_TOKEN"):
        load_settings(
            {"MAILER_NATS_USER": "u", "MAILER_NATS_PASSWORD": "p", "MAILER_NATS_TOKEN": "t"},
            dotenv=None,
        )
    with pytest.raises(ConfigError, match="both a user and a password"):
        load_settings({"MAILER_NATS_USER": "u"}, dotenv=None)


def _run_mailer(
    args: list[str], env: dict[str, str], cwd: Path
) -> subprocess.CompletedProcess[str]:
    # Only the variables given: none of the test run's MAILER_* leaks in, and the
    # empty working directory has no .env.
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    return subprocess.run(
        [str(MAILER), *args],
        env={**clean, **env},
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@pytest.mark.parametrize(
    "env,variable",
    [
        ({"MAILER_RATE_PER_HOUR": "lots"}, "MAILER_RATE_PER_HOUR"),
        ({"MAILER_RATE_PER_HOUR": "0"}, "MAILER_RATE_PER_HOUR"),
        ({**PRODUCTION, "MAILER_PUBLIC_URL": "http://mailer.example.com"}, "MAILER_PUBLIC_URL"),
        ({"MAILER_NATS_CREDS_FILE": "/nonexistent/mailer.creds"}, "MAILER_NATS_CREDS_FILE"),
    ],
)
def test_the_process_exits_2_naming_the_variable(
    env: dict[str, str], variable: str, tmp_path: Path
) -> None:
    # A database URL that nothing listens on: the process must stop before using it.
    env = {"MAILER_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none", **env}
    done = _run_mailer(["migrate"], env, tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "configuration error" in done.stderr
    assert variable in done.stderr
    assert "Traceback" not in done.stderr


def test_the_process_reads_dotenv_from_its_working_directory(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("MAILER_RATE_PER_HOUR=none\n", encoding="utf-8")
    done = _run_mailer(["migrate"], {}, tmp_path)
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "MAILER_RATE_PER_HOUR='none' is not allowed" in done.stderr
    # The environment wins over .env: with a good value in it the process gets past
    # its settings, as far as the database it cannot reach.
    done = _run_mailer(
        ["migrate"],
        {
            "MAILER_RATE_PER_HOUR": "100",
            "MAILER_DATABASE_URL": "postgresql://x@127.0.0.1:1/x",
            "MAILER_STARTUP_TIMEOUT_SECONDS": "1",
        },
        tmp_path,
    )
    assert done.returncode == 3, (done.returncode, done.stderr)  # start-up failed
    assert "configuration error" not in done.stderr


@pytest.mark.parametrize("host", ["smtp.example.com", "10.0.0.5"])
def test_production_refuses_plaintext_smtp_with_credentials_to_a_remote_host(host: str) -> None:
    unsafe = {
        **PRODUCTION,
        "MAILER_SMTP_HOST": host,
        "MAILER_SMTP_SECURITY": "none",
        "MAILER_SMTP_USERNAME": "crm@example.com",
        "MAILER_SMTP_PASSWORD": "secret",
    }
    with pytest.raises(ConfigError, match="MAILER_SMTP_SECURITY='none' with SMTP credentials"):
        load_settings(unsafe, dotenv=None)
    # The same with TLS, without credentials, to a loopback relay, or in development: fine.
    assert load_settings({**unsafe, "MAILER_SMTP_SECURITY": "starttls"}, dotenv=None)
    no_login = {**unsafe, "MAILER_SMTP_USERNAME": "", "MAILER_SMTP_PASSWORD": ""}
    assert load_settings(no_login, dotenv=None)
    for loopback in ("127.0.0.1", "localhost", "::1"):
        assert load_settings({**unsafe, "MAILER_SMTP_HOST": loopback}, dotenv=None)
    assert load_settings({**unsafe, "MAILER_ENV": "development"}, dotenv=None)
