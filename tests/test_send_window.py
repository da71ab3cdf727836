"""Memory of the send path is bounded by configuration, not by attachments x batch.

A campaign's attachments are encoded once and every message points to the same
bytes; a granted batch is rendered and sent in waves of ``smtp_connections``,
the next wave rendered while the previous one is sent, so no more messages are
rendered and unsent at any moment than two waves. Real NATS, PostgreSQL,
Redis and SMTP sink; the spies only count.
"""

from __future__ import annotations

import base64
import email
import email.policy
import os
from typing import Any

import pytest

from mailer.actors.campaign import CampaignActor
from mailer.payload import Payload
from mailer.transport import SmtpTransport
from tests.helpers import Crm, Events, people

BIG = 50_000  # a chunk this large is attachment data, not a personal part


async def test_a_batch_is_rendered_and_sent_in_waves_that_share_the_attachment(
    make_service, crm: Crm, events: Events, sink, monkeypatch: pytest.MonkeyPatch
) -> None:
    live = {"rendered": 0, "finished": 0, "most": 0}
    big_chunks: list[bytes] = []  # kept alive, so that id() tells objects apart
    render, send = CampaignActor._render, SmtpTransport.send

    def counting_render(self: CampaignActor, *args: Any) -> Any:
        mail = render(self, *args)
        live["rendered"] += 1
        live["most"] = max(live["most"], live["rendered"] - live["finished"])
        return mail

    async def counting_send(
        self: SmtpTransport, mail_from: str, rcpt: str, data: Any, **kw: Any
    ) -> Any:
        chunks = data.chunks if isinstance(data, Payload) else (data,)
        big_chunks.extend(c for c in chunks if len(c) > BIG)
        try:
            return await send(self, mail_from, rcpt, data, **kw)
        finally:
            live["finished"] += 1

    monkeypatch.setattr(CampaignActor, "_render", counting_render)
    monkeypatch.setattr(SmtpTransport, "send", counting_send)

    connections = 3
    depth = 2 * connections
    await make_service(batch_size=20, smtp_connections=connections, pipeline_depth=depth)
    cid = await crm.campaign(people(20))
    content = os.urandom(400_000)
    await crm.call(
        "attachments.add",
        {
            "campaign_id": cid,
            "filename": "price.pdf",
            "content_type": "application/pdf",
            "content": base64.b64encode(content).decode(),
        },
    )
    await crm.start(cid)
    assert (await events.wait(cid, ("sent", "completed_with_errors")))["event"] == "sent"

    assert live["rendered"] == live["finished"] == 20
    # Rendered but not yet sent, at any moment: at most the pipeline's depth (the
    # waves with SMTP and those handed while they are sent), never the batch.
    assert 0 < live["most"] <= depth
    # 20 messages, one copy of the attachment's encoded bytes: every message
    # points to the same chunks instead of carrying its own.
    distinct = {id(c) for c in big_chunks}
    assert len(big_chunks) >= 20 and len(distinct) * 20 == len(big_chunks)
    assert sum(len(c) for c in {id(c): c for c in big_chunks}.values()) < 2 * len(content)
    for m in sink.messages:
        msg = email.message_from_bytes(m.data, policy=email.policy.default)
        (part,) = msg.iter_attachments()
        assert part.get_content() == content
