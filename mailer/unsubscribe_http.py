"""The unsubscribe pages behind every message's link, RFC 8058 one-click included.

``GET /u/{token}`` only shows a confirmation page with a button: link scanners and
mail previews fetch links, and a fetch must never unsubscribe anybody.
``POST /u/{token}`` records it. That is also what a mail client sends for the
``List-Unsubscribe-Post: List-Unsubscribe=One-Click`` header: a form body
``List-Unsubscribe=One-Click``, no cookies, no session, so the sealed token is
the only credential and the answer is a plain 200 page, never a redirect.
Repeating the POST answers 200 again and records nothing new.

A forged, damaged or altered token (see ``mailer.unsubscribe``) gets a 400 page
and touches nothing. Pages are Russian
unless ``?lang=en`` or an Accept-Language preferring English asks otherwise;
every sentence comes from ``mailer/texts.py`` and everything put in the HTML is
escaped. The address is shown masked: a forwarded link should not reveal it.
"""

from __future__ import annotations

import html
import logging
from collections.abc import Sequence
from datetime import datetime
from typing import Final, Protocol

from aiohttp import web
from prometheus_client import Counter

from mailer.clock import Clock
from mailer.events import UnsubscribeEvent
from mailer.logs import email_fields, mask_email
from mailer.messages import Notice
from mailer.texts import Lang, text
from mailer.unsubscribe import Recorded, verify

__all__ = ["UNSUBSCRIBES", "UnsubscribeEventSink", "UnsubscribePages", "UnsubscribeStore"]

log = logging.getLogger("mailer.unsubscribe")

SOURCE_LINK: Final = "link"
# A real token is ~100 characters; anything far longer is garbage, refused unread.
_MAX_TOKEN_CHARS: Final = 2048

UNSUBSCRIBES: Final = Counter(
    "mailer_unsubscribes_total",
    "Addresses newly unsubscribed, by source.",
    ["source"],
)
UNSUBSCRIBES.labels(source=SOURCE_LINK)  # a series from the start: increase() sees the first one

# Security headers of every page: the token is in the URL (no Referer may carry
# it away, no cache may keep it), and nobody may frame the button to trick a click.
_HEADERS: Final = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}

_PAGE: Final = """<!doctype html>
<html lang="{lang}">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 32rem; margin: 4rem auto;
       padding: 0 1rem; color: #222; }}
button {{ font-size: 1rem; padding: .6rem 1.4rem; cursor: pointer; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p>{message}</p>
{form}</body>
</html>
"""

_FORM: Final = """<form method="post" action="{action}">
<input type="hidden" name="List-Unsubscribe" value="One-Click">
<button type="submit">{button}</button>
</form>
"""


class UnsubscribeStore(Protocol):
    async def record(
        self,
        email: str,
        *,
        source: str,
        campaign_id: int | None,
        audit: dict[str, str],
        now: datetime,
        notice: Notice | None = None,
    ) -> Recorded: ...


class UnsubscribeEventSink(Protocol):
    def unsubscribe_notice(self, event: UnsubscribeEvent) -> Notice:
        """The event as an outbox row, stored with the unsubscribe itself."""
        ...


class OutboxFlush(Protocol):
    async def flush(self) -> int: ...


def page_lang(request: web.Request) -> Lang:
    """``?lang=`` wins; else the Accept-Language range with the highest q; else Russian."""
    asked = request.query.get("lang", "").strip().lower()
    if asked in ("ru", "en"):
        return "en" if asked == "en" else "ru"
    best: tuple[float, Lang] = (0.0, "ru")
    for item in request.headers.get("Accept-Language", "").split(","):
        tag, _, params = item.strip().partition(";")
        primary = tag.strip().lower().split("-")[0]
        if primary not in ("ru", "en"):
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.strip() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        if q > best[0]:
            best = (q, "en" if primary == "en" else "ru")
    return best[1]


def _page(
    lang: Lang,
    title_code: str,
    message_code: str,
    *,
    status: int,
    form_action: str | None = None,
    **values: str,
) -> web.Response:
    # Texts are formatted first and escaped as a whole: a value (an address,
    # masked or not) can never add markup, whatever it holds.
    form = ""
    if form_action is not None:
        form = _FORM.format(
            action=html.escape(form_action, quote=True),
            button=html.escape(text("unsubscribe_page_button", lang)),
        )
    body = _PAGE.format(
        lang=lang,
        title=html.escape(text(title_code, lang)),
        message=html.escape(text(message_code, lang, **values)),
        form=form,
    )
    return web.Response(
        text=body, status=status, content_type="text/html", charset="utf-8", headers=_HEADERS
    )


class UnsubscribePages:
    """The ``/u/{token}`` routes; mount with ``HttpServer.add_routes(pages.routes())``."""

    def __init__(
        self,
        *,
        secrets: Sequence[str],
        store: UnsubscribeStore,
        events: UnsubscribeEventSink,
        outbox: OutboxFlush,
        clock: Clock,
    ) -> None:
        # The current secret and the retired ones still accepted (secrets_of).
        self._secrets = list(secrets)
        self._store = store
        self._events = events
        self._outbox = outbox
        self._clock = clock

    def routes(self) -> list[web.RouteDef]:
        # add_get also answers HEAD, which some link checkers send: harmless too.
        return [web.get("/u/{token}", self._show), web.post("/u/{token}", self._unsubscribe)]

    def _verify(self, request: web.Request) -> tuple[int, str] | None:
        token = request.match_info["token"]
        if len(token) > _MAX_TOKEN_CHARS:
            return None
        return verify(self._secrets, token)

    @staticmethod
    def _invalid(lang: Lang) -> web.Response:
        return _page(lang, "unsubscribe_page_invalid_title", "unsubscribe_page_invalid", status=400)

    async def _show(self, request: web.Request) -> web.Response:
        lang = page_lang(request)
        found = self._verify(request)
        if found is None:
            return self._invalid(lang)
        _, email = found
        return _page(
            lang,
            "unsubscribe_page_title",
            "unsubscribe_page_question",
            status=200,
            # The same URL, query included, so ?lang=en survives the click.
            form_action=str(request.rel_url),
            email=mask_email(email),
        )

    async def _unsubscribe(self, request: web.Request) -> web.Response:
        lang = page_lang(request)
        found = self._verify(request)
        if found is None:
            log.info("unsubscribe refused: invalid token")
            return self._invalid(lang)
        campaign_id, email = found
        # The body is not checked: RFC 8058 clients send List-Unsubscribe=One-Click,
        # the page's own form sends the same, and the sealed token alone decides.
        fields = email_fields(email)
        now = self._clock.now()
        # Only a new record is announced (one event per unsubscribed address):
        # the event is stored with the record, in the event outbox.
        event = UnsubscribeEvent(
            email=email,
            email_hash=fields["email_hash"],
            email_domain=fields["email_domain"],
            source=SOURCE_LINK,
            campaign_id=campaign_id,
            at=now,
        )
        try:
            recorded = await self._store.record(
                email,
                source=SOURCE_LINK,
                campaign_id=campaign_id,
                audit={"email_hash": fields["email_hash"]},
                now=now,
                notice=self._events.unsubscribe_notice(event),
            )
        except Exception:
            # ERROR lines carry the masked address and domain only (no hash).
            log.exception(
                "unsubscribe not recorded",
                extra={
                    "campaign_id": campaign_id,
                    "email_masked": fields["email_masked"],
                    "email_domain": fields["email_domain"],
                },
            )
            return _page(lang, "unsubscribe_page_error_title", "unsubscribe_page_error", status=503)
        if recorded.new:
            UNSUBSCRIBES.labels(source=SOURCE_LINK).inc()
            log.info("unsubscribed", extra={"campaign_id": campaign_id, **fields})
            try:
                await self._outbox.flush()
            except Exception:  # stored: the leader's relay publishes it later
                log.warning("unsubscribe event left in the outbox", exc_info=True)
        return _page(
            lang,
            "unsubscribe_page_done_title",
            "unsubscribe_page_done",
            status=200,
            email=mask_email(email),
        )
