"""DKIM signing (RFC 6376) built for throughput: the campaign's part once, the rest per message.

A DKIM signature covers headers that differ for every recipient (To, Date,
Message-ID, List-Unsubscribe) and a body that is personalized, so one
signature per message cannot be avoided. What can be done once is done once:
the key is loaded and checked when the signer is made; the relaxed canonical
form of the campaign's static headers (From, Subject) and the fixed fields of
the DKIM-Signature header are built once per template (``DkimSigner.bind``).
Per message only the body hash (SHA-256 over the body chunks, which are shared
with the message and never joined), the canonical per-recipient headers and the
signature itself are computed.

Canonicalization is ``relaxed/simple``: relaxed headers survive the re-folding
relays do, simple body canonicalization lets the body be hashed as the exact
bytes the message carries.

Keys: an RSA key (``a=rsa-sha256``, what every receiver verifies) or an Ed25519
key (``a=ed25519-sha256``, RFC 8463), PEM, read from a file. The signing itself
is OpenSSL's through ``cryptography`` (an RSA-2048 signature costs ~0.5 ms; the
pure-Python one in dkimpy ~10 ms, which would cap a process near 100 msg/s).
dkimpy verifies: ``DkimSigner.load`` signs a probe message and verifies it with
dkimpy against the public key derived from the private one, so a key the
world cannot verify stops the process at start instead of spoiling a campaign.

Signed headers, in this order (RFC 8058 asks for both List-Unsubscribe ones):
From, Subject, Date, Message-ID, To, List-Unsubscribe, List-Unsubscribe-Post.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

if TYPE_CHECKING:
    from mailer.config import Settings

__all__ = ["SIGNED_HEADERS", "BoundSigner", "DkimError", "DkimSigner", "dkim_signer"]

SIGNED_HEADERS: tuple[str, ...] = (
    "from",
    "subject",
    "date",
    "message-id",
    "to",
    "list-unsubscribe",
    "list-unsubscribe-post",
)
_PER_MESSAGE = SIGNED_HEADERS[2:]

_WSP = re.compile(rb"[ \t]+")
_SELECTOR = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?(?:\.[A-Za-z0-9\-]+)*")
_DOMAIN = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9\-]*[A-Za-z0-9])?\.)+[A-Za-z0-9\-]{2,}")


class DkimError(ValueError):
    """The DKIM configuration cannot produce signatures that verify."""


def relaxed_header(name: str | bytes, value: bytes) -> bytes:
    """RFC 6376 3.4.2: lower-case name, unfolded value, WSP runs as one SP, no WSP at the ends."""
    raw_name = name.encode("ascii") if isinstance(name, str) else name
    unfolded = value.replace(b"\r\n", b"")
    return raw_name.strip().lower() + b":" + _WSP.sub(b" ", unfolded).strip(b" ") + b"\r\n"


def _header_values(block: bytes) -> dict[bytes, bytes]:
    """name (lower case) -> raw value of each header in a CRLF header block (first wins)."""
    fields: dict[bytes, bytes] = {}
    name: bytes | None = None
    value = b""
    for line in block.split(b"\r\n"):
        if line[:1] in (b" ", b"\t") and name is not None:
            value += b"\r\n" + line
            continue
        if name is not None:
            fields.setdefault(name, value)
        head, sep, rest = line.partition(b":")
        name, value = (head.strip().lower(), rest) if sep else (None, b"")
    if name is not None:
        fields.setdefault(name, value)
    return fields


@dataclass(frozen=True)
class DkimSigner:
    """A loaded, checked key with its selector and domain; immutable, shareable."""

    domain: str
    selector: str
    algorithm: str  # "rsa-sha256" or "ed25519-sha256"
    _key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey

    @classmethod
    def load(cls, key_file: Path, *, selector: str, domain: str) -> DkimSigner:
        """Reads and checks the key; raises ``DkimError`` saying what is wrong."""
        try:
            pem = key_file.read_bytes()
        except OSError as exc:
            raise DkimError(f"cannot read the DKIM key file {key_file}: {exc.strerror}") from None
        return cls.from_pem(pem, selector=selector, domain=domain)

    @classmethod
    def from_pem(cls, pem: bytes, *, selector: str, domain: str) -> DkimSigner:
        if not _SELECTOR.fullmatch(selector):
            raise DkimError(f"invalid DKIM selector {selector!r}")
        if not _DOMAIN.fullmatch(domain):
            raise DkimError(f"invalid DKIM domain {domain!r}")
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise DkimError(f"the DKIM key is not an unencrypted PEM private key: {exc}") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < 1024:
                raise DkimError(f"an RSA DKIM key needs 1024+ bits (2048 advised): {key.key_size}")
            signer = cls(domain.lower(), selector, "rsa-sha256", key)
        elif isinstance(key, ed25519.Ed25519PrivateKey):
            signer = cls(domain.lower(), selector, "ed25519-sha256", key)
        else:
            raise DkimError("a DKIM key is RSA or Ed25519")
        signer._self_check()
        return signer

    def public_key_b64(self) -> str:
        """The ``p=`` value of the DNS record."""
        pub = self._key.public_key()
        if isinstance(pub, ed25519.Ed25519PublicKey):
            raw = pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        else:
            raw = pub.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
        return base64.b64encode(raw).decode("ascii")

    def dns_record(self) -> str:
        """The TXT record to publish at ``<selector>._domainkey.<domain>``."""
        k = "rsa" if self.algorithm == "rsa-sha256" else "ed25519"
        return f"v=DKIM1; k={k}; p={self.public_key_b64()}"

    def dns_name(self) -> str:
        return f"{self.selector}._domainkey.{self.domain}"

    def bind(self, *, from_header: bytes, subject_header: bytes) -> BoundSigner:
        """The per-template part: the static headers' canonical form, built once.

        ``from_header``/``subject_header`` are the raw values (after the colon).
        """
        return BoundSigner(
            self,
            relaxed_header("from", from_header) + relaxed_header("subject", subject_header),
        )

    def _sign(self, data: bytes) -> bytes:
        if isinstance(self._key, rsa.RSAPrivateKey):
            return self._key.sign(data, padding.PKCS1v15(), hashes.SHA256())
        # RFC 8463: Ed25519 signs the SHA-256 hash of the canonical header data.
        return self._key.sign(hashlib.sha256(data).digest())

    def _self_check(self) -> None:
        import dkim  # dkimpy: only the start-up check needs it

        bound = self.bind(from_header=b" probe@" + self.domain.encode(), subject_header=b" probe")
        head = (
            b"Date: Thu, 01 Jan 2026 00:00:00 +0000\r\nMessage-ID: <probe@x>\r\n"
            b"To: <someone@example.com>\r\nList-Unsubscribe: <https://x/u>\r\n"
            b"List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        )
        body = b"probe\r\n"
        signature = bound.signature(head, [body], timestamp=0)
        message = (
            signature
            + b"From: probe@"
            + self.domain.encode()
            + b"\r\nSubject: probe\r\n"
            + head
            + b"\r\n"
            + body
        )
        record = self.dns_record().encode()
        name = self.dns_name().encode()

        def dnsfunc(qname: bytes, timeout: int = 5) -> bytes:
            return record if qname.rstrip(b".") == name else b""

        if not dkim.verify(message, dnsfunc=dnsfunc):
            raise DkimError("a probe signed with the DKIM key does not verify (dkimpy)")


class BoundSigner:
    """Signs the messages of one template; see ``DkimSigner.bind``."""

    def __init__(self, signer: DkimSigner, static_canonical: bytes) -> None:
        self._signer = signer
        self._static = static_canonical
        self._fields = (
            f"v=1; a={signer.algorithm}; c=relaxed/simple; d={signer.domain}; s={signer.selector};"
        )
        self._h = "h=" + ":".join(SIGNED_HEADERS) + ";"

    def signature(self, head: bytes, body: Sequence[bytes], *, timestamp: int) -> bytes:
        """The ``DKIM-Signature`` header line(s), CRLF-terminated, to put first.

        ``head``: the per-recipient header block (To, Date, Message-ID, both
        List-Unsubscribe headers, CRLF-terminated lines); ``body``: the body
        (what follows the blank line) as chunks, in order.
        """
        fields = _header_values(head)
        canonical = [self._static]
        for name in _PER_MESSAGE:
            value = fields.get(name.encode("ascii"))
            if value is None:
                raise ValueError(f"the message has no {name} header to sign")
            canonical.append(relaxed_header(name, value))
        bh = base64.b64encode(_body_hash(body)).decode("ascii")
        # Emitted folded; hashed unfolded (relaxed canonicalization removes the
        # CRLFs and keeps the space after them), with an empty b= and no CRLF.
        unsigned = f"{self._fields} t={timestamp}; {self._h} bh={bh}; b="
        canonical.append(b"dkim-signature:" + unsigned.encode("ascii"))
        sig = base64.b64encode(self._signer._sign(b"".join(canonical))).decode("ascii")
        return (
            f"DKIM-Signature: {self._fields}\r\n t={timestamp}; {self._h}\r\n"
            f" bh={bh};\r\n b={sig}\r\n"
        ).encode("ascii")


def dkim_signer(settings: Settings) -> DkimSigner | None:
    """The process's signer (None: signing is off); loaded and checked once."""
    if not settings.dkim_key_file:
        return None
    return _load(settings.dkim_key_file, settings.dkim_selector, settings.effective_dkim_domain)


@functools.lru_cache(maxsize=4)
def _load(key_file: str, selector: str, domain: str) -> DkimSigner:
    # Cached: the API's test emails and every campaign share one parsed key.
    return DkimSigner.load(Path(key_file), selector=selector, domain=domain)


def _body_hash(chunks: Iterable[bytes]) -> bytes:
    """SHA-256 of the body in simple canonicalization (RFC 6376 3.4.3).

    Trailing empty lines are dropped and a missing final CRLF added. Our bodies
    end with one base64 line or a closing boundary, so the chunks are hashed as
    they are; only an unusual ending joins the tail to canonicalize it.
    """
    parts = [c for c in chunks if c]
    digest = hashlib.sha256()
    last = parts[-1] if parts else b""
    plain_end = last.endswith(b"\r\n") and not last.endswith(b"\r\n\r\n")
    if plain_end and (len(last) > 2 or (len(parts) > 1 and not parts[-2].endswith(b"\r\n"))):
        for c in parts:
            digest.update(c)
        return digest.digest()
    whole = b"".join(parts)
    while whole.endswith(b"\r\n\r\n"):
        whole = whole[:-2]
    if not whole.endswith(b"\r\n"):
        whole += b"\r\n"
    digest.update(whole)
    return digest.digest()
