"""Every subject of the API: its micro endpoint name, request type, operation, size limit.

Subjects are relative to the configured prefix (``<prefix>.campaign.get``).
docs/api.md describes each; a test checks that discovery lists all of them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, NamedTuple

from mailer.api import (
    admin,
    campaigns,
    imports,
    recipients,
    retry,
    status,
    suppression,
    testmail,
)
from mailer.api.context import ApiContext, Caller
from mailer.config import Settings
from mailer.messages import (
    AttachmentAdd,
    AttachmentRef,
    AuditList,
    CampaignCreate,
    CampaignList,
    CampaignRef,
    CampaignStart,
    CampaignUpdate,
    EmailRef,
    Empty,
    QuotaRef,
    QuotaSet,
    RecipientList,
    RecipientsAdd,
    RecipientsImport,
    RecipientsRemove,
    ResolveInDoubt,
    RetryFailed,
    StatusRequest,
    SuppressionAdd,
    SuppressionList,
    TestEmail,
    UnsubscribeAdd,
    UnsubscribeList,
)

__all__ = ["LARGE_PAYLOAD", "SMALL_PAYLOAD", "Route", "routes"]

Operation = Callable[[ApiContext, Caller, Any], Awaitable[object]]

# Request size limits, checked before decoding. A request naming a campaign
# needs a few hundred bytes; campaign bodies (up to 1 MB of text each) and
# 5000 recipients need megabytes. The NATS server's max_payload (1 MB by
# default) caps every request before it gets here: raise it to use these.
SMALL_PAYLOAD = 64 * 1024
LARGE_PAYLOAD = 4 * 1024 * 1024
# base64 grows content by 4/3; the JSON around it is small.
_BASE64_OVERHEAD = 64 * 1024


class Route(NamedTuple):
    name: str  # the micro endpoint name
    subject: str  # after the prefix
    request: type[Any]
    operation: Operation
    max_payload: int


def routes(settings: Settings) -> list[Route]:
    attachment_payload = settings.max_attachment_bytes * 4 // 3 + _BASE64_OVERHEAD
    small, large = SMALL_PAYLOAD, LARGE_PAYLOAD
    return [
        Route("campaign-create", "campaign.create", CampaignCreate, campaigns.create, large),
        Route("campaign-update", "campaign.update", CampaignUpdate, campaigns.update, large),
        Route("campaign-get", "campaign.get", CampaignRef, campaigns.get, small),
        Route("campaign-list", "campaign.list", CampaignList, campaigns.list_campaigns, small),
        Route("campaign-delete", "campaign.delete", CampaignRef, campaigns.delete, small),
        Route("campaign-start", "campaign.start", CampaignStart, campaigns.start, small),
        Route(
            "campaign-unschedule",
            "campaign.unschedule",
            CampaignRef,
            campaigns.unschedule,
            small,
        ),
        Route("campaign-pause", "campaign.pause", CampaignRef, campaigns.pause, small),
        Route("campaign-resume", "campaign.resume", CampaignRef, campaigns.resume, small),
        Route("campaign-cancel", "campaign.cancel", CampaignRef, campaigns.cancel, small),
        Route("campaign-test", "campaign.test", TestEmail, testmail.send_test, small),
        Route(
            "campaign-retry-failed",
            "campaign.retry_failed",
            RetryFailed,
            retry.retry_failed,
            small,
        ),
        Route("manager-status", "manager.status", StatusRequest, status.status, small),
        Route("recipients-add", "recipients.add", RecipientsAdd, recipients.add, large),
        Route(
            "recipients-import",
            "recipients.import",
            RecipientsImport,
            imports.import_recipients,
            small,
        ),
        Route(
            "recipients-list",
            "recipients.list",
            RecipientList,
            recipients.list_recipients,
            small,
        ),
        Route("recipients-remove", "recipients.remove", RecipientsRemove, recipients.remove, large),
        Route("recipients-resolve", "recipients.resolve", ResolveInDoubt, retry.resolve, large),
        Route(
            "attachments-add",
            "attachments.add",
            AttachmentAdd,
            recipients.add_attachment,
            attachment_payload,
        ),
        Route(
            "attachments-list",
            "attachments.list",
            CampaignRef,
            recipients.list_attachments,
            small,
        ),
        Route(
            "attachments-remove",
            "attachments.remove",
            AttachmentRef,
            recipients.remove_attachment,
            small,
        ),
        Route("unsubscribe-add", "unsubscribe.add", UnsubscribeAdd, admin.unsubscribe_add, small),
        Route(
            "unsubscribe-remove", "unsubscribe.remove", EmailRef, admin.unsubscribe_remove, small
        ),
        Route("unsubscribe-check", "unsubscribe.check", EmailRef, admin.unsubscribe_check, small),
        Route(
            "unsubscribe-list",
            "unsubscribe.list",
            UnsubscribeList,
            admin.unsubscribe_list,
            small,
        ),
        Route(
            "suppression-check",
            "suppression.check",
            EmailRef,
            suppression.suppression_check,
            small,
        ),
        Route(
            "suppression-list",
            "suppression.list",
            SuppressionList,
            suppression.suppression_list,
            small,
        ),
        Route(
            "suppression-add",
            "suppression.add",
            SuppressionAdd,
            suppression.suppression_add,
            small,
        ),
        Route(
            "suppression-remove",
            "suppression.remove",
            EmailRef,
            suppression.suppression_remove,
            small,
        ),
        Route("quota-get", "quota.get", QuotaRef, admin.quota_get, small),
        Route("quota-sync", "quota.sync", QuotaRef, admin.quota_sync, small),
        Route("quota-set", "quota.set", QuotaSet, admin.quota_set, small),
        Route("limits-reload", "limits.reload", Empty, admin.limits_reload, small),
        Route("audit-list", "audit.list", AuditList, admin.audit_list, small),
    ]
