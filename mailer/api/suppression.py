"""The suppression list's admin subjects: suppression.check / list / add / remove.

Who may (``Mailer-Roles``): ``suppression.check`` any authenticated caller (a
CRM screen asks "may I mail this address, and if not, why?");
``suppression.list``, ``suppression.add``, ``suppression.remove``: ``admin``
only. Adds and removes are audited. The ``unsubscribe.*`` subjects keep
working on the same list (an unsubscribe is one reason among others).
"""

from __future__ import annotations

from mailer import addresses
from mailer.api.context import ApiContext, Caller, check_address, require_admin
from mailer.errors import ValidationFailed
from mailer.messages import (
    EmailRef,
    SuppressionAdd,
    SuppressionList,
    SuppressionPage,
    SuppressionRemoved,
    SuppressionView,
)
from mailer.suppression import PgSuppressions, SuppressionRow

__all__ = ["suppression_add", "suppression_check", "suppression_list", "suppression_remove"]


def _address(email: str) -> str:
    reason = check_address(email)
    if reason is not None:
        raise ValidationFailed(
            "validation_error", text_key="invalid_email", email=email, reason=reason
        )
    return addresses.normalize(email)


def _store(ctx: ApiContext) -> PgSuppressions:
    return PgSuppressions(ctx.store.pool)


def _view(email: str, row: SuppressionRow | None) -> SuppressionView:
    if row is None:
        return SuppressionView(email=email, suppressed=False)
    return SuppressionView(
        email=row.email,
        suppressed=True,
        reason=row.reason,
        source=row.source,
        campaign_id=row.campaign_id,
        detail=row.detail,
        created_at=row.created_at,
    )


async def suppression_check(ctx: ApiContext, caller: Caller, req: EmailRef) -> SuppressionView:
    email = _address(req.email)
    return _view(email, await _store(ctx).get(email))


async def suppression_list(
    ctx: ApiContext, caller: Caller, req: SuppressionList
) -> SuppressionPage:
    require_admin(caller)
    cursor = addresses.normalize(req.cursor) if req.cursor is not None else None
    rows = await _store(ctx).list(cursor=cursor, reason=req.reason, limit=req.limit + 1)
    more = len(rows) > req.limit
    items = [_view(r.email, r) for r in rows[: req.limit]]
    return SuppressionPage(items=items, next_cursor=items[-1].email if more else None)


async def suppression_add(ctx: ApiContext, caller: Caller, req: SuppressionAdd) -> SuppressionView:
    """Lists the address (reason ``manual``); one already listed keeps its first reason."""
    require_admin(caller)
    email = _address(req.email)
    store = _store(ctx)
    await store.add(
        email, reason="manual", detail=req.detail, actor_id=caller.user, now=ctx.clock.now()
    )
    return _view(email, await store.get(email))


async def suppression_remove(ctx: ApiContext, caller: Caller, req: EmailRef) -> SuppressionRemoved:
    require_admin(caller)
    email = _address(req.email)
    reason = await _store(ctx).remove(email, actor_id=caller.user, now=ctx.clock.now())
    return SuppressionRemoved(email=email, removed=reason is not None, reason=reason)
