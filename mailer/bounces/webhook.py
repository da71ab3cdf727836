"""The provider webhook: ``POST /bounces/webhook`` on the public HTTP server.

For providers that report bounces and complaints over HTTP instead of mail.
The request is verified before anything is read from it: header
``X-Mailer-Signature: sha256=<hex HMAC-SHA256 of the raw body>`` keyed by
``MAILER_BOUNCE_WEBHOOK_SECRET`` (constant-time compare); a missing or wrong
signature gets 401 and changes nothing. The body (at most 256 KiB, 100 events):

    {"events": [{"type": "hard_bounce" | "soft_bounce" | "complaint",
                 "address": "<the envelope sender the provider saw>",
                 "detail": "5.1.1 user unknown"}]}

Each event names its recipient by our bounce address (the provider reports
the Return-Path of the message), verified like an inbound DSN; an event
without a genuine one is counted ``unverified`` and skipped. A malformed body
is refused with 400 as a whole. The reply says how many events were applied.
Without a secret configured the route does not exist (404).

A replay of a signed request lists nobody new (an address is listed once) but
counts its soft bounces again: providers sign each delivery of a request, so
keep the secret as secret as the SMTP password.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from typing import Annotated, Final, Literal

import msgspec
from aiohttp import web
from msgspec import Meta

from mailer.bounces.inbound import BounceProcessor
from mailer.bounces.parse import Kind

__all__ = ["SIGNATURE_HEADER", "BounceWebhook", "signature"]

log = logging.getLogger("mailer.bounces")

SIGNATURE_HEADER: Final = "X-Mailer-Signature"
_MAX_BODY: Final = 256 * 1024
_KINDS: Final[dict[str, Kind]] = {
    "hard_bounce": "hard",
    "soft_bounce": "soft",
    "complaint": "complaint",
}


class _Event(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["hard_bounce", "soft_bounce", "complaint"]
    address: Annotated[str, Meta(max_length=320)]
    detail: Annotated[str, Meta(max_length=1000)] = ""


class _Body(msgspec.Struct, forbid_unknown_fields=True):
    events: Annotated[list[_Event], Meta(max_length=100)]


def signature(secret: str, body: bytes) -> str:
    """The header value a provider sends for ``body``."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


class BounceWebhook:
    def __init__(self, *, secret: str, processor: BounceProcessor) -> None:
        self._secret = secret
        self._processor = processor

    def routes(self) -> list[web.RouteDef]:
        return [web.post("/bounces/webhook", self._handle)]

    async def _handle(self, request: web.Request) -> web.Response:
        if request.content_length is not None and request.content_length > _MAX_BODY:
            return web.json_response({"error": "body too large"}, status=413)
        body = await request.content.read(_MAX_BODY + 1)
        if len(body) > _MAX_BODY:
            return web.json_response({"error": "body too large"}, status=413)
        given = request.headers.get(SIGNATURE_HEADER, "")
        if not hmac.compare_digest(given.encode(), signature(self._secret, body).encode()):
            log.warning("bounce webhook: bad or missing signature")
            return web.json_response({"error": "bad signature"}, status=401)
        try:
            parsed = msgspec.json.decode(body, type=_Body)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            return web.json_response({"error": f"bad body: {exc}"}, status=400)
        applied = 0
        for e in parsed.events:
            rid = self._processor.recipient([e.address])
            try:
                done = await self._processor.apply(
                    rid, _KINDS[e.type], source="webhook", detail=e.detail[:300]
                )
            except Exception:
                # The provider retries a failed delivery; what was applied stays
                # applied and is not listed twice.
                log.exception("bounce webhook: event not recorded")
                return web.json_response({"error": "try again later"}, status=503)
            applied += done is not None and done.found
        return web.json_response({"received": len(parsed.events), "applied": applied})
