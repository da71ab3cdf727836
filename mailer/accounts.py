"""The SMTP accounts: which provider accounts mail goes through, each with its own limits.

With ``MAILER_SMTP_ACCOUNTS`` unset there is one account, the flat ``MAILER_SMTP_*``
settings, named ``MAILER_SMTP_ACCOUNT`` — exactly the single-account service. With
``MAILER_SMTP_ACCOUNTS=main,backup`` each named account is configured by
``MAILER_SMTP_<NAME>_<SUFFIX>`` (``ACCOUNT_SUFFIXES``); the default is
``MAILER_SMTP_DEFAULT_ACCOUNT`` or the first name. An account named as
``MAILER_SMTP_ACCOUNT`` starts from the flat settings (so a backup is added to a
running setup by naming both); any other starts from them without the host,
port, credentials, DKIM key and quota endpoint, which are its own to give.

Each account is a ``Settings`` view (``Account.settings``): the process's
settings with that account's SMTP, From, rate, quota and DKIM values. The parts
built per account (transport, breaker, limiter, governor, quota sync, DKIM
signer) take that view and need not know accounts exist.

Where an account is kept in PostgreSQL (its quota row, the send log's
``account``), the default account is ``''`` / NULL: it keeps the quota row and
the send-log history of the single-account setup.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping

import msgspec

from mailer.config import ConfigError, Settings, env_name

__all__ = [
    "ACCOUNT_SUFFIXES",
    "Account",
    "Accounts",
    "UnknownAccount",
    "account_env_names",
    "accounts_of",
    "check_accounts",
    "checked_names",
]

# MAILER_SMTP_<NAME>_<SUFFIX> -> the Settings field it sets for that account.
ACCOUNT_SUFFIXES: dict[str, str] = {
    "HOST": "smtp_host",
    "PORT": "smtp_port",
    "SECURITY": "smtp_security",
    "USERNAME": "smtp_username",
    "PASSWORD": "smtp_password",
    "TIMEOUT_SECONDS": "smtp_timeout_seconds",
    "CONNECTIONS": "smtp_connections",
    "FROM_EMAIL": "from_email",
    "FROM_DOMAIN": "",  # from_email with the default's local part and this domain
    "FROM_NAME": "from_name",
    "MESSAGE_ID_DOMAIN": "message_id_domain",
    "RATE_PER_HOUR": "rate_per_hour",
    "MONTHLY_QUOTA": "monthly_quota",
    "QUOTA_PROVIDER": "quota_provider",
    "QUOTA_HTTP_URL": "quota_http_url",
    "QUOTA_HTTP_TOKEN": "quota_http_token",
    "QUOTA_HTTP_FIELD": "quota_http_field",
    "DKIM_KEY_FILE": "dkim_key_file",
    "DKIM_SELECTOR": "dkim_selector",
    "DKIM_DOMAIN": "dkim_domain",
}
# What an account other than the flat one does not inherit: where it sends,
# as whom, and what proves it. Rates, quota size, connections, From are inherited.
_OWN: dict[str, object] = {
    "smtp_host": "",
    "smtp_port": 0,
    "smtp_username": "",
    "smtp_password": "",
    "dkim_key_file": "",
    "dkim_domain": "",
    "quota_provider": "local",
    "quota_http_url": "",
    "quota_http_token": "",
    "message_id_domain": "",
}
# An account's port when it names none: submission with STARTTLS, implicit TLS, plain SMTP.
_PORTS = {"starttls": 587, "tls": 465, "none": 25}
_NAME = re.compile(r"[a-z][a-z0-9]{0,31}")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z0-9\-]{2,}")


class UnknownAccount(LookupError):
    """A campaign names an account that is not configured."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown SMTP account {name!r}; configured: {', '.join(self.known)}")


class Account(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    default: bool
    # The process's settings as this account sees them (SMTP, From, limits, DKIM).
    settings: Settings

    @property
    def key(self) -> str:
        """The account in PostgreSQL (quota row, send log): '' for the default."""
        return "" if self.default else self.name

    @property
    def rate_per_hour(self) -> int:
        return self.settings.rate_per_hour


class Accounts(msgspec.Struct, frozen=True, kw_only=True):
    accounts: tuple[Account, ...]
    # Several accounts configured (MAILER_SMTP_ACCOUNTS): texts name the account.
    several: bool

    @property
    def default(self) -> Account:
        return next(a for a in self.accounts if a.default)

    @property
    def names(self) -> list[str]:
        return [a.name for a in self.accounts]

    def get(self, name: str | None) -> Account:
        """The named account (None: the default); raises UnknownAccount."""
        if name is None:
            return self.default
        for a in self.accounts:
            if a.name == name:
                return a
        raise UnknownAccount(name, self.names)

    def find(self, name: str | None) -> Account | None:
        try:
            return self.get(name)
        except UnknownAccount:
            return None


def account_env_names(s: Settings) -> set[str]:
    """The per-account variables ``s.smtp_accounts`` allows (for the unknown-name check)."""
    return {
        f"MAILER_SMTP_{name.upper()}_{suffix}"
        for name in _names(s.smtp_accounts)
        for suffix in ACCOUNT_SUFFIXES
    }


def _names(raw: str) -> list[str]:
    return [n.strip().lower() for n in raw.split(",") if n.strip()]


def checked_names(raw: str) -> list[str]:
    """The names MAILER_SMTP_ACCOUNTS gives, each usable in a variable's name, once."""
    names = _names(raw)
    var = env_name("smtp_accounts")
    for n in names:
        if not _NAME.fullmatch(n):
            raise ConfigError(
                f"{var}={raw!r} is not allowed: account name {n!r} must be a "
                "letter then letters or digits (at most 32)"
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"{var}={raw!r} is not allowed: a name is repeated")
    return names


@functools.lru_cache(maxsize=32)
def accounts_of(s: Settings) -> Accounts:
    """The configured accounts (checked by ``load_settings``; raises ConfigError)."""
    return check_accounts(s)


def check_accounts(s: Settings) -> Accounts:
    if not s.smtp_accounts.strip():
        if s.smtp_account_vars:
            first = s.smtp_account_vars[0][0]
            raise ConfigError(f"{first} needs MAILER_SMTP_ACCOUNTS to name its account")
        only = Account(name=s.smtp_account, default=True, settings=s)
        return Accounts(accounts=(only,), several=False)
    names = checked_names(s.smtp_accounts)
    var = env_name("smtp_accounts")
    default = s.smtp_default_account.strip().lower() or names[0]
    if default not in names:
        raise ConfigError(
            f"{env_name('smtp_default_account')}={s.smtp_default_account!r} is not allowed: "
            f"expected one of {var} ({', '.join(names)})"
        )
    given = _given(s.smtp_account_vars, names)
    accounts = tuple(
        _account(s, name, given.get(name, {}), default=name == default) for name in names
    )
    return Accounts(accounts=accounts, several=True)


def _given(pairs: Iterable[tuple[str, str]], names: list[str]) -> dict[str, dict[str, str]]:
    """MAILER_SMTP_<NAME>_<SUFFIX>=value pairs, by account and suffix."""
    by: dict[str, dict[str, str]] = {}
    for var, value in pairs:
        for name in names:
            prefix = f"MAILER_SMTP_{name.upper()}_"
            suffix = var.removeprefix(prefix)
            if suffix != var and suffix in ACCOUNT_SUFFIXES:
                by.setdefault(name, {})[suffix] = value
                break
        else:
            raise ConfigError(
                f"unknown setting: {var} (per-account variables are MAILER_SMTP_<NAME>_"
                f"{{{','.join(ACCOUNT_SUFFIXES)}}} for a name in MAILER_SMTP_ACCOUNTS)"
            )
    return by


def _account(s: Settings, name: str, given: Mapping[str, str], *, default: bool) -> Account:
    from mailer.config import _allowed, _coerce, _field, _single_field_type

    inherits = name == s.smtp_account  # the flat MAILER_SMTP_* account
    values: dict[str, object] = {} if inherits else dict(_OWN)
    values["smtp_account"] = name
    prefix = f"MAILER_SMTP_{name.upper()}_"
    for suffix, raw in given.items():
        var = prefix + suffix
        if suffix == "FROM_DOMAIN":
            if not _DOMAIN.fullmatch(raw.strip()):
                raise ConfigError(f"{var}={raw!r} is not allowed: expected a domain")
            continue
        field = _field(ACCOUNT_SUFFIXES[suffix])
        value = _coerce(raw, field)
        try:
            msgspec.convert({field.name: value}, _single_field_type(field.name))
        except msgspec.ValidationError as exc:
            raise ConfigError(
                f"{var}={raw!r} is not allowed: expected {_allowed(field)} ({exc})"
            ) from None
        values[field.name] = value
    if "FROM_DOMAIN" in given:
        if "FROM_EMAIL" in given:
            raise ConfigError(f"{prefix}FROM_EMAIL and {prefix}FROM_DOMAIN: give one of them")
        local = s.from_email.rpartition("@")[0] or "crm"
        values["from_email"] = f"{local}@{given['FROM_DOMAIN'].strip()}"
    if not inherits and "PORT" not in given:
        # The standard port of its security (the flat account's 0 means the dev sink's).
        security = values.get("smtp_security", s.smtp_security)
        values["smtp_port"] = _PORTS[str(security)]
    view = msgspec.structs.replace(s, **values)
    if not view.smtp_host and not inherits:
        raise ConfigError(f"{prefix}HOST is required (the SMTP server of account {name!r})")
    if view.quota_provider == "http" and not view.quota_http_url:
        raise ConfigError(f"{prefix}QUOTA_HTTP_URL is required with QUOTA_PROVIDER=http")
    return Account(name=name, default=default, settings=view)
