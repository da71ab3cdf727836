"""Typed settings from ``MAILER_*`` environment variables (and ``.env``).

Every tunable number lives here, once. A field ``foo_bar`` is read from
``MAILER_FOO_BAR``; its ``Meta(description=...)`` is the text of the README's
configuration table, which a test keeps in step with this class. A bad value
stops the process with a message naming the variable and what it allows.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from msgspec import Meta

__all__ = [
    "ENV_PREFIX",
    "ConfigError",
    "Settings",
    "env_name",
    "is_service_link",
    "load_settings",
    "mask_url",
    "read_dotenv",
    "settings_table",
]

ENV_PREFIX = "MAILER_"

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Port = Annotated[int, Meta(ge=0, le=65535)]
Seconds = Annotated[float, Meta(gt=0)]


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The whole configuration of one mailer process."""

    env: Annotated[
        Literal["development", "production"],
        Meta(description="`production` turns on JSON logs and refuses unsafe defaults."),
    ] = "development"
    instance_id: Annotated[
        str,
        Meta(description="Name of this process in leases and logs (default: host-pid)."),
    ] = ""

    # --- connections ---------------------------------------------------------
    nats_url: Annotated[
        str,
        Meta(
            description="NATS server URL, or a cluster's URLs comma-separated; empty under "
            "`mailer dev` starts an embedded one."
        ),
    ] = ""
    database_url: Annotated[
        str,
        Meta(description="PostgreSQL DSN; empty under `mailer dev` starts an embedded one."),
    ] = ""
    database_pool_size: Annotated[int, Meta(ge=2, description="asyncpg pool size.")] = 10
    database_statement_timeout_seconds: Annotated[
        Seconds,
        Meta(
            description="Longest wait for one PostgreSQL statement, and for a pool connection;"
            " past it the call raises instead of hanging."
        ),
    ] = 30.0
    redis_url: Annotated[
        str,
        Meta(description="Redis URL; empty under `mailer dev` starts an embedded one."),
    ] = ""
    nats_user: Annotated[str, Meta(description="NATS user (user/password auth).")] = ""
    nats_password: Annotated[str, Meta(description="NATS password.")] = ""
    nats_token: Annotated[str, Meta(description="NATS token auth.")] = ""
    nats_creds_file: Annotated[
        str, Meta(description="NATS credentials file (JWT + NKey seed).")
    ] = ""
    nats_nkey_seed_file: Annotated[str, Meta(description="NATS NKey seed file.")] = ""
    nats_replicas: Annotated[
        Annotated[int, Meta(ge=1, le=5)],
        Meta(
            description="Replicas of the JetStream streams and KV bucket mailer owns "
            "(3 on a NATS cluster)."
        ),
    ] = 1
    subject_prefix: Annotated[
        str,
        Meta(
            pattern=r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$",
            description="Prefix of every NATS subject mailer serves or publishes.",
        ),
    ] = "mailer"
    redis_key_prefix: Annotated[
        str, Meta(description="Prefix of every Redis key mailer writes.")
    ] = "mailer:"

    # --- SMTP ------------------------------------------------------------------
    smtp_host: Annotated[
        str,
        Meta(description="SMTP server host; empty under `mailer dev` starts a local sink."),
    ] = ""
    smtp_port: Annotated[Port, Meta(description="SMTP server port (0: the sink's).")] = 0
    smtp_security: Annotated[
        Literal["none", "starttls", "tls"],
        Meta(
            description=(
                "`starttls`, implicit `tls`, or `none` (production: no AUTH, or a loopback relay)."
            )
        ),
    ] = "none"
    smtp_username: Annotated[str, Meta(description="SMTP AUTH user (empty: no AUTH).")] = ""
    smtp_password: Annotated[str, Meta(description="SMTP AUTH password.")] = ""
    smtp_timeout_seconds: Annotated[Seconds, Meta(description="Timeout of one SMTP step.")] = 30.0
    smtp_connections: Annotated[
        PositiveInt, Meta(description="Reused SMTP connections per process.")
    ] = 8
    pipeline_depth: Annotated[
        PositiveInt,
        Meta(
            description="Most recipients of one campaign handed to SMTP and not yet recorded,"
            " each rendered: the send path's depth, and all a kill -9 can leave in doubt."
        ),
    ] = 256
    smtp_account: Annotated[
        str,
        Meta(description="Name of the SMTP account; the hourly rate is counted per account."),
    ] = "default"
    smtp_accounts: Annotated[
        str,
        Meta(
            description="Several SMTP accounts by name, comma-separated (`main,backup`), each"
            " set by `MAILER_SMTP_<NAME>_*` (see below); empty: one account, these"
            " MAILER_SMTP_* settings."
        ),
    ] = ""
    smtp_default_account: Annotated[
        str,
        Meta(
            description="The account of a campaign that names none (default: the first of"
            " MAILER_SMTP_ACCOUNTS)."
        ),
    ] = ""
    # The MAILER_SMTP_<NAME>_* variables, as given: read by mailer.accounts, not a
    # variable of its own (left out of the README's table and of the environment).
    smtp_account_vars: tuple[tuple[str, str], ...] = ()
    from_email: Annotated[
        str, Meta(description="Envelope sender and From address of every message.")
    ] = "crm@example.com"
    from_name: Annotated[str, Meta(description="Display name in From.")] = "CRM"
    message_id_domain: Annotated[
        str, Meta(description="Domain of generated Message-IDs (default: from_email's).")
    ] = ""
    dkim_key_file: Annotated[
        str,
        Meta(
            description="PEM private key (RSA or Ed25519) that DKIM-signs every message;"
            " empty: no signing. Checked at start."
        ),
    ] = ""
    dkim_selector: Annotated[
        str, Meta(description="DKIM selector: the key is published at <selector>._domainkey.")
    ] = "mailer"
    dkim_domain: Annotated[
        str, Meta(description="DKIM signing domain, d= (default: from_email's domain).")
    ] = ""

    # --- sending rules -------------------------------------------------------
    rate_per_hour: Annotated[
        PositiveInt,
        Meta(description="Sends allowed per SMTP account per clock hour."),
    ] = 100
    batch_size: Annotated[
        PositiveInt,
        Meta(description="Recipients a campaign actor claims, and tokens it asks, at once."),
    ] = 200
    max_active_campaigns: Annotated[
        PositiveInt,
        Meta(description="Campaigns sending at once (1: one after another in queue order)."),
    ] = 1
    max_campaign_recipients: Annotated[
        PositiveInt,
        Meta(description="A campaign may not have more recipients: an add beyond is refused."),
    ] = 10_000
    shard_min_recipients: Annotated[
        NonNegativeInt,
        Meta(
            description="Pending recipients from which a campaign is sent by several processes "
            "at once (one shard per live process); 0: never."
        ),
    ] = 0
    campaign_lease_seconds: Annotated[
        Seconds,
        Meta(description="Lease a process holds on a campaign; renewed at a third of it."),
    ] = 30.0
    token_request_timeout_seconds: Annotated[
        Seconds, Meta(description="How long a campaign waits for the rate governor's reply.")
    ] = 5.0

    transient_retry_delay_minutes: Annotated[
        Annotated[float, Meta(gt=0)],
        Meta(description="Wait after a transient SMTP error (4xx, timeout, refused)."),
    ] = 5.0
    circuit_breaker_threshold: Annotated[
        PositiveInt,
        Meta(description="Consecutive transient errors that pause a campaign."),
    ] = 10
    max_transient_attempts: Annotated[
        PositiveInt,
        Meta(description="Transient answers one recipient may get; then it fails with the last."),
    ] = 5
    large_campaign_warning: Annotated[
        PositiveInt, Meta(description="Starting a campaign larger than this warns the manager.")
    ] = 5000
    working_hours_start: Annotated[
        str,
        Meta(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$", description="Sending starts (HH:MM)."),
    ] = "09:00"
    working_hours_end: Annotated[
        str,
        Meta(
            pattern=r"^([01][0-9]|2[0-4]):[0-5][0-9]$",
            description="Sending stops (HH:MM; 24:00 = midnight).",
        ),
    ] = "18:00"
    timezone: Annotated[
        str, Meta(description="Time zone of working hours and daily limits (IANA name).")
    ] = "Europe/Moscow"
    working_days: Annotated[
        str,
        Meta(
            pattern=r"^[1-7](,[1-7])*$",
            description="ISO weekdays when mail goes out (1 = Monday ... 7 = Sunday).",
        ),
    ] = "1,2,3,4,5,6,7"
    daily_limit_default: Annotated[
        Annotated[int, Meta(ge=0)],
        Meta(description="Emails one manager may send per day (0: no daily limit)."),
    ] = 0
    daily_limits: Annotated[
        str,
        Meta(
            pattern=r"^([^=,\s]+=[0-9]+(,[^=,\s]+=[0-9]+)*)?$",
            description="Per-manager daily limits overriding the default: `user=500,user2=100`.",
        ),
    ] = ""
    monthly_quota: Annotated[
        Annotated[int, Meta(ge=0)],
        Meta(description="The provider's monthly allowance (the `local` quota provider)."),
    ] = 15_000
    quota_provider: Annotated[
        Literal["local", "http"],
        Meta(description="`local`: allowance minus this month's sends; `http`: provider API."),
    ] = "local"
    quota_http_url: Annotated[
        str, Meta(description="The provider's quota endpoint (JSON), for `http`.")
    ] = ""
    quota_http_token: Annotated[str, Meta(description="Bearer token for the quota endpoint.")] = ""
    quota_http_field: Annotated[
        str,
        Meta(description="Dotted path of the emails-available number in the JSON reply."),
    ] = "emails_available"
    quota_sync_interval_seconds: Annotated[
        Seconds, Meta(description="How often the quota is synced from the provider.")
    ] = 3600.0
    leader_ttl_seconds: Annotated[
        Annotated[float, Meta(ge=1)],
        Meta(description="Leader lease in NATS KV; a dead leader is replaced within it."),
    ] = 6.0
    reconcile_interval_seconds: Annotated[
        Seconds, Meta(description="How often the leader repairs queue anomalies.")
    ] = 300.0
    stuck_after_minutes: Annotated[
        Seconds, Meta(description="A campaign processing longer than this is reported.")
    ] = 30.0
    retention_send_log_days: Annotated[
        Annotated[int, Meta(ge=0)],
        Meta(description="Send-log rows older than this are removed by the leader (0: kept)."),
    ] = 365
    retention_audit_log_days: Annotated[
        Annotated[int, Meta(ge=0)],
        Meta(description="Audit-log rows older than this are removed by the leader (0: kept)."),
    ] = 730
    retention_recipients_days: Annotated[
        Annotated[int, Meta(ge=0)],
        Meta(
            description=(
                "Recipients of campaigns finished longer ago are removed, their counts kept "
                "(0: kept)."
            )
        ),
    ] = 365
    retention_batch_size: Annotated[
        PositiveInt,
        Meta(description="Rows one retention statement removes; each reconcile runs a few."),
    ] = 1000
    start_throttle_per_hour: Annotated[
        PositiveInt, Meta(description="Campaign starts one manager may make per hour.")
    ] = 10
    test_email_throttle_per_hour: Annotated[
        PositiveInt, Meta(description="Test emails one manager may send per hour.")
    ] = 5
    max_attachment_bytes: Annotated[PositiveInt, Meta(description="Largest single attachment.")] = (
        10 * 1024 * 1024
    )
    max_attachments_total_bytes: Annotated[
        PositiveInt, Meta(description="Largest sum of a campaign's attachments.")
    ] = 20 * 1024 * 1024

    events_max_bytes: Annotated[
        PositiveInt,
        Meta(
            description="Size cap of the JetStream events stream (reserved on the server's disk)."
        ),
    ] = 256 * 1024 * 1024

    # --- links -------------------------------------------------------------------
    public_url: Annotated[
        str,
        Meta(description="Public base URL of unsubscribe links (https:// in production)."),
    ] = "http://localhost:8081"
    unsubscribe_secret: Annotated[
        str,
        Meta(description="Key that seals new unsubscribe links; set it in production."),
    ] = "dev-unsubscribe-secret-change-me"  # noqa: S105 - refused in production
    unsubscribe_old_secrets: Annotated[
        str,
        Meta(
            description="Retired unsubscribe secrets, comma-separated: their links still "
            "work, nothing new is sealed with them; remove one to end its links."
        ),
    ] = ""

    # --- bounces and complaints --------------------------------------------------
    bounce_domain: Annotated[
        str,
        Meta(
            description="Domain of the per-recipient envelope senders (VERP,"
            " bounce+<token>@domain) and of the bounce receiver; empty: both off."
        ),
    ] = ""
    bounce_smtp_host: Annotated[
        str, Meta(description="Bind address of the inbound SMTP receiver of bounces.")
    ] = "127.0.0.1"
    bounce_smtp_port: Annotated[
        Port, Meta(description="Port of the inbound SMTP receiver of bounces (0: any free).")
    ] = 2525
    bounce_max_message_bytes: Annotated[
        PositiveInt, Meta(description="Largest report the bounce receiver accepts (552 past it).")
    ] = 1024 * 1024
    bounce_webhook_secret: Annotated[
        str,
        Meta(
            description="HMAC key of the provider webhook POST /bounces/webhook on the public"
            " server; empty: no webhook."
        ),
    ] = ""
    bounce_imap_host: Annotated[
        str,
        Meta(
            description="IMAP server of a bounce mailbox to read reports from (for providers"
            " that cannot route bounces to the receiver); empty: no IMAP poller."
        ),
    ] = ""
    bounce_imap_port: Annotated[
        Port,
        Meta(description="Port of the bounce mailbox's IMAP server (0: 993 with tls, else 143)."),
    ] = 0
    bounce_imap_security: Annotated[
        Literal["tls", "none"],
        Meta(description="Implicit `tls` or `none` (production: `none` only on loopback)."),
    ] = "tls"
    bounce_imap_username: Annotated[str, Meta(description="Login of the bounce mailbox.")] = ""
    bounce_imap_password: Annotated[str, Meta(description="Password of the bounce mailbox.")] = ""
    bounce_imap_mailbox: Annotated[
        str, Meta(description="Folder of the bounce mailbox to read.")
    ] = "INBOX"
    bounce_imap_delete: Annotated[
        bool,
        Meta(description="Delete handled messages (expunged); false: mark them seen."),
    ] = False
    bounce_imap_poll_seconds: Annotated[
        Seconds,
        Meta(
            description="How often to look for new messages when the server has no IDLE"
            " (with IDLE the server tells; the IDLE is renewed every 25 min)."
        ),
    ] = 60.0
    soft_bounce_limit: Annotated[
        PositiveInt,
        Meta(description="Soft bounces within the window that suppress an address."),
    ] = 3
    soft_bounce_window_days: Annotated[
        Seconds, Meta(description="Window of the soft-bounce count, in days.")
    ] = 7.0

    # --- process -------------------------------------------------------------------
    http_host: Annotated[
        str, Meta(description="Bind address of the internal server: /metrics, /healthz, /readyz.")
    ] = "127.0.0.1"
    http_port: Annotated[
        Port, Meta(description="Port of the internal server (0: any free); never expose it.")
    ] = 8080
    public_http_host: Annotated[
        str, Meta(description="Bind address of the public server: the unsubscribe pages.")
    ] = "127.0.0.1"
    public_http_port: Annotated[
        Port, Meta(description="Port of the public server (0: any free); MAILER_PUBLIC_URL's.")
    ] = 8081
    startup_timeout_seconds: Annotated[
        Seconds,
        Meta(
            description=(
                "How long start-up waits for PostgreSQL and NATS (retrying with backoff) "
                "before it exits 3."
            )
        ),
    ] = 60.0
    shutdown_timeout_seconds: Annotated[
        Seconds, Meta(description="Graceful-shutdown deadline before tasks are cancelled.")
    ] = 25.0
    var_dir: Annotated[
        str, Meta(description="Where `mailer dev` keeps the embedded stack and the outbox.")
    ] = "var"

    fault_injection: Annotated[
        bool,
        Meta(
            description="Development only: lets the chaos suite crash an actor on request "
            "(`mailer/faults.py`); refused in production."
        ),
    ] = False

    # --- logs ----------------------------------------------------------------------
    log_level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR"], Meta(description="Log level.")
    ] = "INFO"
    log_json: Annotated[
        bool | None, Meta(description="JSON log lines (default: on in production).")
    ] = None
    log_full_emails: Annotated[
        bool, Meta(description="Allow full addresses in DEBUG logs (never above DEBUG).")
    ] = False
    log_hash_salt: Annotated[
        str, Meta(description="Salt of email hashes in logs; production refuses the default.")
    ] = "mailer-dev-salt-change-me"
    log_each_send: Annotated[
        bool,
        Meta(
            description=(
                "One INFO line per accepted message; `false` keeps only the batch lines and "
                "the failed/retried recipients."
            )
        ),
    ] = True

    @property
    def effective_instance_id(self) -> str:
        return self.instance_id or f"{socket.gethostname()}-{os.getpid()}"

    @property
    def effective_dkim_domain(self) -> str:
        return self.dkim_domain or self.from_email.rpartition("@")[2]

    @property
    def effective_message_id_domain(self) -> str:
        if self.message_id_domain:
            return self.message_id_domain
        return self.from_email.rpartition("@")[2] or "localhost"

    @property
    def json_logs(self) -> bool:
        return self.env == "production" if self.log_json is None else self.log_json


class ConfigError(Exception):
    """A setting has a value it does not allow; the message names the variable."""


def env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def read_dotenv(path: Path) -> dict[str, str]:
    """Reads ``KEY=value`` lines; ``#`` comments and surrounding quotes are ignored."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.partition("=")
        key = key.strip().removeprefix("export ").strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key] = value
    return values


def _allowed(field: msgspec.inspect.Field) -> str:
    """Describes what a field accepts, for error messages."""
    t: Any = field.type
    if isinstance(t, msgspec.inspect.Metadata):
        parts = [_type_name(t.type)]
        for key in ("ge", "gt", "le", "lt", "pattern"):
            value = getattr(t, key, None)
            if value is not None:
                parts.append(f"{key} {value}")
        return ", ".join(parts)
    return _type_name(t)


def _type_name(t: msgspec.inspect.Type) -> str:
    if isinstance(t, msgspec.inspect.LiteralType):
        return "one of " + ", ".join(repr(v) for v in t.values)
    if isinstance(t, msgspec.inspect.UnionType):
        return " or ".join(
            _type_name(x) for x in t.types if not isinstance(x, msgspec.inspect.NoneType)
        )
    if isinstance(t, msgspec.inspect.IntType | msgspec.inspect.FloatType):
        name = "an integer" if isinstance(t, msgspec.inspect.IntType) else "a number"
        bounds = [
            f"{op} {value}"
            for op, value in ((">=", t.ge), (">", t.gt), ("<=", t.le), ("<", t.lt))
            if value is not None
        ]
        return " and ".join([f"{name} {bounds[0]}", *bounds[1:]]) if bounds else name
    if isinstance(t, msgspec.inspect.BoolType):
        return "true or false"
    if isinstance(t, msgspec.inspect.Metadata):
        return _type_name(t.type)
    if isinstance(t, msgspec.inspect.StrType) and t.pattern:
        return f"a string matching {t.pattern}"
    return "a string"


def _coerce(raw: str, field: msgspec.inspect.Field) -> Any:
    """Turns an environment string into the JSON-ish value msgspec validates."""
    t: Any = field.type
    while isinstance(t, msgspec.inspect.Metadata):
        t = t.type
    kinds = t.types if isinstance(t, msgspec.inspect.UnionType) else (t,)
    if any(isinstance(k, msgspec.inspect.BoolType) for k in kinds):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        if low == "" and any(isinstance(k, msgspec.inspect.NoneType) for k in kinds):
            return None
        return raw
    if any(isinstance(k, msgspec.inspect.IntType) for k in kinds):
        try:
            return int(raw.strip())
        except ValueError:
            return raw
    if any(isinstance(k, msgspec.inspect.FloatType) for k in kinds):
        try:
            return float(raw.strip())
        except ValueError:
            return raw
    return raw


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    dotenv: Path | None = Path(".env"),
    **overrides: Any,
) -> Settings:
    """Builds Settings from the environment (which wins over ``.env``) and overrides.

    Raises ConfigError naming the first variable whose value is not allowed.
    """
    env = dict(os.environ if environ is None else environ)
    source: dict[str, str] = {}
    if dotenv is not None:
        source.update(read_dotenv(dotenv))
    source.update(env)
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    values: dict[str, Any] = {}
    for field in info.fields:
        name = env_name(field.name)
        if field.name in _NOT_ENV and field.name not in overrides:
            continue
        if field.name in overrides:
            values[field.name] = overrides[field.name]
        elif name in source:
            values[field.name] = _coerce(source[name], field)
        else:
            continue
        try:
            msgspec.convert({field.name: values[field.name]}, _single_field_type(field.name))
        except msgspec.ValidationError as exc:
            shown = values[field.name]
            raise ConfigError(
                f"{name}={shown!r} is not allowed: expected {_allowed(field)} ({exc})"
            ) from None
    if "smtp_account_vars" not in overrides:
        values["smtp_account_vars"] = _account_vars(source, values.get("smtp_accounts", ""))
    unknown = sorted(
        k
        for k, v in source.items()
        if k.startswith(ENV_PREFIX)
        and k not in _known_env()
        and k not in dict(values["smtp_account_vars"])
        and not is_service_link(k, v)
    )
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)}; see the README's table")
    settings = msgspec.convert(values, Settings)
    _check_values(settings)
    _check_nats_auth(settings)
    _check_dkim(settings)
    _check_bounces(settings)
    _check_accounts(settings)
    if settings.env == "production":
        _check_production(settings)
    return settings


# URL schemes each client accepts: a wrong one is a configuration error (exit 2)
# found before anything connects, not a start-up failure after retries.
_SCHEMES = {
    "database_url": ("postgres", "postgresql"),
    "redis_url": ("redis", "rediss", "unix"),
    "nats_url": ("nats", "tls", "ws", "wss"),
}


def _check_values(s: Settings) -> None:
    """Checks what a field's type cannot: every value is known good before connecting."""
    try:
        ZoneInfo(s.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"{env_name('timezone')}={s.timezone!r} is not allowed: expected an IANA time "
            "zone name such as Europe/Moscow"
        ) from None
    for field, schemes in _SCHEMES.items():
        value: str = getattr(s, field)
        for url in filter(None, (u.strip() for u in value.split(","))):
            scheme = urlsplit(url).scheme.lower()
            if scheme not in schemes:
                shown = _mask(url)
                raise ConfigError(
                    f"{env_name(field)}={shown!r} is not allowed: expected a URL starting with "
                    + " or ".join(f"{x}://" for x in schemes)
                )


def _mask(url: str) -> str:
    """The URL with its password (or a lone user/token) replaced by ***."""
    parts = urlsplit(url)
    if "password=" in parts.query:  # libpq style: ?password=...
        query = re.sub(r"(password=)[^&]*", r"\1***", parts.query)
        parts = parts._replace(query=query)
        url = parts.geturl()
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***" if parts.password is not None else "***"
    return parts._replace(netloc=f"{user}@{host}").geturl()


def mask_url(urls: str) -> str:
    """``urls`` (one URL, or several comma-separated) with every secret replaced by ***."""
    return ",".join(_mask(u.strip()) for u in urls.split(",")) if urls else urls


def _check_nats_auth(s: Settings) -> None:
    """The NATS auth settings the Bus would refuse, refused now with the variables named."""
    from mailer.bus import check_auth, creds_file_problem  # the Bus owns these rules

    if s.nats_creds_file and (problem := creds_file_problem(s.nats_creds_file)):
        raise ConfigError(
            f"{env_name('nats_creds_file')}={s.nats_creds_file!r} is not allowed: "
            f"expected a NATS creds file (user JWT and NKey seed): {problem}"
        )
    try:
        check_auth(
            user=s.nats_user or None,
            password=s.nats_password or None,
            token=s.nats_token or None,
            creds_file=s.nats_creds_file or None,
            nkey_seed_file=s.nats_nkey_seed_file or None,
        )
    except ValueError as exc:
        names = ", ".join(
            env_name(f)
            for f in (
                "nats_user",
                "nats_password",
                "nats_token",
                "nats_creds_file",
                "nats_nkey_seed_file",
            )
        )
        raise ConfigError(f"{exc} (the NATS auth settings: {names})") from None


def _check_dkim(s: Settings) -> None:
    """A DKIM key that cannot sign verifiable messages stops the process at start."""
    from mailer.dkim import DkimError, dkim_signer  # the signer owns the key rules

    try:
        dkim_signer(s)
    except DkimError as exc:
        raise ConfigError(f"{env_name('dkim_key_file')}={s.dkim_key_file!r}: {exc}") from None


_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z0-9\-]{2,}")


# Fields that are not environment variables of their own.
_NOT_ENV = frozenset({"smtp_account_vars"})


def _account_vars(source: Mapping[str, str], accounts: object) -> tuple[tuple[str, str], ...]:
    """The MAILER_SMTP_<NAME>_* variables of the accounts MAILER_SMTP_ACCOUNTS names."""
    from mailer.accounts import account_env_names, checked_names

    checked_names(str(accounts))  # before its variables are looked for
    probe = Settings(smtp_accounts=str(accounts))
    allowed = account_env_names(probe)
    return tuple(sorted((k, v) for k, v in source.items() if k in allowed))


def _check_accounts(s: Settings) -> None:
    """Every account complete and valid, its DKIM key able to sign (exit 2 if not)."""
    from mailer.accounts import check_accounts

    accounts = check_accounts(s)
    if not accounts.several:
        return
    for account in accounts.accounts:
        try:
            _check_dkim(account.settings)
        except ConfigError as exc:
            raise ConfigError(f"MAILER_SMTP_{account.name.upper()}_DKIM_KEY_FILE: {exc}") from None


def _field(name: str) -> msgspec.inspect.Field:
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    return next(f for f in info.fields if f.name == name)


def _check_bounces(s: Settings) -> None:
    if s.bounce_domain and not _DOMAIN.fullmatch(s.bounce_domain):
        raise ConfigError(
            f"{env_name('bounce_domain')}={s.bounce_domain!r} is not allowed: expected a domain"
        )
    if s.bounce_webhook_secret and len(s.bounce_webhook_secret) < 16:
        raise ConfigError(f"{env_name('bounce_webhook_secret')} must have 16+ characters")
    if s.bounce_imap_host:
        if not s.bounce_domain:
            # A report is trusted only through a signed bounce address of that domain.
            raise ConfigError(
                f"{env_name('bounce_imap_host')} needs {env_name('bounce_domain')} (reports are"
                " matched through its signed bounce addresses)"
            )
        for field in ("bounce_imap_username", "bounce_imap_password"):
            if not getattr(s, field):
                raise ConfigError(
                    f"{env_name(field)} is required with {env_name('bounce_imap_host')}"
                )
        if not s.bounce_imap_mailbox.strip():
            raise ConfigError(f"{env_name('bounce_imap_mailbox')} must name a folder")


def _check_production(s: Settings) -> None:
    defaults = Settings()
    if s.log_hash_salt == defaults.log_hash_salt or len(s.log_hash_salt) < 16:
        raise ConfigError(
            f"{env_name('log_hash_salt')} must be set to a secret of 16+ characters in production"
        )
    if s.unsubscribe_secret == defaults.unsubscribe_secret or len(s.unsubscribe_secret) < 16:
        raise ConfigError(
            f"{env_name('unsubscribe_secret')} must be set to a secret of 16+ characters "
            "in production"
        )
    if any(len(x.strip()) < 16 for x in s.unsubscribe_old_secrets.split(",") if x.strip()):
        raise ConfigError(
            f"{env_name('unsubscribe_old_secrets')}: every retired secret has 16+ characters"
        )
    if s.fault_injection:
        raise ConfigError(f"{env_name('fault_injection')} is not allowed in production")
    for field in ("nats_url", "database_url", "redis_url"):
        if not getattr(s, field):
            raise ConfigError(f"{env_name(field)} is required in production")
    if (
        s.bounce_imap_host
        and s.bounce_imap_security == "none"
        and not _is_loopback(s.bounce_imap_host)
    ):
        # The mailbox's password in clear text over the network.
        raise ConfigError(
            f"{env_name('bounce_imap_security')}=none is not allowed in production with "
            f"{env_name('bounce_imap_host')}={s.bounce_imap_host!r}: use tls"
        )
    from mailer.accounts import check_accounts

    for account in check_accounts(s).accounts:
        _check_production_smtp(account.settings, several=bool(s.smtp_accounts.strip()))
    url = urlsplit(s.public_url)
    if url.scheme != "https" or not url.hostname:
        # Unsubscribe links go into List-Unsubscribe, which RFC 8058 one-click
        # unsubscribing requires to be an HTTPS URI; mail clients ignore others.
        raise ConfigError(
            f"{env_name('public_url')}={s.public_url!r} is not allowed in production: "
            "expected an https:// URL (List-Unsubscribe links must be HTTPS, RFC 8058)"
        )


def _check_production_smtp(a: Settings, *, several: bool) -> None:
    """One account's SMTP settings in production (``a``: the account's view)."""

    def var(suffix: str, field: str) -> str:
        return f"MAILER_SMTP_{a.smtp_account.upper()}_{suffix}" if several else env_name(field)

    if not a.smtp_host:
        raise ConfigError(f"{var('HOST', 'smtp_host')} is required in production")
    credentials = bool(a.smtp_username or a.smtp_password)
    if a.smtp_security == "none" and credentials and not _is_loopback(a.smtp_host):
        # A password in clear text over the network: anyone on the path can read
        # it and send as the company. A relay on the pod's own loopback (a
        # sidecar) is the one place plaintext AUTH is acceptable.
        raise ConfigError(
            f"{var('SECURITY', 'smtp_security')}='none' with SMTP credentials to "
            f"{a.smtp_host!r} is not allowed in production: use 'starttls' or 'tls', "
            "or a relay on loopback"
        )


_FIELD_TYPES: dict[str, Any] = {}


def _hints() -> dict[str, Any]:
    return typing.get_type_hints(Settings, include_extras=True)


def _single_field_type(field_name: str) -> Any:
    """A one-field Struct with the same annotation, to validate fields one by one."""
    cached = _FIELD_TYPES.get(field_name)
    if cached is None:
        cached = msgspec.defstruct(f"_{field_name}", [(field_name, _hints()[field_name])])
        _FIELD_TYPES[field_name] = cached
    return cached


# The variables a kubelet injects into every container for every Service of the
# namespace (Docker-links style, unless the pod says enableServiceLinks: false).
# A Service named "mailer" or "mailer-…" yields MAILER_SERVICE_HOST,
# MAILER_PORT_8080_TCP_ADDR and so on, which are not settings. Each is recognized
# by its name's shape AND its value's, so a misspelled setting such as
# MAILER_SMPT_PORT=25 is still refused: a kubelet's *_PORT is "tcp://ip:port".
_IP = "ip"
_PORT = "port"
_PROTO = "proto"
_URL = "url"
_SERVICE_LINKS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?:[A-Z0-9_]+_)?SERVICE_HOST"), _IP),
    (re.compile(r"(?:[A-Z0-9_]+_)?SERVICE_PORT(?:_[A-Z0-9_]+)?"), _PORT),
    (re.compile(r"(?:[A-Z0-9_]+_)?PORT(?:_[0-9]+_(?:TCP|UDP|SCTP))?"), _URL),
    (re.compile(r"(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_PROTO"), _PROTO),
    (re.compile(r"(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_PORT"), _PORT),
    (re.compile(r"(?:[A-Z0-9_]+_)?PORT_[0-9]+_(?:TCP|UDP|SCTP)_ADDR"), _IP),
)
_LINK_URL = re.compile(r"(?:tcp|udp|sctp)://(\[[0-9a-fA-F:]+\]|[0-9.]+):([0-9]{1,5})")


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value.strip("[]"))
    except ValueError:
        return False
    return True


def is_service_link(name: str, value: str) -> bool:
    """Whether ``name=value`` is a Service variable a kubelet injected, not a setting."""
    if not name.startswith(ENV_PREFIX):
        return False
    rest = name.removeprefix(ENV_PREFIX)
    for pattern, kind in _SERVICE_LINKS:
        if not pattern.fullmatch(rest):
            continue
        if kind == _IP and _is_ip(value):
            return True
        if kind == _PORT and value.isdigit() and 0 < int(value) <= 65535:
            return True
        if kind == _PROTO and value in ("tcp", "udp", "sctp"):
            return True
        m = _LINK_URL.fullmatch(value) if kind == _URL else None
        if m is not None and _is_ip(m.group(1)):
            return True
    return False


def _known_env() -> set[str]:
    return {env_name(f) for f in Settings.__struct_fields__ if f not in _NOT_ENV}


def _description(field_name: str) -> str:
    for extra in typing.get_args(_hints()[field_name])[1:]:
        if isinstance(extra, Meta) and extra.description:
            return str(extra.description)
    return ""


def settings_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) rows in declaration order: the README's table."""
    info = msgspec.inspect.type_info(Settings)
    assert isinstance(info, msgspec.inspect.StructType)
    rows: list[tuple[str, str, str]] = []
    for field in info.fields:
        if field.name in _NOT_ENV:
            continue
        default = field.default
        if default is None or default is msgspec.NODEFAULT:
            shown = ""
        elif isinstance(default, bool):
            shown = str(default).lower()
        else:
            shown = str(default)
        rows.append((env_name(field.name), shown, _description(field.name)))
    return rows
