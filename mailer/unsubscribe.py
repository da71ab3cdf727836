"""Signed unsubscribe links: nobody can unsubscribe someone else by guessing.

A token is ``base64url(campaign_id:email) "." base64url(HMAC-SHA256)[:22]``;
the HMAC key is ``MAILER_UNSUBSCRIBE_SECRET``. ``verify`` returns the address
and campaign only for a token this key signed.

``PgUnsubscribes`` records an unsubscribe (the pages in ``unsubscribe_http``
use it); the claim query skips every recorded address in later campaigns.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from datetime import datetime
from typing import Any
from urllib.parse import quote

import msgspec

from mailer.db import Q
from mailer.messages import Notice

__all__ = ["PgUnsubscribes", "Recorded", "sign", "unsubscribe_url", "verify"]

_MAC_CHARS = 22  # 132 bits of the MAC: far beyond guessing


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, payload: bytes) -> str:
    return _b64(hmac.new(secret.encode(), payload, hashlib.sha256).digest())[:_MAC_CHARS]


def sign(secret: str, campaign_id: int, email: str) -> str:
    payload = f"{campaign_id}:{email.strip().lower()}".encode()
    return f"{_b64(payload)}.{_mac(secret, payload)}"


def verify(secret: str, token: str) -> tuple[int, str] | None:
    """(campaign_id, email) for a genuine token; None for a forged or malformed one."""
    try:
        body, mac = token.split(".")
        payload = _unb64(body)
        campaign, _, email = payload.decode("utf-8").partition(":")
        if not email or not campaign.isdigit():
            return None
    except (ValueError, UnicodeDecodeError):
        return None
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        return None
    return int(campaign), email


def unsubscribe_url(public_url: str, secret: str, campaign_id: int, email: str) -> str:
    return f"{public_url.rstrip('/')}/u/{quote(sign(secret, campaign_id, email))}"


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
                    await conn.execute(
                        Q["outbox-insert"],
                        notice.kind,
                        notice.subject,
                        notice.msg_id,
                        notice.payload,
                        notice.campaign_id,
                        now,
                    )
            if created is not None:
                return Recorded(created_at=created, new=True)
            # A separate statement: its snapshot sees a row another request
            # committed while ours waited on the conflict.
            row = await conn.fetchrow(Q["unsubscribe-get"], email)
        if row is None:  # pragma: no cover - the row cannot vanish but by a manual delete
            raise RuntimeError("unsubscribe row neither inserted nor found")
        return Recorded(created_at=row["created_at"], new=False)
