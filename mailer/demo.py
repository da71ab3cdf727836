"""``mailer demo``: a sample campaign sent end to end on the dev stack.

It drives the service only through the public NATS API with the client a
CRM service would use (``mailer.client``): create a campaign, add
recipients, start it, then follow its events (a JetStream consumer) until it
reaches a final status. Exit 0 only if every recipient was sent and
the SMTP sink holds one message per recipient: as many files as recipients,
addressed (``To:``) to each recipient once.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import time
from collections import Counter
from pathlib import Path

import msgspec

from mailer.client import CampaignEvents, ClientOptions, MailerClient
from mailer.config import Settings
from mailer.devrun import dev_stack
from mailer.messages import CampaignEvent

__all__ = ["run_demo"]

FINAL = ("sent", "completed_with_errors", "cancelled")


def _eml_files(outbox: Path | None) -> list[Path]:
    return sorted(outbox.glob("*.eml")) if outbox is not None else []


def _to_addresses(files: list[Path]) -> list[str]:
    """The ``To:`` address of each message file (lower-cased), one per file."""
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    found: list[str] = []
    for path in files:
        with path.open("rb") as f:
            headers = parser.parse(f)
        to = headers["To"]
        addresses = [a.addr_spec.lower() for a in to.addresses] if to is not None else []
        found.append(addresses[0] if len(addresses) == 1 else ",".join(addresses))
    return found


def _people(n: int) -> list[dict[str, str]]:
    return [{"email": f"client{i:03d}@example.org", "name": f"Клиент {i}"} for i in range(n)]


async def _follow(events: CampaignEvents) -> CampaignEvent:
    """Prints the campaign's events until a final one, or a wait that is not a demo."""
    async for event in events:
        counts = ", ".join(f"{k} {v}" for k, v in sorted((event.counts or {}).items()))
        extra = (
            f" ({event.defer_reason} until {event.deferred_until})" if event.defer_reason else ""
        )
        print(f"  event {event.event:<22} {counts}{extra}", flush=True)
        # A deferral ends the demo too: waiting for the next hour or for a
        # quota top-up (limits of a real Redis or provider) is not a demo.
        if event.event in (*FINAL, "deferred", "paused"):
            return event
    raise AssertionError("the events stream ended")


def _outbox_problem(files: list[Path], expected: list[str]) -> str | None:
    """What is wrong with the outbox, or None if it holds one message per recipient."""
    if len(files) != len(expected):
        return f"{len(files)} messages for {len(expected)} recipients"
    got = Counter(_to_addresses(files))
    twice = sorted(a for a, k in got.items() if k > 1)
    missing = sorted(set(expected) - set(got))
    if twice or missing:
        return f"addressed more than once: {twice[:5]}; never addressed: {missing[:5]}"
    return None


async def run_demo(settings: Settings, *, recipients: int = 25) -> int:
    from mailer.service import Service

    # The demo must not collide with a `mailer dev` left running: its own HTTP
    # port. It shows the send path at any hour, so working hours are all day.
    settings = msgspec.structs.replace(
        settings,
        http_port=0,
        public_http_port=0,
        working_hours_start="00:00",
        working_hours_end="24:00",
    )
    began = time.perf_counter()
    async with dev_stack(settings, fresh_outbox=True) as (stack, s):
        service = Service(s)
        await service.start()
        try:
            return await _drive(s, stack.endpoints.outbox_dir, recipients, began)
        finally:
            await service.stop()


async def _drive(s: Settings, outbox: Path | None, n: int, began: float) -> int:
    options = ClientOptions.from_settings(s, name="mailer-demo")
    async with await MailerClient.connect(options, user="demo-manager") as client:
        created = await client.create_campaign(
            "Демо-рассылка",
            "Новости компании — демо",
            body_text="Здравствуйте, {{name}}!\n\nЭто демонстрационное письмо mailer.",
            body_html="<p>Здравствуйте, <b>{{name}}</b>!</p>"
            "<p>Это демонстрационное письмо mailer.</p>",
        )
        campaign_id = created.id
        added = await client.add_recipients(campaign_id, _people(n))
        print(f"campaign {campaign_id}: {added.added} recipients added", flush=True)
        # The consumer exists before the start: no event of this campaign is missed.
        async with client.campaign_events(campaign_id) as events:
            started = await client.start_campaign(campaign_id)
            warnings = [(w.code, w.message) for w in started.warnings]
            print(f"campaign {campaign_id} started{' ' + str(warnings) if warnings else ''}")
            async with asyncio.timeout(120):
                event = await _follow(events)
        view = await client.get_campaign(campaign_id)

    files = await asyncio.to_thread(_eml_files, outbox)
    took = time.perf_counter() - began
    print(
        f"campaign {campaign_id}: status {view.status}, counts {view.counts}; "
        f"{len(files)} messages in {outbox or 'the external SMTP server'}; {took:.1f}s"
    )
    problem = None
    if outbox is not None:
        expected = [p["email"].lower() for p in _people(n)]
        problem = await asyncio.to_thread(_outbox_problem, files, expected)
        if problem:
            print(f"outbox: {problem}")
    if event.event in ("deferred", "paused"):
        print(
            f"the campaign waits ({event.defer_reason} until {event.deferred_until}): "
            "a limit of the servers it runs on was reached"
        )
    ok = event.event == "sent" and problem is None
    print("demo OK" if ok else "demo FAILED")
    return 0 if ok else 1
