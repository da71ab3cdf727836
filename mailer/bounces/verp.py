"""Per-recipient envelope senders (VERP): ``bounce+<token>@<bounce domain>``.

A delivery status notification goes to the envelope sender of the message it
is about, so the address it arrives at names the recipient without guessing
from the report's text. The token is ``base32(0x01 | recipient id | MAC)``,
lower case and unpadded: 31 characters, so the local part (``bounce+`` and the
token, 38 characters) stays far below the 64 RFC 5321 allows, and it survives
MTAs that lower-case local parts. The MAC is 80 bits of keyed BLAKE2b, keyed by
a key derived from ``MAILER_UNSUBSCRIBE_SECRET`` (and the retired ones, like
unsubscribe links): nobody without the key can make an address that names a
recipient, so a forged or altered bounce address is simply not ours.

Signed, not sealed: the recipient id is a database number, not an address,
and a sealed token would not fit in a local part.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Sequence
from typing import Final

__all__ = ["LOCAL_PREFIX", "bounce_address", "recipient_of"]

LOCAL_PREFIX: Final = "bounce+"
_VERSION: Final = b"\x01"
_KEY_LABEL: Final = b"mailer bounce address v1"
_ID_BYTES: Final = 8
_MAC_BYTES: Final = 10
_TOKEN: Final = re.compile(r"\A[a-z2-7]{31}\Z")


def _key(secret: str) -> bytes:
    return hmac.new(secret.encode(), _KEY_LABEL, hashlib.sha256).digest()


def _mac(secret: str, body: bytes) -> bytes:
    return hashlib.blake2b(body, key=_key(secret), digest_size=_MAC_BYTES).digest()


def token(secret: str, recipient_id: int) -> str:
    body = _VERSION + recipient_id.to_bytes(_ID_BYTES, "big")
    raw = body + _mac(secret, body)
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def bounce_address(secret: str, domain: str, recipient_id: int) -> str:
    """The envelope sender of recipient ``recipient_id``'s message."""
    return f"{LOCAL_PREFIX}{token(secret, recipient_id)}@{domain}"


def recipient_of(secrets: Sequence[str], domain: str, address: str) -> int | None:
    """The recipient id of a genuine bounce address of ``domain``; None otherwise.

    Case-insensitive (MTAs may change the case); anything but the exact
    canonical token of one of ``secrets`` is refused.
    """
    local, _, dom = address.strip().strip("<>").rpartition("@")
    if dom.lower() != domain.lower() or not local.lower().startswith(LOCAL_PREFIX):
        return None
    text = local[len(LOCAL_PREFIX) :].lower()
    if not _TOKEN.fullmatch(text):
        return None
    try:
        raw = base64.b32decode(text.upper() + "=")
    except binascii.Error:
        return None
    if len(raw) != 1 + _ID_BYTES + _MAC_BYTES or not raw.startswith(_VERSION):
        return None
    body, mac = raw[: 1 + _ID_BYTES], raw[1 + _ID_BYTES :]
    for secret in secrets:
        if hmac.compare_digest(_mac(secret, body), mac):
            rid = int.from_bytes(body[1:], "big")
            # Canonical text only (base32's last character has spare bits).
            return rid if token(secret, rid) == text else None
    return None
