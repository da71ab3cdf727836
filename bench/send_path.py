"""Throughput of the whole send path against the bare-aiosmtplib ceiling.

Starts the embedded NATS/PostgreSQL/Redis stack and an SMTP sink in a
separate process (Postfix's C ``smtp-sink`` when it is on PATH, else
aiosmtpd's Sink handler), then measures, on the same sink:

1. ceiling: pre-rendered bytes sent with aiosmtplib ``sendmail`` over N
   reused connections, no database, no NATS;
2. mailer: a campaign of M recipients created, started and completed through
   the public NATS API, with every rule, record and send-log row.

Prints both figures in messages per second and their ratio. Usage:
    python bench/send_path.py [--recipients 5000] [--connections 16]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiosmtplib
import msgspec
import nats

from mailer.config import load_settings
from mailer.db import migrate
from mailer.devrun import with_endpoints
from mailer.devstack import EmbeddedStack, StackOverrides, free_port
from mailer.render import MessageTemplate
from mailer.service import Service


def start_sink(port: int) -> tuple[subprocess.Popen[bytes], str]:
    postfix_sink = shutil.which("smtp-sink")
    if postfix_sink:
        cmd = [postfix_sink, "-c", f"127.0.0.1:{port}", "1000"]
        if os.geteuid() == 0:  # smtp-sink refuses to run as root without -u
            cmd[1:1] = ["-u", "nobody"]
        name = "postfix smtp-sink"
    else:
        cmd = [
            sys.executable,
            "-m",
            "aiosmtpd",
            "-n",
            "-l",
            f"127.0.0.1:{port}",
            "-c",
            "aiosmtpd.handlers.Sink",
        ]
        name = "aiosmtpd Sink (separate process)"
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), name


async def wait_port(port: int) -> None:
    for _ in range(200):
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("sink did not start")


async def ceiling(port: int, n: int, connections: int) -> float:
    template = MessageTemplate(
        from_email="crm@example.com",
        from_name="CRM",
        subject="Bench",
        text="Здравствуйте, {{name}}!",
        html="<p>Здравствуйте, {{name}}!</p>",
        message_id_domain="example.com",
    )
    from datetime import UTC, datetime

    data = [
        template.render(
            to_email=f"u{i}@example.org",
            to_name=f"User {i}",
            variables={},
            message_id=f"<b{i}@example.com>",
            date=datetime.now(UTC),
            unsubscribe_url="http://localhost/u/x",
        )
        for i in range(n)
    ]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(i)

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        while not queue.empty():
            i = queue.get_nowait()
            await smtp.sendmail("crm@example.com", [f"u{i}@example.org"], data[i])
        await smtp.quit()

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    return n / (time.perf_counter() - began)


async def through_mailer(stack: EmbeddedStack, port: int, n: int, connections: int) -> float:
    settings = with_endpoints(
        load_settings({}, dotenv=None, http_port=0, public_http_port=0, log_level="WARNING"),
        stack.endpoints,
    )
    settings = msgspec.structs.replace(
        settings,
        smtp_host="127.0.0.1",
        smtp_port=port,
        smtp_connections=connections,
        rate_per_hour=10_000_000,
        batch_size=500,
        working_hours_start="00:00",
        working_hours_end="24:00",
        subject_prefix="bench",
    )
    await migrate(settings.database_url)
    service = Service(settings)
    await service.start()
    nc = await nats.connect(settings.nats_url)
    done = asyncio.get_running_loop().create_future()

    async def on_event(msg: nats.aio.msg.Msg) -> None:
        event = msgspec.json.decode(msg.data)
        if event["event"] in ("sent", "completed_with_errors") and not done.done():
            done.set_result(event)

    async def call(subject: str, body: object) -> dict[str, object]:
        reply = await nc.request(
            f"bench.{subject}",
            msgspec.json.encode(body),
            timeout=60,
            headers={"Mailer-User": "bench"},
        )
        result: dict[str, object] = msgspec.json.decode(reply.data)
        return result

    try:
        await nc.subscribe("bench.events.campaign.>", cb=on_event)
        created = await call(
            "campaign.create",
            {
                "name": "bench",
                "subject": "Bench",
                "body_text": "Здравствуйте, {{name}}!",
                "body_html": "<p>Здравствуйте, {{name}}!</p>",
            },
        )
        cid = created["id"]
        for i in range(0, n, 5000):
            people = [
                {"email": f"r{j}@example.org", "name": f"User {j}"}
                for j in range(i, min(n, i + 5000))
            ]
            await call("recipients.add", {"campaign_id": cid, "recipients": people})
        began = time.perf_counter()
        await call("campaign.start", {"campaign_id": cid})
        event = await asyncio.wait_for(done, timeout=600)
        took = time.perf_counter() - began
        if event["counts"] != {"sent": n}:
            raise RuntimeError(f"unexpected result {event}")
        return n / took
    finally:
        await nc.close()
        await service.stop()


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipients", type=int, default=5000)
    p.add_argument("--connections", type=int, default=16)
    args = p.parse_args()
    port = free_port()
    sink, sink_name = start_sink(port)
    try:
        await wait_port(port)
        var = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
        overrides = StackOverrides(smtp_host="127.0.0.1", smtp_port=port)
        async with EmbeddedStack(var, overrides, fresh=True) as stack:
            bare = await ceiling(port, args.recipients, args.connections)
            full = await through_mailer(stack, port, args.recipients, args.connections)
        shutil.rmtree(var, ignore_errors=True)
    finally:
        sink.terminate()
        sink.wait()
    print(f"sink: {sink_name}; {args.recipients} messages; {args.connections} connections")
    print(f"ceiling (bare aiosmtplib sendmail, pre-rendered): {bare:,.0f} msg/s")
    print(f"mailer (NATS API -> actors -> PostgreSQL -> SMTP):  {full:,.0f} msg/s")
    print(f"ratio: {full / bare:.0%} of the ceiling")


if __name__ == "__main__":
    asyncio.run(main())
