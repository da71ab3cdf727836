"""The public NATS API: a nats-py ``micro`` service other CRM services call.

Discoverable with ``$SRV.PING`` / ``$SRV.INFO`` / ``$SRV.STATS`` (service name
``mailer``; its metadata names the subject prefix). Each endpoint listens on
``<prefix>.<subject>`` in the micro queue group, so any number of pods share
the load. The subjects and their operations are listed in ``mailer.api.routes``
and documented in docs/api.md.

Every request names the acting user in the ``Mailer-User`` header (roles,
comma-separated, in ``Mailer-Roles``; ``admin`` may act on any campaign) and
may ask for English with ``Mailer-Lang: en``. A request is checked in this
order, and nothing is written before it passes: size, caller, strict JSON
decoding into its msgspec Struct (unknown fields, wrong types, out-of-range
values and NUL characters refused), then the operation's own checks. Every
failure is one ``ErrorReply`` shape -- a stable ``code``, a human ``message``
(Russian by default), ``details`` -- and also the micro error headers
(``Nats-Service-Error`` = the message on one line, ``Nats-Service-Error-Code``
= an HTTP-like status), so micro-aware clients and plain ones both see it.
Error replies go out through micro's own error path, so ``$SRV.STATS`` counts
them (``num_errors``, ``last_error`` = "status:code", never the message text).

Every request is counted in ``mailer_api_requests_total{subject,code}`` (code
``ok`` or the error code) and timed in ``mailer_api_request_duration_seconds``.

nats-py micro awaits each handler inside its subscription's callback: one
endpoint serves one request at a time per process (others queue in the
client). Handlers are therefore short; the slowest, a test email, waits for
one SMTP transaction.
"""

from __future__ import annotations

import logging
import time
import unicodedata
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime
from typing import Any

import msgspec
import redis.asyncio as redis
from nats.js.api import ObjectStoreConfig
from nats.js.client import JetStreamContext
from nats.js.errors import BadRequestError, BucketNotFoundError
from nats.micro import add_service
from nats.micro.request import Request, ServiceError
from nats.micro.service import EndpointConfig, Service

from mailer import metrics
from mailer.accounts import accounts_of
from mailer.actors.campaign import Mail
from mailer.actors.governor import NatsTokenSource
from mailer.actors.runtime import Actor, ActorRef
from mailer.actors.sender import ActorMailer, SenderMessage
from mailer.api.context import ApiContext, Caller, EventSink, caller_from, lang_of
from mailer.api.recipients import MAX_RECIPIENTS_PER_CALL
from mailer.api.routes import LARGE_PAYLOAD, Route, routes
from mailer.apistore import ApiStore
from mailer.bus import Bus, encode
from mailer.clock import Clock
from mailer.config import Settings
from mailer.errors import ApiError, BadRequest, PayloadTooLarge, Unavailable, ValidationFailed
from mailer.messages import ErrorBody, ErrorReply, imports_bucket
from mailer.ratelimit import SendLimiter
from mailer.rules import DailyLimits, WorkingHours
from mailer.store import PgStore
from mailer.texts import Lang, text
from mailer.throttle import Throttle
from mailer.transport import SendResult

__all__ = ["MAX_PAYLOAD", "MAX_RECIPIENTS_PER_CALL", "SERVICE_NAME", "ApiActor", "Caller"]

log = logging.getLogger("mailer.api")

SERVICE_NAME = "mailer"
MAX_PAYLOAD = LARGE_PAYLOAD
# Error details quote the offending input (msgspec names the field and what
# it expected); a hostile request must not make the reply or header huge.
_MAX_DETAIL = 300
_MAX_HEADER = 500

Handler = Callable[[Request], Awaitable[None]]


class ApiActor(Actor[None]):
    """Owns the micro service; requests run in the NATS client's callbacks."""

    def __init__(
        self,
        *,
        bus: Bus,
        store: PgStore,
        clock: Clock,
        settings: Settings,
        redis_client: redis.Redis,
        sender: ActorRef[SenderMessage] | None,
        events: EventSink,
        version: str,
    ) -> None:
        s = settings
        self._bus = bus
        self._settings = s
        self._version = version
        self._service: Service | None = None
        key_prefix = s.redis_key_prefix
        self._ctx = ApiContext(
            bus=bus,
            store=store,
            db=ApiStore(store.pool),
            clock=clock,
            settings=s,
            hours=WorkingHours.from_settings(s),
            daily_limits=DailyLimits.from_settings(s),
            # Read-only use: the day's counter for the manager's view.
            daily_counter=SendLimiter(
                redis_client,
                key_prefix=key_prefix,
                account=s.smtp_account,
                hourly_limit=s.rate_per_hour,
            ),
            hour_counters={
                a.name: SendLimiter(
                    redis_client,
                    key_prefix=key_prefix,
                    account=a.name,
                    hourly_limit=a.rate_per_hour,
                )
                for a in accounts_of(s).accounts
            },
            start_throttle=Throttle(
                redis_client, key_prefix=key_prefix, action="start", limit=s.start_throttle_per_hour
            ),
            test_throttle=Throttle(
                redis_client,
                key_prefix=key_prefix,
                action="test_email",
                limit=s.test_email_throttle_per_hour,
            ),
            tokens=NatsTokenSource(bus, timeout=s.token_request_timeout_seconds),
            mailer=_NoSender()
            if sender is None
            # One message: its SMTP steps, plus a wait for a free pooled connection.
            else ActorMailer(
                sender,
                # The sender is the default account's.
                mail_from=accounts_of(s).default.settings.from_email,
                timeout=s.smtp_timeout_seconds * 5,
            ),
            events=events,
        )

    @property
    def context(self) -> ApiContext:
        return self._ctx

    async def on_start(self) -> None:
        await open_imports_bucket(
            self._bus.nc.jetstream(), self._bus.prefix, replicas=self._settings.nats_replicas
        )
        svc = await add_service(
            self._bus.nc,
            name=SERVICE_NAME,
            version=self._version,
            description="Email campaigns of the CRM",
            metadata={"subject_prefix": self._bus.prefix},
        )
        # Assigned before the endpoints: a failure half-way still stops what was added.
        self._service = svc
        metrics.precreate_api_series(r.subject for r in routes(self._settings))
        for route in routes(self._settings):
            await svc.add_endpoint(
                EndpointConfig(
                    name=route.name,
                    subject=self._bus.subject(route.subject),
                    handler=self._endpoint(route),
                    metadata={"max_payload": str(route.max_payload)},
                )
            )
        # Ready means the server knows the subscriptions: a request right after start works.
        await self._bus.nc.flush()

    async def handle(self, msg: None) -> object:
        return None

    async def on_stop(self, error: BaseException | None) -> None:
        # Stop taking work first: unsubscribes every endpoint (idempotent).
        if self._service is not None:
            await self._service.stop()

    def _endpoint(self, route: Route) -> Handler:
        ctx = self._ctx
        requests = metrics.API_REQUESTS
        duration = metrics.API_REQUEST_DURATION.labels(subject=route.subject)

        async def handler(request: Request) -> None:
            started = time.perf_counter()
            headers = request.headers or {}
            try:
                if len(request.data) > route.max_payload:
                    raise PayloadTooLarge(size=len(request.data), limit=route.max_payload)
                caller = caller_from(headers)
                body = decode_request(request.data, route.request)
                reply = await route.operation(ctx, caller, body)
            except ApiError as exc:
                error = exc
            except Exception:
                log.exception("request failed", extra={"nats_subject": request.subject})
                error = ApiError()
            else:
                await request.respond(encode(reply))
                requests.labels(subject=route.subject, code="ok").inc()
                duration.observe(time.perf_counter() - started)
                return
            requests.labels(subject=route.subject, code=error.code).inc()
            duration.observe(time.perf_counter() - started)
            raise _error_reply(request, error, lang_of(headers))

        return handler


#: An upload recipients.import never read (its client gave up, the process died) goes after
#: a day; an imported one is deleted as soon as its request is answered.
IMPORTS_MAX_AGE_SECONDS = 24 * 3600.0


async def open_imports_bucket(js: JetStreamContext, prefix: str, *, replicas: int) -> None:
    """Creates the Object Store bucket recipients.import reads uploads from, if missing."""
    bucket = imports_bucket(prefix)
    try:
        await js.object_store(bucket)
    except BucketNotFoundError:
        try:
            await js.create_object_store(
                bucket,
                ObjectStoreConfig(
                    description="mailer: recipient lists uploaded for recipients.import",
                    ttl=IMPORTS_MAX_AGE_SECONDS,
                    replicas=replicas,
                ),
            )
        except BadRequestError:
            # Another process created it between the two calls (same name, its config).
            await js.object_store(bucket)


class _NoSender:
    """Stands in when the process runs no SMTP sender: test emails are refused."""

    async def send_all(
        self, mails: Sequence[Mail], *, not_after: datetime | None = None
    ) -> list[SendResult]:
        raise Unavailable("sender_unavailable")


def decode_request(data: bytes, req_type: type[Any]) -> Any:
    """Strict JSON into ``req_type``; raises BadRequest / ValidationFailed."""
    try:
        body = msgspec.json.decode(data, type=req_type, strict=True)
    except msgspec.ValidationError as exc:
        raise ValidationFailed(detail=_short(str(exc))) from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(detail=_short(str(exc))) from None
    _refuse_nul(body, "$")
    return body


def _refuse_nul(value: object, path: str) -> None:
    """PostgreSQL text cannot hold NUL, and no field has a use for it: refuse it anywhere."""
    if isinstance(value, str):
        if "\x00" in value:
            raise ValidationFailed(detail=f"NUL character - at `{path}`")
    elif isinstance(value, msgspec.Struct):
        for name in value.__struct_fields__:
            _refuse_nul(getattr(value, name), f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_nul(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for key, item in value.items():
            _refuse_nul(key, f"{path}.<key>")
            _refuse_nul(item, f"{path}.{key}")


def _short(detail: str) -> str:
    return detail if len(detail) <= _MAX_DETAIL else detail[: _MAX_DETAIL - 1] + "…"


def _one_line(message: str) -> str:
    # Header values must be one line of printable text; the body has it whole.
    flat = "".join(" " if unicodedata.category(ch)[0] in "CZ" else ch for ch in message)
    flat = " ".join(flat.split())
    return flat if len(flat) <= _MAX_HEADER else flat[: _MAX_HEADER - 1] + "…"


def render_error(exc: ApiError, lang: Lang) -> ErrorReply:
    """The one error shape: code, the text in the caller's language, details."""
    # Values may quote the request (an address, a field name): bounded in both places.
    shown: dict[str, object] = {
        k: v if isinstance(v, int) else _short(str(v)) for k, v in exc.values.items()
    }
    status = exc.values.get("status")
    if isinstance(status, str):
        # Statuses read as words in the message; details keep the stable value.
        label = text(f"status_{status}", lang)
        shown["status"] = status if label == f"status_{status}" else label
    message = text(exc.text_key, lang, **shown)
    details = {k: _short(str(v)) for k, v in exc.values.items()} or None
    return ErrorReply(error=ErrorBody(code=exc.code, message=message, details=details))


class _ApiServiceError(ServiceError):
    """micro's error: ``code`` is the status for the header; ``repr`` (micro's
    ``last_error`` in $SRV.STATS, readable by any NATS user) names the stable
    error code only, never the message, which may quote the request."""

    def __init__(self, status: int, description: str, api_code: str) -> None:
        super().__init__(str(status), description)
        self.api_code = api_code

    def __repr__(self) -> str:
        return f"{self.code}:{self.api_code}"


def _error_reply(request: Request, exc: ApiError, lang: Lang) -> ServiceError:
    """The exception that makes micro send our error reply and count it.

    nats-py micro (2.16) counts an error in $SRV.STATS only when the handler
    raises; it then replies with ``request.respond_error(code, description)``,
    which sets the two error headers but sends no body. Our replies carry the
    ``ErrorReply`` JSON too, so for this one request ``respond_error`` is bound
    to pass that body along: the headers are micro's, the body is ours, and
    the reply is sent once. (tests/test_api_discovery.py pins this behaviour.)
    """
    body = render_error(exc, lang)
    payload = encode(body)
    respond_error = request.respond_error

    async def respond_with_body(
        code: str, description: str, data: bytes = b"", headers: dict[str, str] | None = None
    ) -> None:
        await respond_error(code, description, payload, headers)

    request.respond_error = respond_with_body  # type: ignore[method-assign]
    return _ApiServiceError(exc.status, _one_line(body.error.message), exc.code)
