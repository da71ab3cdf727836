"""Where and how the client connects: the same ``MAILER_NATS_*`` settings as the service."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from mailer.bus import _auth_options
from mailer.config import Settings, load_settings

__all__ = ["DEFAULT_URL", "ClientOptions", "Identity"]

# nats-py's own default: a NATS server on this machine.
DEFAULT_URL = "nats://127.0.0.1:4222"


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """Who acts (``Mailer-User``), with which roles (``Mailer-Roles``), in which
    language replies are (``Mailer-Lang``: ``en``, or ``ru``/empty for Russian)."""

    user: str = ""
    roles: tuple[str, ...] = ()
    lang: str = ""

    def headers(self) -> dict[str, str]:
        from mailer.bus import LANG_HEADER, ROLES_HEADER, USER_HEADER

        found = {USER_HEADER: self.user}
        if self.roles:
            found[ROLES_HEADER] = ",".join(self.roles)
        if self.lang:
            found[LANG_HEADER] = self.lang
        return found


class ClientOptions(msgspec.Struct, frozen=True, kw_only=True):
    """The NATS connection of a client and the subject prefix of the mailer it talks to."""

    url: str = DEFAULT_URL
    prefix: str = "mailer"
    user: str = ""
    password: str = ""
    token: str = ""
    creds_file: str = ""
    nkey_seed_file: str = ""
    # How long one request waits for its reply.
    timeout: float = 10.0
    name: str = "mailer-client"

    @classmethod
    def from_settings(cls, s: Settings, **overrides: Any) -> ClientOptions:
        values: dict[str, Any] = {
            "url": s.nats_url or DEFAULT_URL,
            "prefix": s.subject_prefix,
            "user": s.nats_user,
            "password": s.nats_password,
            "token": s.nats_token,
            "creds_file": s.nats_creds_file,
            "nkey_seed_file": s.nats_nkey_seed_file,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        dotenv: Path | None = Path(".env"),
        **overrides: Any,
    ) -> ClientOptions:
        """From ``MAILER_NATS_URL``, ``MAILER_NATS_USER``/``PASSWORD``/``TOKEN``/
        ``CREDS_FILE``/``NKEY_SEED_FILE`` and ``MAILER_SUBJECT_PREFIX`` (and ``.env``),
        checked as the service checks them (``mailer.config.ConfigError``)."""
        return cls.from_settings(load_settings(environ, dotenv=dotenv), **overrides)

    def connect_options(self) -> dict[str, Any]:
        """nats.connect keyword arguments for the one configured way to authenticate."""
        return _auth_options(
            user=self.user or None,
            password=self.password or None,
            token=self.token or None,
            creds_file=self.creds_file or None,
            nkey_seed_file=self.nkey_seed_file or None,
        )
