"""DKIM signing: messages the sink receives verify with dkimpy against the public key.

dkimpy's ``dnsfunc`` stands in for DNS: it answers the TXT query for
``<selector>._domainkey.<domain>`` with the record the signer says to publish.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
from datetime import UTC, datetime
from pathlib import Path

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from mailer.config import ConfigError, load_settings
from mailer.dkim import SIGNED_HEADERS, DkimError, DkimSigner
from mailer.render import MessageTemplate
from tests.helpers import FINAL, Crm, Events, people


def _pem(key: rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def rsa_pem() -> bytes:
    return _pem(rsa.generate_private_key(public_exponent=65537, key_size=2048))


def _verify(message: bytes, signer: DkimSigner) -> bool:
    record = signer.dns_record().encode()
    name = signer.dns_name().encode()

    def dnsfunc(qname: bytes, timeout: int = 5) -> bytes:
        return record if qname.rstrip(b".") == name else b""

    return bool(dkim.verify(message, dnsfunc=dnsfunc))


def _render(template: MessageTemplate, *, name: str = "Анна Петрова") -> bytes:
    return template.render(
        to_email="anna@example.org",
        to_name=name,
        variables={"promo": "X1"},
        message_id="<c1.r2.abcd@shop.example>",
        date=datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
        unsubscribe_url="https://shop.example/u/abc",
    )


def _template(signer: DkimSigner | None, **kw: object) -> MessageTemplate:
    args: dict[str, object] = {
        "from_email": "news@shop.example",
        "from_name": "Магазин «Пример» с длинным названием, которое переносится",
        "subject": "Подборка недели: скидки до 50% на всё, что вы давно хотели купить",
        "text": "Здравствуйте, {{name}}!\n\nПромокод {{promo}}.\n",
        "html": "<p>Здравствуйте, {{name}}!</p>",
        "message_id_domain": "shop.example",
        "dkim": signer,
    }
    args.update(kw)
    return MessageTemplate(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_signed_message_verifies(kind: str, rsa_pem: bytes) -> None:
    pem = rsa_pem if kind == "rsa" else _pem(ed25519.Ed25519PrivateKey.generate())
    signer = DkimSigner.from_pem(pem, selector="s1", domain="shop.example")
    assert signer.algorithm == f"{kind}-sha256"
    for template in (
        _template(signer),
        _template(signer, html=None),
        _template(signer, text=None),
        _template(signer, attachments=[("a.pdf", "application/pdf", b"%PDF" * 5000)]),
    ):
        message = _render(template)
        assert message.startswith(b"DKIM-Signature: v=1; a=" + kind.encode())
        assert _verify(message, signer)
        # The payload form (what the campaigns send) carries the same signature.
        payload = template.render_payload(
            to_email="anna@example.org",
            to_name="Анна Петрова",
            variables={"promo": "X1"},
            message_id="<c1.r2.abcd@shop.example>",
            date=datetime(2026, 3, 1, 12, 0, tzinfo=UTC),
            unsubscribe_url="https://shop.example/u/abc",
        )
        assert b"".join(payload.chunks) == message


def test_signature_covers_the_rfc8058_headers(rsa_pem: bytes) -> None:
    signer = DkimSigner.from_pem(rsa_pem, selector="s1", domain="shop.example")
    message = _render(_template(signer))
    parsed = email.message_from_bytes(message, policy=email.policy.default)
    tags = dict(
        t.strip().split("=", 1) for t in str(parsed["DKIM-Signature"]).split(";") if "=" in t
    )
    assert tags["h"].replace(" ", "").split(":") == list(SIGNED_HEADERS)
    assert tags["d"] == "shop.example" and tags["s"] == "s1"
    # Any change to a signed header or the body breaks the signature.
    for old, new in (
        (b"https://shop.example/u/abc", b"https://evil.example/u/ab"),
        (b"List-Unsubscribe=One-Click", b"List-Unsubscribe=One-Clack"),
        (b"<c1.r2.abcd@shop.example>", b"<c1.r2.abce@shop.example>"),
    ):
        assert _verify(message.replace(old, new), signer) is False
    assert _verify(message[:-20] + b"AAAA" + message[-16:], signer) is False


def test_unsigned_without_a_key() -> None:
    assert not _render(_template(None)).startswith(b"DKIM-Signature")


def test_bad_keys_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_bytes(b"-----BEGIN PRIVATE KEY-----\nnonsense\n-----END PRIVATE KEY-----\n")
    with pytest.raises(DkimError):
        DkimSigner.load(bad, selector="s1", domain="shop.example")
    with pytest.raises(DkimError, match="cannot read"):
        DkimSigner.load(tmp_path / "missing.pem", selector="s1", domain="shop.example")
    with pytest.raises(ConfigError, match="MAILER_DKIM_KEY_FILE"):
        load_settings({"MAILER_DKIM_KEY_FILE": str(bad)}, dotenv=None)
    good = tmp_path / "good.pem"
    good.write_bytes(_pem(ed25519.Ed25519PrivateKey.generate()))
    with pytest.raises(ConfigError, match="selector"):
        load_settings(
            {"MAILER_DKIM_KEY_FILE": str(good), "MAILER_DKIM_SELECTOR": "a b"}, dotenv=None
        )
    s = load_settings({"MAILER_DKIM_KEY_FILE": str(good)}, dotenv=None)
    assert s.effective_dkim_domain == "example.com"


async def test_campaign_messages_verify(
    make_service, crm: Crm, events: Events, sink, tmp_path: Path, rsa_pem: bytes
) -> None:
    key = tmp_path / "dkim.pem"
    key.write_bytes(rsa_pem)
    await make_service(dkim_key_file=str(key), dkim_selector="mail2026")
    signer = DkimSigner.load(key, selector="mail2026", domain="example.com")
    cid = await crm.campaign(people(6))
    await crm.start(cid)
    async with asyncio.timeout(30):
        done = await events.wait(cid, FINAL)
    assert done["event"] == "sent"
    assert len(sink.messages) == 6
    for m in sink.messages:
        assert m.data.startswith(b"DKIM-Signature:")
        assert _verify(m.data, signer), m.data[:400]
