"""Unsubscribe links: opaque, sealed, and nobody can make one by guessing.

A token is ``base64url(0x02 | XSalsa20-Poly1305(campaign_id, email))``
(libsodium's secret box: a random 24-byte nonce and a 16-byte MAC), keyed by a
key derived from ``MAILER_UNSUBSCRIBE_SECRET``. Sealed, not only signed: the
link ends up in every proxy's and web server's access log, and the address
must not be readable there in any encoding — the old format carried it in
plain base64. ``verify`` returns the campaign and the address only for a
token one of our keys sealed, and only for its exact text: the decoding is
strict (the URL-safe alphabet, no padding, canonical trailing bits), so one
character changed, inserted or removed — or any non-ASCII one — fails it.

Keys rotate: a new ``MAILER_UNSUBSCRIBE_SECRET`` seals every new link, and the
retired ones listed in ``MAILER_UNSUBSCRIBE_OLD_SECRETS`` still open the links
they made (mail already delivered); removing a secret from that list ends its
links. Links of the first format (``base64url(campaign_id:email) "."
base64url(HMAC-SHA256)[:22]``, already in mailboxes) keep working, checked
just as strictly — they must be exactly what one of the keys would sign — and
end the same way, with the retirement of the secret that signed them.

``PgUnsubscribes`` records an unsubscribe (the pages in ``unsubscribe_http``
use it); the claim query skips every recorded address in later campaigns.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec
import nacl.exceptions
import nacl.secret

from mailer.config import Settings
from mailer.db import Q
from mailer.messages import Notice
from mailer.outbox import store_notice

__all__ = [
    "PgUnsubscribes",
    "Recorded",
    "secrets_of",
    "sign",
    "unsubscribe_url",
    "verify",
]

_VERSION: Final = b"\x02"
_KEY_LABEL: Final = b"mailer unsubscribe token v2"
_CAMPAIGN_BYTES: Final = 8
_SEALED_MIN: Final = (
    len(_VERSION)
    + nacl.secret.SecretBox.NONCE_SIZE
    + (nacl.secret.SecretBox.MACBYTES + _CAMPAIGN_BYTES + 1)
)
_TOKEN: Final = re.compile(r"\A[A-Za-z0-9_-]+\Z")
_LEGACY_TOKEN: Final = re.compile(r"\A[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\Z")
_LEGACY_MAC_CHARS: Final = 22  # 132 bits of the MAC: far beyond guessing


def secrets_of(s: Settings) -> list[str]:
    """The current secret first, then the retired ones still accepted."""
    old = [x.strip() for x in s.unsubscribe_old_secrets.split(",") if x.strip()]
    return [s.unsubscribe_secret, *old]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes | None:
    """Strict base64url without padding: only its alphabet, and the one canonical
    text of the bytes (``urlsafe_b64decode`` would skip junk characters and
    ignore trailing bits, so several texts would open one link)."""
    if not _TOKEN.fullmatch(text) or len(text) % 4 == 1:
        return None
    try:
        data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except binascii.Error:
        return None
    return data if _b64(data) == text else None


def _box(secret: str) -> nacl.secret.SecretBox:
    key = hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()
    return nacl.secret.SecretBox(key)


def sign(secret: str, campaign_id: int, email: str) -> str:
    """A new link's token for ``email`` in ``campaign_id``, sealed with ``secret``."""
    plain = campaign_id.to_bytes(_CAMPAIGN_BYTES, "big") + email.strip().lower().encode()
    return _b64(_VERSION + bytes(_box(secret).encrypt(plain)))


def verify(secrets: Sequence[str], token: str) -> tuple[int, str] | None:
    """(campaign_id, email) for a genuine token of any of ``secrets``; None otherwise."""
    if "." in token:
        return _verify_legacy(secrets, token)
    raw = _unb64(token)
    if raw is None or len(raw) < _SEALED_MIN or not raw.startswith(_VERSION):
        return None
    sealed = raw[len(_VERSION) :]
    for secret in secrets:
        try:
            plain = _box(secret).decrypt(sealed)
        except nacl.exceptions.CryptoError:
            continue
        try:
            email = plain[_CAMPAIGN_BYTES:].decode("utf-8")
        except UnicodeDecodeError:  # pragma: no cover - we sealed it: cannot happen
            return None
        return int.from_bytes(plain[:_CAMPAIGN_BYTES], "big"), email
    return None


def _sign_legacy(secret: str, campaign_id: int, email: str) -> str:
    payload = f"{campaign_id}:{email}".encode()
    mac = _b64(hmac.new(secret.encode(), payload, hashlib.sha256).digest())[:_LEGACY_MAC_CHARS]
    return f"{_b64(payload)}.{mac}"


def _verify_legacy(secrets: Sequence[str], token: str) -> tuple[int, str] | None:
    """A first-format link: valid only if it is exactly what a key would sign."""
    if not _LEGACY_TOKEN.fullmatch(token):
        return None
    payload = _unb64(token.partition(".")[0])
    if payload is None:
        return None
    try:
        campaign, _, email = payload.decode("utf-8").partition(":")
    except UnicodeDecodeError:
        return None
    if not email or not campaign.isascii() or not campaign.isdigit():
        return None
    for secret in secrets:
        if hmac.compare_digest(token, _sign_legacy(secret, int(campaign), email)):
            return int(campaign), email
    return None


def unsubscribe_url(public_url: str, secret: str, campaign_id: int, email: str) -> str:
    # The token's alphabet needs no quoting in a path.
    return f"{public_url.rstrip('/')}/u/{sign(secret, campaign_id, email)}"


class Recorded(msgspec.Struct, frozen=True, kw_only=True):
    created_at: datetime  # when the address was first unsubscribed
    new: bool  # False: it already was (a repeated click or one-click POST)


class PgUnsubscribes:
    """The unsubscribe table (and its audit rows) on an asyncpg pool."""

    def __init__(self, pool: Any) -> None:
        self._pool = pool

    async def record(
        self,
        email: str,
        *,
        source: str,
        campaign_id: int | None,
        audit: dict[str, str],
        now: datetime,
        notice: Notice | None = None,
    ) -> Recorded:
        """Idempotent: the first call records (and audits) it, later ones find it.

        ``notice``: the unsubscribe event (recorded at ``now``), stored in the
        event outbox in the same transaction as the first record, so it is
        never lost between the two; a repeated call stores none.
        """
        async with self._pool.acquire() as conn:
            async with conn.transaction():
                created = await conn.fetchval(
                    Q["unsubscribe-insert"], email, source, now, campaign_id, audit
                )
                if created is not None and notice is not None:
                    await store_notice(conn, notice, now)
            if created is not None:
                return Recorded(created_at=created, new=True)
            # A separate statement: its snapshot sees a row another request
            # committed while ours waited on the conflict.
            row = await conn.fetchrow(Q["unsubscribe-get"], email)
        if row is None:  # pragma: no cover - the row cannot vanish but by a manual delete
            raise RuntimeError("unsubscribe row neither inserted nor found")
        return Recorded(created_at=row["created_at"], new=False)
