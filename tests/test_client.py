"""mailer.client against a real service: every method, and every error code as its class."""

from __future__ import annotations

import asyncio

import msgspec
from nats.aio.client import Client

from mailer.actors.api import render_error
from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER
from mailer.client import ERRORS, ClientOptions, MailerClient, MailerError
from mailer.client import errors as E
from mailer.config import Settings
from mailer.errors import CODES, ApiError
from tests.helpers import FINAL


async def _campaign(client: MailerClient, **fields: object) -> int:
    view = await client.create_campaign(
        "Осенняя рассылка", "Новости", body_text="Здравствуйте, {{name}}!", **fields
    )
    return view.id


async def test_every_method_against_the_service(make_service, client, sink) -> None:
    await make_service()
    admin = client.acting(user="boss", roles=["admin"])
    view = await client.create_campaign(
        "Осень", "Новости", body_text="Здравствуйте, {{name}}!", priority=3
    )
    assert (view.status, view.priority, view.owner_id) == ("draft", 3, "manager-1")
    cid = view.id
    view = await client.update_campaign(cid, subject="Новости ноября", body_html="<p>{{name}}</p>")
    assert view.subject == "Новости ноября"
    assert (await client.get_campaign(cid)).subject == "Новости ноября"
    other = await _campaign(client)
    page = await client.list_campaigns(limit=1)
    assert [c.id for c in page.items] == [other] and page.next_cursor is not None
    assert [c.id async for c in client.iter_campaigns(page=1)] == [other, cid]
    assert [c.id for c in (await admin.list_campaigns(owner_id="manager-1")).items] == [other, cid]

    added = await client.add_recipients(
        cid,
        [
            {"email": "anna@example.org", "name": "Анна", "variables": {"city": "Казань"}},
            {"email": "ANNA@example.org"},
            {"email": "boris@example.org"},
            {"email": "gleb@example.org"},
            {"email": "no-at"},
        ],
    )
    assert (added.added, added.duplicates) == (3, 1)
    assert [i.email for i in added.invalid] == ["no-at"]
    removed = await client.remove_recipients(cid, ["gleb@example.org", "who@example.org"])
    assert removed.removed == 1 and [n.reason for n in removed.not_removed] == ["not_found"]
    first = await client.list_recipients(cid, limit=1)
    assert [r.email for r in first.items] == ["anna@example.org"]
    assert [r.email async for r in client.iter_recipients(cid, page=1)] == [
        "anna@example.org",
        "boris@example.org",
    ]

    att = await client.add_attachment(cid, "notes.txt", "Привет".encode(), "text/plain")
    assert att.size == len("Привет".encode())
    assert [a.id for a in (await client.list_attachments(cid)).items] == [att.id]
    assert (await client.remove_attachment(cid, att.id)).items == []

    sent = await client.acting(lang="en").send_test(cid, "boss@example.org", name="Босс")
    assert sent.status == "sent" and len(sink.messages) == 1

    unsub = await admin.unsubscribe_add("Gleb@Example.org", source="crm-import")
    assert unsub.unsubscribed and unsub.email == "gleb@example.org"
    assert (await client.unsubscribe_check("gleb@example.org")).unsubscribed
    assert [u.email for u in (await admin.unsubscribe_list()).items] == ["gleb@example.org"]
    assert (await admin.unsubscribe_remove("gleb@example.org")).removed
    assert not (await client.unsubscribe_check("gleb@example.org")).unsubscribed

    quota = await client.quota()
    assert quota.monthly_limit > 0
    assert (await admin.sync_quota()).monthly_limit == quota.monthly_limit

    # Events from the moment the consumer exists: nothing between start and the end is lost.
    async with client.campaign_events(cid) as events:
        started = await client.start_campaign(cid)
        assert started.campaign.status == "ready"
        seen = []
        async with asyncio.timeout(30):
            async for event in events:
                seen.append(event.event)
                if event.event in FINAL:
                    break
    assert seen[0] == "queued" and seen[-1] == "sent" and "started" in seen
    assert (await client.get_campaign(cid)).counts == {"sent": 2}
    status = await client.acting(lang="en").manager_status()
    assert status.owner_id == "manager-1" and status.reason_code in ("empty", None)
    assert (await admin.manager_status("manager-1")).owner_id == "manager-1"
    actions = [a.action for a in (await client.audit(cid)).items]
    assert actions[:2] == ["campaign.create", "campaign.update"] and "campaign.start" in actions

    # The other campaign: pause, resume, cancel, delete; then the finished one is deleted too.
    await client.add_recipients(other, [{"email": "x@example.org"}])
    await client.update_campaign(other, name="Вторая")
    assert (await client.cancel_campaign(other)).status == "cancelled"
    assert (await client.delete_campaign(other)).deleted
    third = await _campaign(client)
    await client.add_recipients(third, [{"email": "y@example.org"}])
    await client.start_campaign(third)
    paused = await client.pause_campaign(third)
    assert paused.status == "paused"
    assert (await client.resume_campaign(third)).status in ("ready", "sending", "sent")
    assert (await client.delete_campaign(cid)).deleted

    [me] = [i for i in await client.ping() if i.subject_prefix == client.prefix]
    assert me.version and me.endpoints >= 24


async def _fails(call: object) -> MailerError:
    try:
        await call  # type: ignore[misc]
    except MailerError as exc:
        return exc
    raise AssertionError("the call succeeded")


async def test_error_replies_of_the_service_raise_their_classes(make_service, client) -> None:
    await make_service(
        max_campaign_recipients=2,
        max_attachment_bytes=100,
        max_attachments_total_bytes=150,
        start_throttle_per_hour=1,
        rate_per_hour=1,
    )
    cid = await _campaign(client)
    cases: list[tuple[type[MailerError], object]] = [
        (E.Unauthenticated, client.acting(user="").get_campaign(cid)),
        (E.Forbidden, client.acting(user="manager-2").get_campaign(cid)),
        (E.NotFound, client.get_campaign(999_999)),
        (E.AttachmentNotFound, client.remove_attachment(cid, 999)),
        (E.BadRequest, client.request("campaign.get", b"{not json", dict)),
        (E.PayloadTooLarge, client.request("campaign.get", b" " * 70_000, dict)),
        (E.ValidationError, client.update_campaign(cid)),
        (E.TooManyInOneCall, client.add_recipients(cid, [{"email": "a@b.c"}] * 5001)),
        (E.EmptyCampaign, client.start_campaign(cid)),
        (E.AttachmentTooLarge, client.add_attachment(cid, "a.bin", b"x" * 101, "a/b")),
    ]
    for cls, call in cases:
        err = await _fails(call)
        assert type(err) is cls, (cls, err)
        assert err.code == cls.code and err.status == CODES[cls.code] and err.message
    await client.add_attachment(cid, "a.bin", b"x" * 100, "a/b")
    err = await _fails(client.add_attachment(cid, "b.bin", b"x" * 60, "a/b"))
    assert isinstance(err, E.AttachmentsTotalTooLarge) and err.details["limit"] == "150"
    err = await _fails(
        client.add_recipients(cid, [{"email": f"u{i}@example.org"} for i in range(3)])
    )
    assert isinstance(err, E.RecipientsLimit) and not err.retryable
    await client.add_recipients(cid, [{"email": f"u{i}@example.org"} for i in range(2)])
    await client.start_campaign(cid)
    err = await _fails(client.start_campaign(cid))
    assert isinstance(err, E.InvalidState) and err.details["status"] in ("ready", "sending", "sent")
    second = await _campaign(client)
    await client.add_recipients(second, [{"email": "v@example.org"}])
    err = await _fails(client.start_campaign(second))
    assert isinstance(err, E.Throttled) and err.retryable and "retry_at" in err.details
    # English when asked, the same code.
    err = await _fails(client.acting(lang="en").get_campaign(999_999))
    assert isinstance(err, E.NotFound) and err.message == "Campaign 999999 not found."


async def test_no_service_no_reply_and_no_server(settings: Settings, nc: Client) -> None:
    nobody = MailerClient(nc, prefix="nobody.here", user="manager-1")
    err = await _fails(nobody.get_campaign(1))
    assert isinstance(err, E.NoResponders) and err.retryable
    await nc.subscribe("silent.campaign.get")  # takes the request, never answers
    silent = MailerClient(nc, prefix="silent", user="manager-1", timeout=0.3)
    err = await _fails(silent.get_campaign(1))
    assert isinstance(err, E.RequestTimeout) and err.retryable
    err = await _fails(
        MailerClient.connect(ClientOptions(url="nats://127.0.0.1:1"), connect_wait=1.0)
    )
    assert isinstance(err, E.ConnectionFailed)


async def test_every_error_code_has_its_class(nc: Client) -> None:
    """Each code the API can answer, as the service words it, becomes its own class."""
    assert set(CODES) <= set(ERRORS)
    retryable_in_docs = {
        "throttle_backend_unavailable",
        "governor_unavailable",
        "sender_unavailable",
        "quota_sync_unavailable",
        "quota_sync_failed",
        "throttled",
        "rate_per_hour",
        "daily_limit",
        "quota_exhausted",
        "outside_hours",
        "campaign_busy",
    }
    code_of_request: dict[str, str] = {}

    async def answer(msg) -> None:  # type: ignore[no-untyped-def]
        code = msg.data.decode()
        exc = ApiError(code, retry_at="2026-11-23T11:00:00+00:00")
        exc.status = CODES[code]  # type: ignore[misc]
        body = render_error(exc, "en")
        await nc.publish(
            msg.reply,
            msgspec.json.encode(body),
            headers={ERROR_HEADER: body.error.message, ERROR_CODE_HEADER: str(CODES[code])},
        )

    await nc.subscribe("codes.campaign.get", cb=answer)
    client = MailerClient(nc, prefix="codes", user="manager-1")
    for code in CODES:
        err = await _fails(client.request("campaign.get", code.encode(), dict))
        assert type(err) is ERRORS[code] and err.code == code, code
        assert err.status == CODES[code] and err.details["retry_at"], code
        assert err.retryable == (code in retryable_in_docs), code
        code_of_request[code] = err.message
    assert code_of_request["not_found"].startswith("Campaign")
    # A code this client does not know yet: a plain MailerError, retryable by its status.
    unknown = E.error_for("brand_new", "m", None, 503)
    assert type(unknown) is MailerError and unknown.code == "brand_new" and unknown.retryable
