"""The public NATS API: a nats-py ``micro`` service other CRM services call.

Every request names the acting user in the ``Mailer-User`` header (and roles,
comma-separated, in ``Mailer-Roles``; ``admin`` may act on any campaign).
Requests are decoded strictly; every failure is one ``ErrorReply`` shape with
a stable code, its human text (Russian, or English with ``Mailer-Lang: en``),
and the micro error headers. Nothing is written before a request is valid.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from mailer import addresses
from mailer.actors.runtime import Actor
from mailer.bus import (
    ERROR_CODE_HEADER,
    ERROR_HEADER,
    LANG_HEADER,
    ROLES_HEADER,
    USER_HEADER,
    Bus,
    encode,
)
from mailer.clock import Clock
from mailer.errors import (
    ApiError,
    BadRequest,
    Conflict,
    Forbidden,
    NotFound,
    Unauthenticated,
    ValidationFailed,
)
from mailer.messages import (
    CampaignCreate,
    CampaignRef,
    CampaignView,
    ErrorBody,
    ErrorReply,
    InvalidAddress,
    RecipientsAdd,
    RecipientsAdded,
    StartReply,
    Wake,
)
from mailer.store import PgStore
from mailer.texts import text

__all__ = ["MAX_PAYLOAD", "MAX_RECIPIENTS_PER_CALL", "ApiActor", "Caller"]

log = logging.getLogger("mailer.api")

MAX_PAYLOAD = 4 * 1024 * 1024
MAX_RECIPIENTS_PER_CALL = 5000
LARGE_CAMPAIGN = 5000

Req = TypeVar("Req")


class Caller(msgspec.Struct, frozen=True):
    user: str
    roles: frozenset[str]
    lang: str | None

    @property
    def is_admin(self) -> bool:
        return "admin" in self.roles


class ApiActor(Actor[None]):
    """Owns the micro service; requests run in the NATS client's callbacks."""

    def __init__(
        self,
        *,
        bus: Bus,
        store: PgStore,
        clock: Clock,
        max_campaign_recipients: int,
        version: str,
    ) -> None:
        self._bus = bus
        self._store = store
        self._clock = clock
        self._max_recipients = max_campaign_recipients
        self._version = version
        self._service: Service | None = None

    async def on_start(self) -> None:
        svc = await add_service(
            self._bus.nc,
            name="mailer",
            version=self._version,
            description="Email campaigns of the CRM",
            metadata={"subject_prefix": self._bus.prefix},
        )
        routes: list[tuple[str, str, Callable[[Request], Awaitable[None]]]] = [
            ("campaign-create", "campaign.create", self._endpoint(CampaignCreate, self.create)),
            ("campaign-get", "campaign.get", self._endpoint(CampaignRef, self.get)),
            ("campaign-start", "campaign.start", self._endpoint(CampaignRef, self.start)),
            ("recipients-add", "recipients.add", self._endpoint(RecipientsAdd, self.add)),
        ]
        for name, subject, handler in routes:
            await svc.add_endpoint(
                EndpointConfig(name=name, subject=self._bus.subject(subject), handler=handler)
            )
        self._service = svc
        # Ready means the server knows the subscription: a request right after start works.
        await self._bus.nc.flush()

    async def handle(self, msg: None) -> object:
        return None

    async def on_stop(self, error: BaseException | None) -> None:
        # Stop taking work first: unsubscribes every endpoint.
        if self._service is not None:
            await self._service.stop()

    # --- plumbing -----------------------------------------------------------------

    def _endpoint(
        self, req_type: type[Req], fn: Callable[[Caller, Req], Awaitable[Any]]
    ) -> Callable[[Request], Awaitable[None]]:
        async def handler(request: Request) -> None:
            headers = request.headers or {}
            lang = headers.get(LANG_HEADER)
            try:
                caller = _caller(headers)
                if len(request.data) > MAX_PAYLOAD:
                    raise BadRequest(detail=f"payload over {MAX_PAYLOAD} bytes")
                try:
                    body = msgspec.json.decode(request.data, type=req_type, strict=True)
                except msgspec.ValidationError as exc:
                    raise ValidationFailed(detail=str(exc)) from None
                except msgspec.DecodeError as exc:
                    raise BadRequest(detail=str(exc)) from None
                reply = await fn(caller, body)
            except ApiError as exc:
                await _respond_error(request, exc, lang)
                return
            except Exception:
                log.exception("request failed", extra={"subject": request.subject})
                await _respond_error(request, ApiError(), lang)
                return
            await request.respond(encode(reply))

        return handler

    async def _own(self, caller: Caller, campaign_id: int) -> CampaignView:
        view = await self._store.view(campaign_id)
        if view is None:
            raise NotFound(campaign_id=campaign_id)
        if view.owner_id != caller.user and not caller.is_admin:
            raise Forbidden()
        return view

    # --- operations -----------------------------------------------------------------

    async def create(self, caller: Caller, req: CampaignCreate) -> CampaignView:
        if req.body_text is None and req.body_html is None:
            raise ValidationFailed(detail="body_text or body_html is required")
        row = await self._store.create_campaign(
            owner_id=caller.user,
            name=req.name,
            subject=req.subject,
            body_text=req.body_text,
            body_html=req.body_html,
            priority=req.priority,
            now=self._clock.now(),
        )
        view = await self._store.view(row.id)
        assert view is not None
        return view

    async def get(self, caller: Caller, req: CampaignRef) -> CampaignView:
        return await self._own(caller, req.campaign_id)

    async def add(self, caller: Caller, req: RecipientsAdd) -> RecipientsAdded:
        if len(req.recipients) > MAX_RECIPIENTS_PER_CALL:
            raise ValidationFailed("too_many_in_one_call", limit=MAX_RECIPIENTS_PER_CALL)
        view = await self._own(caller, req.campaign_id)
        if view.status not in ("draft", "ready", "paused"):
            raise Conflict(status=view.status)
        invalid: list[InvalidAddress] = []
        rows: list[tuple[str, str | None, dict[str, str]]] = []
        seen: set[str] = set()
        duplicates = 0
        for r in req.recipients:
            reason = addresses.validate(r.email)
            if reason is not None:
                invalid.append(InvalidAddress(email=r.email, reason=reason))
                continue
            key = addresses.normalize(r.email)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            rows.append((r.email, r.name, r.variables))
        added = await self._store.add_recipients(req.campaign_id, rows, self._clock.now())
        return RecipientsAdded(
            added=added, duplicates=duplicates + len(rows) - added, invalid=invalid
        )

    async def start(self, caller: Caller, req: CampaignRef) -> StartReply:
        view = await self._own(caller, req.campaign_id)
        if view.status != "draft":
            raise Conflict(status=view.status)
        total = sum(view.counts.values())
        if view.counts.get("pending", 0) == 0:
            raise ValidationFailed("empty_campaign")
        if total > self._max_recipients:
            raise ValidationFailed("too_many_recipients", count=total, limit=self._max_recipients)
        row = await self._store.start(
            req.campaign_id, actor_id=caller.user, now=self._clock.now(), allowed_from=["draft"]
        )
        if row is None:  # lost a race with another start
            raise Conflict(status="ready")
        warnings: list[str] = []
        if total > LARGE_CAMPAIGN:
            warnings.append("large_campaign")
        await self._bus.publish(
            self._bus.subject("internal", "scheduler", "wake"), Wake(campaign_id=req.campaign_id)
        )
        started = await self._store.view(req.campaign_id)
        assert started is not None
        return StartReply(campaign=started, warnings=warnings)


def _caller(headers: dict[str, str]) -> Caller:
    user = headers.get(USER_HEADER, "").strip()
    if not user:
        raise Unauthenticated()
    roles = frozenset(r.strip() for r in headers.get(ROLES_HEADER, "").split(",") if r.strip())
    return Caller(user=user, roles=roles, lang=headers.get(LANG_HEADER))


async def _respond_error(request: Request, exc: ApiError, lang: str | None) -> None:
    message = text(exc.code, lang, **exc.values)
    details = {k: str(v) for k, v in exc.values.items()} or None
    body = ErrorReply(error=ErrorBody(code=exc.code, message=message, details=details))
    # Header values must be one line; the full text is in the body too.
    await request.respond(
        encode(body),
        headers={
            ERROR_HEADER: message.replace("\r", " ").replace("\n", " "),
            ERROR_CODE_HEADER: str(exc.status),
        },
    )
