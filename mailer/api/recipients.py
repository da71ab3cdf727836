"""Recipients and attachments of a campaign.

Both change only while the campaign is draft, ready or paused (``EDITABLE``):
never while it sends, never once it is over. An add that would take the
campaign past ``MAILER_MAX_CAMPAIGN_RECIPIENTS`` is refused whole
(``recipients_limit``). Recipients are added in bulk
(up to ``MAX_RECIPIENTS_PER_CALL`` per call, the CRM's generation cap);
invalid addresses are reported with their reason and duplicates collapse,
whatever their case. Only pending recipients can be removed: one already
sent, failed or in progress is history the send log refers to.
"""

from __future__ import annotations

from mailer import addresses
from mailer.api.context import (
    EDITABLE,
    ApiContext,
    Caller,
    check_address,
    check_attachment,
    require_owner,
)
from mailer.apistore import Locked
from mailer.errors import Conflict, NotFound, ValidationFailed
from mailer.messages import (
    AttachmentAdd,
    AttachmentList,
    AttachmentRef,
    AttachmentView,
    CampaignRef,
    InvalidAddress,
    NotRemoved,
    RecipientList,
    RecipientPage,
    RecipientsAdd,
    RecipientsAdded,
    RecipientsRemove,
    RecipientsRemoved,
)

__all__ = [
    "MAX_RECIPIENTS_PER_CALL",
    "add",
    "add_attachment",
    "list_attachments",
    "list_recipients",
    "remove",
    "remove_attachment",
]

MAX_RECIPIENTS_PER_CALL = 5000


async def add(ctx: ApiContext, caller: Caller, req: RecipientsAdd) -> RecipientsAdded:
    if len(req.recipients) > MAX_RECIPIENTS_PER_CALL:
        raise ValidationFailed("too_many_in_one_call", limit=MAX_RECIPIENTS_PER_CALL)
    invalid: list[InvalidAddress] = []
    rows: list[tuple[str, str | None, dict[str, str]]] = []
    seen: set[str] = set()
    duplicates = 0
    for r in req.recipients:
        reason = check_address(r.email)
        if reason is not None:
            invalid.append(InvalidAddress(email=r.email, reason=reason))
            continue
        key = addresses.normalize(r.email)
        if key in seen:
            duplicates += 1
            continue
        seen.add(key)
        rows.append((r.email, r.name, r.variables))

    async def change(tx: Locked) -> int:
        # Checked and inserted under the campaign's lock: a start (or pause,
        # cancel) waits for this transaction, so nobody is added to a campaign
        # that has begun sending or is over.
        _editable(tx, caller, req.campaign_id)
        now = ctx.clock.now()
        # One INSERT ... SELECT FROM unnest: all rows or none.
        added = await tx.add_recipients(rows, now)
        # Counted after the insert (duplicates collapsed), under the lock: an
        # add that would take the campaign past the cap is rolled back whole.
        total = await tx.recipients_count() if added else 0
        if total > ctx.settings.max_campaign_recipients:
            raise ValidationFailed(
                "recipients_limit",
                count=total,
                added=added,
                limit=ctx.settings.max_campaign_recipients,
            )
        if added:
            await tx.audit(
                caller.user,
                "recipients.add",
                {"count": added, "duplicates": duplicates + len(rows) - added},
                now,
            )
        return added

    added = await ctx.db.locked(req.campaign_id, change)
    return RecipientsAdded(added=added, duplicates=duplicates + len(rows) - added, invalid=invalid)


async def list_recipients(ctx: ApiContext, caller: Caller, req: RecipientList) -> RecipientPage:
    await ctx.own(caller, req.campaign_id)
    items = await ctx.db.list_recipients(
        req.campaign_id, status=req.status, cursor=req.cursor, limit=req.limit + 1
    )
    more = len(items) > req.limit
    items = items[: req.limit]
    return RecipientPage(items=items, next_cursor=items[-1].id if more else None)


async def remove(ctx: ApiContext, caller: Caller, req: RecipientsRemove) -> RecipientsRemoved:
    wanted = list(dict.fromkeys(addresses.normalize(e) for e in req.emails))

    async def change(tx: Locked) -> RecipientsRemoved:
        _editable(tx, caller, req.campaign_id)
        removed, kept = await tx.remove_pending(wanted)
        now = ctx.clock.now()
        if removed:
            await tx.audit(caller.user, "recipients.remove", {"count": len(removed)}, now)
        not_removed = [
            NotRemoved(email=e, reason="not_pending" if e in kept else "not_found")
            for e in wanted
            if e not in removed
        ]
        return RecipientsRemoved(removed=len(removed), not_removed=not_removed)

    return await ctx.db.locked(req.campaign_id, change)


async def add_attachment(ctx: ApiContext, caller: Caller, req: AttachmentAdd) -> AttachmentView:
    s = ctx.settings
    size = len(req.content)
    if size > s.max_attachment_bytes:
        raise ValidationFailed(
            "attachment_too_large", filename=req.filename, size=size, limit=s.max_attachment_bytes
        )
    # The engine builds the attachment's part with this same check: a file it
    # could not send is refused here, not found out after the campaign started.
    check_attachment(req.filename, req.content_type)

    async def change(tx: Locked) -> AttachmentView:
        _editable(tx, caller, req.campaign_id)
        # Summed under the campaign's lock: two concurrent adds cannot both
        # fit under the limit and together exceed it.
        total = await tx.attachments_size() + size
        if total > s.max_attachments_total_bytes:
            raise ValidationFailed(
                "attachments_total_too_large", total=total, limit=s.max_attachments_total_bytes
            )
        now = ctx.clock.now()
        view = await tx.add_attachment(req.filename, req.content_type, req.content, now)
        await tx.audit(
            caller.user,
            "attachment.add",
            {"attachment_id": view.id, "filename": view.filename, "size": view.size},
            now,
        )
        return view

    return await ctx.db.locked(req.campaign_id, change)


async def list_attachments(ctx: ApiContext, caller: Caller, req: CampaignRef) -> AttachmentList:
    await ctx.own(caller, req.campaign_id)
    items = await ctx.db.list_attachments(req.campaign_id)
    return AttachmentList(items=items, total_size=sum(a.size for a in items))


async def remove_attachment(ctx: ApiContext, caller: Caller, req: AttachmentRef) -> AttachmentList:
    async def change(tx: Locked) -> None:
        _editable(tx, caller, req.campaign_id)
        filename = await tx.remove_attachment(req.attachment_id)
        if filename is None:
            raise NotFound(
                "attachment_not_found",
                attachment_id=req.attachment_id,
                campaign_id=req.campaign_id,
            )
        await tx.audit(
            caller.user,
            "attachment.remove",
            {"attachment_id": req.attachment_id, "filename": filename},
            ctx.clock.now(),
        )

    await ctx.db.locked(req.campaign_id, change)
    items = await ctx.db.list_attachments(req.campaign_id)
    return AttachmentList(items=items, total_size=sum(a.size for a in items))


def _editable(tx: Locked, caller: Caller, campaign_id: int) -> None:
    if tx.campaign is None:
        raise NotFound(campaign_id=campaign_id)
    require_owner(caller, tx.campaign.owner_id)
    if tx.campaign.status not in EDITABLE:
        raise Conflict(status=tx.campaign.status)
