"""``MailerClient``: every subject of the mailer NATS API as a typed method.

Requests and replies are the API's own msgspec Structs (``mailer.messages``),
so the client and the service cannot disagree on a field. A reply Struct
ignores fields it does not know: a newer service may add some.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Self, TypeVar

import msgspec
import nats
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.errors import BucketNotFoundError

from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER
from mailer.client.discovery import Instance, ping
from mailer.client.errors import (
    ConnectionFailed,
    MailerError,
    NoResponders,
    RequestTimeout,
    error_for,
)
from mailer.client.events import CampaignEvents, EventStream
from mailer.client.options import ClientOptions, Identity
from mailer.messages import (
    AttachmentAdd,
    AttachmentList,
    AttachmentRef,
    AttachmentView,
    AuditList,
    AuditPage,
    CampaignCreate,
    CampaignDeleted,
    CampaignList,
    CampaignPage,
    CampaignRef,
    CampaignStart,
    CampaignUpdate,
    CampaignView,
    EmailRef,
    Empty,
    ErrorReply,
    ImportProgress,
    LimitsReloaded,
    ManagerStatus,
    QuotaRef,
    QuotaSet,
    QuotaView,
    RecipientIn,
    RecipientList,
    RecipientPage,
    RecipientsAdd,
    RecipientsAdded,
    RecipientsImport,
    RecipientsImported,
    RecipientsRemove,
    RecipientsRemoved,
    RecipientView,
    ResolveInDoubt,
    ResolveReply,
    RetryFailed,
    RetryReply,
    StartReply,
    StatusRequest,
    SuppressionAdd,
    SuppressionList,
    SuppressionPage,
    SuppressionReason,
    SuppressionRemoved,
    SuppressionView,
    TestEmail,
    TestEmailSent,
    UnsubscribeAdd,
    UnsubscribeList,
    UnsubscribePage,
    UnsubscribeRemoved,
    UnsubscribeView,
    imports_bucket,
)

__all__ = ["MAX_RECIPIENTS_PER_CALL", "MailerClient"]

T = TypeVar("T")

# recipients.add and recipients.remove take at most this many per call.
MAX_RECIPIENTS_PER_CALL = 5000
# How long connect() tries to reach the NATS server before it gives up.
CONNECT_WAIT_SECONDS = 5.0

Unset = msgspec.UnsetType
UNSET = msgspec.UNSET
Recipient = RecipientIn | Mapping[str, Any]


class MailerClient:
    """A client of one mailer deployment (one subject prefix) over one NATS connection.

    ``acting(user=..., roles=..., lang=...)`` gives a client on the same
    connection acting as someone else (or in another language): headers per
    client, or per call as ``await client.acting(lang="en").get_campaign(7)``.
    Every method raises the ``MailerError`` subclass of the reply's error code.
    """

    def __init__(
        self,
        nc: Client,
        *,
        prefix: str = "mailer",
        user: str = "",
        roles: Iterable[str] = (),
        lang: str = "",
        timeout: float = 10.0,
        _owns_connection: bool = False,
    ) -> None:
        self.nc = nc
        self.prefix = prefix
        self.identity = Identity(user=user, roles=tuple(roles), lang=lang)
        self.timeout = timeout
        self._owns_connection = _owns_connection

    @classmethod
    async def connect(
        cls,
        options: ClientOptions | None = None,
        *,
        user: str = "",
        roles: Iterable[str] = (),
        lang: str = "",
        connect_wait: float = CONNECT_WAIT_SECONDS,
    ) -> MailerClient:
        """Connects to NATS (``options``, else ``ClientOptions.from_env()``).

        Once connected, the connection reconnects by itself forever; the first
        connection is given ``connect_wait`` seconds (``ConnectionFailed``).
        """
        opts = options if options is not None else ClientOptions.from_env()
        errors: list[Exception] = []

        async def on_error(exc: Exception) -> None:
            errors.append(exc)

        try:
            async with asyncio.timeout(connect_wait):
                nc = await nats.connect(
                    opts.url,
                    name=opts.name,
                    connect_timeout=min(2.0, connect_wait),
                    max_reconnect_attempts=-1,
                    reconnect_time_wait=0.5,
                    error_cb=on_error,
                    **opts.connect_options(),
                )
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            why = errors[-1] if errors else exc
            raise ConnectionFailed(f"cannot connect to NATS at {opts.url}: {why!r}") from None
        return cls(
            nc,
            prefix=opts.prefix,
            user=user,
            roles=roles,
            lang=lang,
            timeout=opts.timeout,
            _owns_connection=True,
        )

    async def close(self) -> None:
        """Closes the connection if ``connect`` opened it (not one passed in)."""
        if self._owns_connection and not self.nc.is_closed:
            await self.nc.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def acting(
        self,
        *,
        user: str | None = None,
        roles: Iterable[str] | None = None,
        lang: str | None = None,
    ) -> MailerClient:
        """The same client (same connection) with other request headers."""
        me = self.identity
        return MailerClient(
            self.nc,
            prefix=self.prefix,
            user=me.user if user is None else user,
            roles=me.roles if roles is None else roles,
            lang=me.lang if lang is None else lang,
            timeout=self.timeout,
        )

    # --- the one request path ---------------------------------------------------------

    async def request(
        self, subject: str, body: Any, reply_type: type[T], *, timeout: float | None = None
    ) -> T:
        """``body`` (a Struct, a dict, or bytes sent as they are) to ``<prefix>.<subject>``."""
        data = body if isinstance(body, bytes) else msgspec.json.encode(body)
        timeout = self.timeout if timeout is None else timeout
        try:
            reply = await self.nc.request(
                f"{self.prefix}.{subject}",
                data,
                timeout=timeout,
                headers=self.identity.headers(),
            )
        except nats.errors.NoRespondersError:
            raise NoResponders(
                f"nobody serves {self.prefix}.{subject}: is mailer running with "
                f"MAILER_SUBJECT_PREFIX={self.prefix}?"
            ) from None
        except nats.errors.TimeoutError:
            raise RequestTimeout(
                f"no reply from {self.prefix}.{subject} in {timeout:g} s"
            ) from None
        headers = reply.headers or {}
        if ERROR_CODE_HEADER in headers:
            raise _error_of(reply.data, headers)
        return msgspec.json.decode(reply.data, type=reply_type)

    async def call(
        self,
        subject: str,
        body: Mapping[str, Any],
        *,
        user: str | None = None,
        roles: str | Iterable[str] | None = None,
        lang: str | None = None,
    ) -> dict[str, Any]:
        """A request as plain JSON: ``body`` a dict, the reply a dict (errors still raise).

        For a subject this client has no method for yet, or code that keeps dicts.
        """
        if isinstance(roles, str):
            roles = [r.strip() for r in roles.split(",") if r.strip()]
        who = self.acting(user=user, roles=roles, lang=lang)
        reply: dict[str, Any] = await who.request(subject, body, dict)
        return reply

    # --- campaigns -------------------------------------------------------------------

    async def create_campaign(
        self,
        name: str,
        subject: str,
        *,
        body_text: str | None = None,
        body_html: str | None = None,
        priority: int = 0,
        account: str | None = None,
        backup_account: str | None = None,
    ) -> CampaignView:
        """``account``: the SMTP account it goes through (None: the default);
        ``backup_account``: the one used while that account's breaker is open."""
        body = CampaignCreate(
            name=name,
            subject=subject,
            body_text=body_text,
            body_html=body_html,
            priority=priority,
            account=account,
            backup_account=backup_account,
        )
        return await self.request("campaign.create", body, CampaignView)

    async def update_campaign(
        self,
        campaign_id: int,
        *,
        name: str | Unset = UNSET,
        subject: str | Unset = UNSET,
        body_text: str | Unset | None = UNSET,
        body_html: str | Unset | None = UNSET,
        priority: int | Unset = UNSET,
        account: str | Unset | None = UNSET,
        backup_account: str | Unset | None = UNSET,
    ) -> CampaignView:
        """Changes the given fields; ``None`` clears a body (one must remain), and
        puts the campaign back on the default account / leaves it without a backup."""
        body = CampaignUpdate(
            campaign_id=campaign_id,
            name=name,
            subject=subject,
            body_text=body_text,
            body_html=body_html,
            priority=priority,
            account=account,
            backup_account=backup_account,
        )
        return await self.request("campaign.update", body, CampaignView)

    async def get_campaign(self, campaign_id: int) -> CampaignView:
        return await self.request(
            "campaign.get", CampaignRef(campaign_id=campaign_id), CampaignView
        )

    async def list_campaigns(
        self,
        *,
        owner_id: str | None = None,
        status: Sequence[str] = (),
        limit: int = 50,
        cursor: int | None = None,
    ) -> CampaignPage:
        body = CampaignList(
            owner_id=owner_id,
            status=list(status),  # type: ignore[arg-type]  # the server checks the values
            limit=limit,
            cursor=cursor,
        )
        return await self.request("campaign.list", body, CampaignPage)

    async def iter_campaigns(
        self, *, owner_id: str | None = None, status: Sequence[str] = (), page: int = 100
    ) -> AsyncIterator[CampaignView]:
        """Every campaign ``list_campaigns`` would list, page after page."""
        cursor: int | None = None
        while True:
            got = await self.list_campaigns(
                owner_id=owner_id, status=status, limit=page, cursor=cursor
            )
            for item in got.items:
                yield item
            if got.next_cursor is None:
                return
            cursor = got.next_cursor

    async def start_campaign(
        self, campaign_id: int, *, send_at: datetime | None = None
    ) -> StartReply:
        """Queues a draft (for ``send_at``, if given: an aware datetime); the reply's
        ``warnings`` are for the manager to see."""
        body = CampaignStart(campaign_id=campaign_id, send_at=send_at)
        return await self.request("campaign.start", body, StartReply)

    async def retry_failed(self, campaign_id: int, *, permanent: bool = False) -> RetryReply:
        """Failed recipients (transient by default) as a new attempt; never suppressed ones."""
        body = RetryFailed(campaign_id=campaign_id, permanent=permanent)
        return await self.request("campaign.retry_failed", body, RetryReply)

    async def unschedule_campaign(self, campaign_id: int) -> CampaignView:
        """A scheduled campaign that has not started goes back to draft."""
        ref = CampaignRef(campaign_id=campaign_id)
        return await self.request("campaign.unschedule", ref, CampaignView)

    async def pause_campaign(self, campaign_id: int) -> CampaignView:
        return await self.request(
            "campaign.pause", CampaignRef(campaign_id=campaign_id), CampaignView
        )

    async def resume_campaign(self, campaign_id: int) -> CampaignView:
        ref = CampaignRef(campaign_id=campaign_id)
        return await self.request("campaign.resume", ref, CampaignView)

    async def cancel_campaign(self, campaign_id: int) -> CampaignView:
        ref = CampaignRef(campaign_id=campaign_id)
        return await self.request("campaign.cancel", ref, CampaignView)

    async def delete_campaign(self, campaign_id: int) -> CampaignDeleted:
        ref = CampaignRef(campaign_id=campaign_id)
        return await self.request("campaign.delete", ref, CampaignDeleted)

    async def send_test(
        self,
        campaign_id: int,
        email: str,
        *,
        name: str | None = None,
        variables: Mapping[str, str] | None = None,
    ) -> TestEmailSent:
        body = TestEmail(
            campaign_id=campaign_id, email=email, name=name, variables=dict(variables or {})
        )
        return await self.request("campaign.test", body, TestEmailSent)

    async def manager_status(self, owner_id: str | None = None) -> ManagerStatus:
        """The manager's view: for the acting user, or (an admin) for ``owner_id``."""
        return await self.request("manager.status", StatusRequest(owner_id=owner_id), ManagerStatus)

    # --- recipients and attachments ----------------------------------------------------

    async def add_recipients(
        self, campaign_id: int, recipients: Sequence[Recipient]
    ) -> RecipientsAdded:
        """Adds up to 5000 recipients (``RecipientIn`` or dicts of its fields)."""
        items = [
            r if isinstance(r, RecipientIn) else msgspec.convert(dict(r), RecipientIn)
            for r in recipients
        ]
        body = RecipientsAdd(campaign_id=campaign_id, recipients=items)
        return await self.request("recipients.add", body, RecipientsAdded)

    async def import_recipients(
        self,
        campaign_id: int,
        path: str | Path,
        *,
        format: Literal["csv", "jsonl"] | None = None,
        on_progress: Callable[[ImportProgress], object] | None = None,
        timeout: float = 600.0,
    ) -> RecipientsImported:
        """Adds every recipient of a file at once (``recipients.import``), whatever its size.

        The file is uploaded to the deployment's JetStream Object Store bucket (no NATS
        message limit there), then imported by the service: the same checks as
        ``add_recipients``, all lines or none. ``format`` defaults to ``jsonl`` for a
        ``.jsonl``/``.ndjson`` file, else ``csv`` (header: ``email``, ``name``, variables).
        ``on_progress`` gets the service's ``ImportProgress`` events while it reads and
        writes. ``timeout`` bounds the import's request (the upload is not counted).
        """
        file = Path(path)
        fmt = format or ("jsonl" if file.suffix.lower() in (".jsonl", ".ndjson") else "csv")
        js = self.nc.jetstream()
        try:
            store = await js.object_store(imports_bucket(self.prefix))
        except BucketNotFoundError:
            raise NoResponders(
                f"no imports bucket for {self.prefix}: is a mailer with recipients.import "
                f"running with MAILER_SUBJECT_PREFIX={self.prefix}?"
            ) from None
        name = f"{campaign_id}-{uuid.uuid4().hex}{file.suffix.lower()}"
        upload = await asyncio.to_thread(file.open, "rb")
        try:
            await store.put(name, upload)
        finally:
            upload.close()
        subscription = None
        if on_progress is not None:

            async def progress(msg: Msg) -> None:
                event = msgspec.json.decode(msg.data, type=ImportProgress)
                if event.object == name:
                    on_progress(event)

            subscription = await self.nc.subscribe(
                f"{self.prefix}.import.progress.{campaign_id}", cb=progress
            )
        try:
            body = RecipientsImport(campaign_id=campaign_id, object=name, format=fmt)
            return await self.request(
                "recipients.import", body, RecipientsImported, timeout=timeout
            )
        finally:
            if subscription is not None:
                await subscription.unsubscribe()

    async def list_recipients(
        self,
        campaign_id: int,
        *,
        status: str | None = None,
        limit: int = 100,
        cursor: int | None = None,
    ) -> RecipientPage:
        body = RecipientList(
            campaign_id=campaign_id,
            status=status,  # type: ignore[arg-type]  # the server checks the value
            limit=limit,
            cursor=cursor,
        )
        return await self.request("recipients.list", body, RecipientPage)

    async def iter_recipients(
        self, campaign_id: int, *, status: str | None = None, page: int = 500
    ) -> AsyncIterator[RecipientView]:
        cursor: int | None = None
        while True:
            got = await self.list_recipients(campaign_id, status=status, limit=page, cursor=cursor)
            for item in got.items:
                yield item
            if got.next_cursor is None:
                return
            cursor = got.next_cursor

    async def remove_recipients(self, campaign_id: int, emails: Sequence[str]) -> RecipientsRemoved:
        """Removes pending recipients by address (up to 5000 per call)."""
        body = RecipientsRemove(campaign_id=campaign_id, emails=list(emails))
        return await self.request("recipients.remove", body, RecipientsRemoved)

    async def resolve_recipients(
        self,
        campaign_id: int,
        recipient_ids: Sequence[int],
        to: Literal["sent", "failed", "retry"],
        *,
        note: str = "",
    ) -> ResolveReply:
        """Admin only: settle in-doubt recipients; ``retry`` may send a message twice."""
        body = ResolveInDoubt(
            campaign_id=campaign_id, recipient_ids=list(recipient_ids), to=to, note=note
        )
        return await self.request("recipients.resolve", body, ResolveReply)

    async def add_attachment(
        self, campaign_id: int, filename: str, content: bytes, content_type: str
    ) -> AttachmentView:
        body = AttachmentAdd(
            campaign_id=campaign_id, filename=filename, content_type=content_type, content=content
        )
        return await self.request("attachments.add", body, AttachmentView)

    async def list_attachments(self, campaign_id: int) -> AttachmentList:
        ref = CampaignRef(campaign_id=campaign_id)
        return await self.request("attachments.list", ref, AttachmentList)

    async def remove_attachment(self, campaign_id: int, attachment_id: int) -> AttachmentList:
        ref = AttachmentRef(campaign_id=campaign_id, attachment_id=attachment_id)
        return await self.request("attachments.remove", ref, AttachmentList)

    # --- unsubscribes, quota, audit ------------------------------------------------------

    async def unsubscribe_add(self, email: str, *, source: str = "api") -> UnsubscribeView:
        """Admin only."""
        body = UnsubscribeAdd(email=email, source=source)
        return await self.request("unsubscribe.add", body, UnsubscribeView)

    async def unsubscribe_remove(self, email: str) -> UnsubscribeRemoved:
        """Admin only."""
        return await self.request("unsubscribe.remove", EmailRef(email=email), UnsubscribeRemoved)

    async def unsubscribe_check(self, email: str) -> UnsubscribeView:
        return await self.request("unsubscribe.check", EmailRef(email=email), UnsubscribeView)

    async def unsubscribe_list(
        self, *, limit: int = 100, cursor: str | None = None
    ) -> UnsubscribePage:
        """Admin only."""
        body = UnsubscribeList(limit=limit, cursor=cursor)
        return await self.request("unsubscribe.list", body, UnsubscribePage)

    # --- the suppression list ---------------------------------------------------------

    async def suppression_check(self, email: str) -> SuppressionView:
        """Whether the address is suppressed, and why."""
        return await self.request("suppression.check", EmailRef(email=email), SuppressionView)

    async def suppression_list(
        self,
        *,
        limit: int = 100,
        cursor: str | None = None,
        reason: SuppressionReason | None = None,
    ) -> SuppressionPage:
        """Admin only."""
        body = SuppressionList(limit=limit, cursor=cursor, reason=reason)
        return await self.request("suppression.list", body, SuppressionPage)

    async def suppression_add(self, email: str, *, detail: str = "") -> SuppressionView:
        """Admin only: suppress an address by hand (reason ``manual``)."""
        body = SuppressionAdd(email=email, detail=detail)
        return await self.request("suppression.add", body, SuppressionView)

    async def suppression_remove(self, email: str) -> SuppressionRemoved:
        """Admin only."""
        ref = EmailRef(email=email)
        return await self.request("suppression.remove", ref, SuppressionRemoved)

    async def quota(self, account: str | None = None) -> QuotaView:
        """An SMTP account's quota (None: the default account's)."""
        return await self.request("quota.get", QuotaRef(account=account), QuotaView)

    async def sync_quota(self, account: str | None = None) -> QuotaView:
        """Admin only: asks the account's provider now (None: the default account's)."""
        return await self.request("quota.sync", QuotaRef(account=account), QuotaView)

    async def set_quota(self, monthly_limit: int, account: str | None = None) -> QuotaView:
        """Admin only, local quota only: the account's monthly allowance from now on."""
        body = QuotaSet(monthly_limit=monthly_limit, account=account)
        return await self.request("quota.set", body, QuotaView)

    async def reload_limits(self) -> LimitsReloaded:
        """Admin only: every limit's deferral decided again under the limits in force."""
        return await self.request("limits.reload", Empty(), LimitsReloaded)

    async def audit(
        self, campaign_id: int, *, limit: int = 100, cursor: int | None = None
    ) -> AuditPage:
        body = AuditList(campaign_id=campaign_id, limit=limit, cursor=cursor)
        return await self.request("audit.list", body, AuditPage)

    # --- events and discovery --------------------------------------------------------------

    def campaign_events(
        self,
        campaign_id: int | None = None,
        *,
        deliver: Literal["new", "all"] = "new",
        since: datetime | None = None,
        durable: str | None = None,
    ) -> CampaignEvents:
        """A campaign's events (all campaigns' when ``campaign_id`` is None) through a
        JetStream consumer on the events stream: nothing is missed between events.

        Use as ``async with client.campaign_events(7) as events: async for e in events``.
        ``deliver="new"`` starts at the moment the consumer is created (on entering
        the ``async with``), ``"all"`` at the stream's first event, ``since`` at a
        time. With ``durable`` the consumer keeps its place across runs.
        """
        return CampaignEvents(
            self.nc, self.prefix, campaign_id, deliver=deliver, since=since, durable=durable
        )

    def events(
        self,
        subjects: str = ">",
        *,
        deliver: Literal["new", "all"] = "new",
        since: datetime | None = None,
        durable: str | None = None,
    ) -> EventStream:
        """Every event under ``<prefix>.events.<subjects>`` as it is stored, undecoded."""
        return EventStream(
            self.nc, self.prefix, subjects, deliver=deliver, since=since, durable=durable
        )

    async def ping(self, *, wait: float = 0.5) -> list[Instance]:
        """The instances of the ``mailer`` micro service answering within ``wait``
        seconds (any prefix: ``Instance.subject_prefix`` says which)."""
        return await ping(self.nc, wait=wait)


def _error_of(data: bytes, headers: Mapping[str, str]) -> MailerError:
    try:
        status = int(headers[ERROR_CODE_HEADER])
    except ValueError:
        status = 500
    try:
        body = msgspec.json.decode(data, type=ErrorReply).error
    except msgspec.DecodeError:
        return error_for("internal_error", headers.get(ERROR_HEADER, ""), None, status)
    return error_for(body.code, body.message, body.details, status)
