"""Unsubscribes, the quota and the audit log.

Who may (``Mailer-Roles``):
- unsubscribe.check, quota.get: any authenticated caller (a CRM screen asks
  "may I mail this address?" and "how much quota is left?");
- unsubscribe.add, unsubscribe.remove, unsubscribe.list, quota.sync,
  quota.set, limits.reload: ``admin`` only (they change who gets mail, list
  people's addresses, spend the provider's API budget, or change limits);
- audit.list: the campaign's owner or an admin, like the campaign itself.
"""

from __future__ import annotations

import logging

import msgspec
import nats.errors

from mailer import addresses
from mailer.accounts import Account, accounts_of
from mailer.api.context import ApiContext, Caller, check_address, require_admin
from mailer.api.outlook import reevaluate_deferrals
from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER, encode
from mailer.errors import Conflict, QuotaSyncFailed, Unavailable, ValidationFailed
from mailer.messages import (
    AuditList,
    AuditPage,
    EmailRef,
    Empty,
    ErrorReply,
    LimitsReloaded,
    QuotaRef,
    QuotaSet,
    QuotaSyncRequest,
    QuotaView,
    UnsubscribeAdd,
    UnsubscribeList,
    UnsubscribePage,
    UnsubscribeRemoved,
    UnsubscribeView,
)
from mailer.quota import PgQuota, sync_subject

__all__ = [
    "QUOTA_SYNC_TIMEOUT_SECONDS",
    "audit_list",
    "limits_reload",
    "quota_get",
    "quota_set",
    "quota_sync",
    "unsubscribe_add",
    "unsubscribe_check",
    "unsubscribe_list",
    "unsubscribe_remove",
]

log = logging.getLogger("mailer.api")

# A provider's API answers in seconds; the endpoint is blocked meanwhile.
QUOTA_SYNC_TIMEOUT_SECONDS = 15.0


def _address(email: str) -> str:
    reason = check_address(email)
    if reason is not None:
        raise ValidationFailed(
            "validation_error", text_key="invalid_email", email=email, reason=reason
        )
    return addresses.normalize(email)


async def unsubscribe_add(ctx: ApiContext, caller: Caller, req: UnsubscribeAdd) -> UnsubscribeView:
    require_admin(caller)
    email = _address(req.email)
    view, _ = await ctx.db.unsubscribe(email, req.source, actor_id=caller.user, now=ctx.clock.now())
    return view


async def unsubscribe_remove(ctx: ApiContext, caller: Caller, req: EmailRef) -> UnsubscribeRemoved:
    require_admin(caller)
    email = _address(req.email)
    removed = await ctx.db.resubscribe(email, actor_id=caller.user, now=ctx.clock.now())
    return UnsubscribeRemoved(email=email, removed=removed)


async def unsubscribe_check(ctx: ApiContext, caller: Caller, req: EmailRef) -> UnsubscribeView:
    return await ctx.db.unsubscribed(_address(req.email))


async def unsubscribe_list(
    ctx: ApiContext, caller: Caller, req: UnsubscribeList
) -> UnsubscribePage:
    require_admin(caller)
    cursor = addresses.normalize(req.cursor) if req.cursor is not None else None
    items = await ctx.db.list_unsubscribes(cursor=cursor, limit=req.limit + 1)
    more = len(items) > req.limit
    items = items[: req.limit]
    return UnsubscribePage(items=items, next_cursor=items[-1].email if more else None)


def _account(ctx: ApiContext, name: str | None) -> Account:
    """The SMTP account a quota request names (None: the default); else ``unknown_account``."""
    accounts = accounts_of(ctx.settings)
    found = accounts.find(name)
    if found is None:
        raise ValidationFailed(
            "unknown_account", field="account", account=name, accounts=", ".join(accounts.names)
        )
    return found


async def _view(ctx: ApiContext, account: Account) -> QuotaView:
    quota = await ctx.db.quota(account.key)
    assert quota is not None, "the migration / the account's start inserts the quota row"
    quota.account = account.name
    return quota


async def quota_get(ctx: ApiContext, caller: Caller, req: QuotaRef) -> QuotaView:
    return await _view(ctx, _account(ctx, req.account))


async def quota_sync(ctx: ApiContext, caller: Caller, req: QuotaRef) -> QuotaView:
    """Asks the account's quota syncer (``mailer.quota.sync_subject``) and returns the fresh row."""
    require_admin(caller)
    account = _account(ctx, req.account)
    subject = sync_subject(ctx.bus, account.key)
    try:
        reply = await ctx.bus.nc.request(
            subject,
            encode(QuotaSyncRequest(requested_by=caller.user)),
            timeout=QUOTA_SYNC_TIMEOUT_SECONDS,
        )
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError, TimeoutError):
        log.warning("quota sync: nobody answered", extra={"nats_subject": subject})
        raise Unavailable("quota_sync_unavailable") from None
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        try:
            detail = msgspec.json.decode(reply.data, type=ErrorReply).error.message
        except (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError):
            detail = headers.get(ERROR_HEADER, "")
        raise QuotaSyncFailed(detail=detail[:500])
    # The syncer answers with the row it left: a provider failure keeps the
    # last numbers and sets sync_error (a success clears it), which the
    # admin who asked must hear as a failure, not as a fresh quota.
    try:
        error = msgspec.json.decode(reply.data, type=QuotaView).sync_error
    except (msgspec.DecodeError, msgspec.ValidationError):
        error = "the quota syncer answered something unreadable"
    details: dict[str, object] = {} if error is None else {"error": error}
    if accounts_of(ctx.settings).several:
        details["account"] = account.name
    await ctx.db.audit(None, caller.user, "quota.sync", details, ctx.clock.now())
    if error is not None:
        raise QuotaSyncFailed(detail=error[:500])
    return await _view(ctx, account)


async def quota_set(ctx: ApiContext, caller: Caller, req: QuotaSet) -> QuotaView:
    """Sets an account's local quota's monthly allowance without a restart; applied at once.

    Only with the ``local`` provider (``quota_not_local`` otherwise: the http
    provider's numbers are the provider's, the next sync would undo any set).
    The allowance less this month's sends becomes ``emails_available`` in one
    step under the quota's lock; later syncs keep the set value. A quota above
    0 resumes every campaign waiting for it at once; all limits' deferrals are
    decided again.
    """
    require_admin(caller)
    account = _account(ctx, req.account)
    if account.settings.quota_provider != "local":
        raise Conflict("quota_not_local", text_key="quota_not_local")
    now = ctx.clock.now()
    several = accounts_of(ctx.settings).several
    ledger = PgQuota(ctx.db.pool, account.key, name=account.name if several else None)
    previous, state = await ledger.set_local(req.monthly_limit, now, ctx.hours.tz)
    details: dict[str, object] = {
        "monthly_limit": req.monthly_limit,
        "from": previous,
        "to": state.emails_available,
    }
    if several:
        details["account"] = account.name
    await ctx.db.audit(None, caller.user, "quota.set", details, now)
    await reevaluate_deferrals(ctx)
    return await _view(ctx, account)


async def limits_reload(ctx: ApiContext, caller: Caller, req: Empty) -> LimitsReloaded:
    """Decides every limit's deferral again, now, against the limits in force."""
    require_admin(caller)
    ids = await reevaluate_deferrals(ctx)
    await ctx.db.audit(None, caller.user, "limits.reload", {"campaigns": ids}, ctx.clock.now())
    return LimitsReloaded(reevaluated=len(ids))


async def audit_list(ctx: ApiContext, caller: Caller, req: AuditList) -> AuditPage:
    await ctx.own(caller, req.campaign_id)
    items = await ctx.db.list_audit(req.campaign_id, cursor=req.cursor, limit=req.limit + 1)
    more = len(items) > req.limit
    items = items[: req.limit]
    return AuditPage(items=items, next_cursor=items[-1].id if more else None)
