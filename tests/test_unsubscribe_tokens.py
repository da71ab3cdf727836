"""Unsubscribe tokens: opaque, strictly decoded, keys that rotate.

Through the service's real HTTP server where the answer matters (a 400 page,
never a 500), and on ``mailer.unsubscribe`` itself for what a link carries.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest

from mailer.config import Settings
from mailer.service import Service
from mailer.texts import text
from mailer.unsubscribe import sign, unsubscribe_url, verify
from tests.conftest import MakeService

ONE_CLICK = {"List-Unsubscribe": "One-Click"}
ADDRESS = "victim.person@example.org"
OLD = "the-retired-secret-0123456789"
NEW = "the-current-secret-9876543210"


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar()) as session:
        yield session


def base(service: Service) -> str:
    return f"http://127.0.0.1:{service.public_http_port}"


def legacy(secret: str, campaign_id: int, email: str) -> str:
    """A link of the first format, as mail already delivered carries it."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    payload = f"{campaign_id}:{email}".encode()
    return f"{b64(payload)}.{b64(hmac.new(secret.encode(), payload, hashlib.sha256).digest())[:22]}"


async def status_of(http: aiohttp.ClientSession, service: Service, token: str) -> list[int]:
    """The GET and the one-click POST answers for ``token`` (already URL-quoted)."""
    statuses = []
    for method in ("GET", "POST"):
        async with http.request(
            method, f"{base(service)}/u/{token}", data=ONE_CLICK, allow_redirects=False
        ) as resp:
            page = await resp.text()
            statuses.append(resp.status)
            if resp.status == 400:
                assert text("unsubscribe_page_invalid", "ru") in page
    return statuses


async def test_a_non_ascii_token_gets_the_400_page(
    make_service: MakeService, http: aiohttp.ClientSession, settings: Settings, db: Any
) -> None:
    service = await make_service()
    good = sign(settings.unsubscribe_secret, 1, ADDRESS)
    old_style = legacy(settings.unsubscribe_secret, 1, ADDRESS)
    for token in (
        "токен",
        good[:10] + "ж" + good[10:],
        old_style[:-3] + "é" + old_style[-2:],  # in the MAC
        old_style[:4] + "٣" + old_style[4:],
    ):
        assert await status_of(http, service, quote(token)) == [400, 400], token
    assert await db.fetchval("SELECT count(*) FROM unsubscribe") == 0


@pytest.mark.parametrize("junk", ["!!!", "$$$$", "===", "...", "%20%20%20", "\t\t\t"])
async def test_junk_inserted_into_a_token_gets_the_400_page(
    make_service: MakeService, http: aiohttp.ClientSession, settings: Settings, db: Any, junk: str
) -> None:
    service = await make_service()
    for good in (
        sign(settings.unsubscribe_secret, 1, ADDRESS),
        legacy(settings.unsubscribe_secret, 1, ADDRESS),
    ):
        assert await status_of(http, service, good) == [200, 200]
        await db.execute("DELETE FROM unsubscribe")
        for at in (4, 8, len(good) // 2):
            forged = good[:at] + junk + good[at:]
            assert await status_of(http, service, quote(forged, safe="%")) == [400, 400], forged
            assert verify([settings.unsubscribe_secret], forged) is None, forged
    assert await db.fetchval("SELECT count(*) FROM unsubscribe") == 0


def encodings_of(address: str) -> set[str]:
    """The address as base64, URL-safe base64 and hex at every alignment a
    surrounding payload could give it (edge characters dropped)."""
    found = {address, address.encode().hex(), quote(address, safe="")}
    for shift in range(3):
        data = b"\0" * shift + address.encode()
        for encoded in (base64.b64encode(data), base64.urlsafe_b64encode(data)):
            text_ = encoded.decode().rstrip("=")
            found.add(text_[(shift * 4 + 2) // 3 + 1 : -2])
    return found


def test_the_address_is_not_in_the_link_in_any_encoding() -> None:
    for address in (ADDRESS, "a@b.io", "Анна.Петрова@пример.рф"):
        url = unsubscribe_url("https://mail.example.com", NEW, 42, address)
        for needle in encodings_of(address.lower()) | encodings_of(address):
            assert needle.lower() not in url.lower(), (address, needle, url)
        assert verify([NEW], url.rsplit("/", 1)[1]) == (42, address.lower())
    # The check above does find the address in a link of the first format.
    old_style = legacy(NEW, 42, ADDRESS)
    assert any(n in old_style for n in encodings_of(ADDRESS))


async def test_a_retired_secret_opens_its_links_while_listed_and_not_after(
    make_service: MakeService, http: aiohttp.ClientSession, db: Any
) -> None:
    sealed_with_old = sign(OLD, 7, ADDRESS)
    first_format_with_old = legacy(OLD, 7, "other@example.org")
    rotated = await make_service(unsubscribe_secret=NEW, unsubscribe_old_secrets=f" {OLD} ")
    assert await status_of(http, rotated, sealed_with_old) == [200, 200]
    assert await status_of(http, rotated, first_format_with_old) == [200, 200]
    assert await status_of(http, rotated, sign(NEW, 7, "third@example.org")) == [200, 200]
    assert await db.fetchval("SELECT count(*) FROM unsubscribe") == 3
    await db.execute("DELETE FROM unsubscribe")

    retired = await make_service(unsubscribe_secret=NEW)
    assert await status_of(http, retired, sealed_with_old) == [400, 400]
    assert await status_of(http, retired, first_format_with_old) == [400, 400]
    assert await status_of(http, retired, sign(NEW, 7, "third@example.org")) == [200, 200]
    assert await db.fetchval("SELECT count(*) FROM unsubscribe") == 1


def test_tokens_are_strict_and_keyed() -> None:
    token = sign(NEW, 9, ADDRESS)
    assert verify([NEW], token) == (9, ADDRESS)
    assert verify([OLD, NEW], token) == (9, ADDRESS)
    assert verify([OLD], token) is None
    for i in range(len(token)):  # any one character changed
        for c in "AQgw_-":
            if c != token[i]:
                assert verify([NEW], token[:i] + c + token[i + 1 :]) is None
    assert verify([NEW], token + "=") is None
    assert verify([NEW], "") is None
