"""A typed asyncio client of the mailer NATS API (docs/api.md).

::

    from mailer.client import ClientOptions, MailerClient

    async with await MailerClient.connect(ClientOptions.from_env(), user="manager-1") as mailer:
        campaign = await mailer.create_campaign("Осень", "Новости", body_text="Привет, {{name}}!")
        await mailer.add_recipients(campaign.id, [{"email": "anna@example.org", "name": "Анна"}])
        started = await mailer.start_campaign(campaign.id)
        async with mailer.campaign_events(campaign.id) as events:
            async for event in events:
                ...

Errors are ``MailerError`` subclasses, one per error code (``mailer.client.errors``).
"""

from mailer.client.api import MAX_RECIPIENTS_PER_CALL, MailerClient
from mailer.client.discovery import Instance
from mailer.client.errors import ERRORS, MailerError
from mailer.client.events import CampaignEvents, EventMessage, EventStream
from mailer.client.options import ClientOptions, Identity

__all__ = [
    "ERRORS",
    "MAX_RECIPIENTS_PER_CALL",
    "CampaignEvents",
    "ClientOptions",
    "EventMessage",
    "EventStream",
    "Identity",
    "Instance",
    "MailerClient",
    "MailerError",
]
