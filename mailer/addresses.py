"""Email address checks for recipients added through the API.

Deliberately pragmatic (RFC 5321 limits, one ``@``, a dotted domain that
IDNA-encodes): internationalized addresses are accepted; quoted local parts
and IP-literal domains, which CRM lists never hold, are refused.
"""

from __future__ import annotations

import re
from functools import lru_cache

__all__ = ["normalize", "validate"]

_LOCAL = re.compile(r"^[^\s@\"(),:;<>\[\\\]]+$")
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def normalize(address: str) -> str:
    """The form used for duplicate and unsubscribe checks."""
    return address.strip().lower()


def validate(address: str) -> str | None:
    """Returns None for an acceptable address, else the reason it is not."""
    if address != address.strip():
        return "surrounding whitespace"
    if len(address) > 254:
        return "longer than 254 characters"
    if address.count("@") != 1:
        return "must contain exactly one @"
    local, domain = address.split("@")
    if not local or len(local.encode()) > 64:
        return "bad local part length"
    if not _LOCAL.match(local) or local.startswith(".") or local.endswith(".") or ".." in local:
        return "bad characters in local part"
    return _domain_reason(domain)


# A list of a million addresses has a few thousand domains: IDNA-encoding each domain once
# is most of what a bulk import's validation saves (recipients.import).
@lru_cache(maxsize=65536)
def _domain_reason(domain: str) -> str | None:
    try:
        ascii_domain = domain.encode("idna").decode("ascii").lower()
    except UnicodeError:
        return "domain is not a valid hostname"
    labels = ascii_domain.split(".")
    if len(labels) < 2 or not all(_LABEL.match(label) for label in labels):
        return "domain is not a valid hostname"
    if labels[-1].isdigit():
        return "domain is not a valid hostname"
    return None
