"""A large attachment crosses NATS (the embedded server allows 16 MB payloads)."""

from __future__ import annotations

import base64
import email
import email.policy
import os

from tests.helpers import Crm, Events, people


async def test_a_two_megabyte_attachment_is_sent(
    make_service, crm: Crm, events: Events, sink
) -> None:
    await make_service()
    cid = await crm.campaign(people(1))
    content = os.urandom(2 * 1024 * 1024)
    await crm.call(
        "attachments.add",
        {
            "campaign_id": cid,
            "filename": "отчёт.pdf",
            "content_type": "application/pdf",
            "content": base64.b64encode(content).decode(),
        },
    )
    await crm.start(cid)
    await events.wait(cid, ("sent",))
    msg = email.message_from_bytes(sink.messages[0].data, policy=email.policy.default)
    parts = [p for p in msg.iter_attachments()]
    assert len(parts) == 1 and parts[0].get_content() == content
    assert parts[0].get_filename() == "отчёт.pdf"
