"""Signed unsubscribe links: nobody can unsubscribe someone else by guessing.

A token is ``base64url(campaign_id:email) "." base64url(HMAC-SHA256)[:22]``;
the HMAC key is ``MAILER_UNSUBSCRIBE_SECRET``. ``verify`` returns the address
and campaign only for a token this key signed.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from urllib.parse import quote

__all__ = ["sign", "unsubscribe_url", "verify"]

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
