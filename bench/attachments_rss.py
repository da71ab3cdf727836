"""Peak memory of a real ``mailer run`` process sending a campaign with big attachments.

Starts the embedded NATS/PostgreSQL/Redis stack and an SMTP sink in a separate
process (as bench/send_path.py does), then ``python -m mailer.cli run`` as an OS
process on them, and drives it over the public NATS API: a campaign with
``--attachments`` x ``--attachment-mib`` MiB of attachments (the allowed 20 MiB by
default) to ``--recipients`` recipients, in batches of ``--batch-size``.

Reads the process's own counters in /proc: the baseline RSS of the idle process
(started, leading, nothing to do), the RSS once the attachments were uploaded,
and the peak RSS while the campaign was sent (the peak is reset, through
``/proc/<pid>/clear_refs``, just before the start, so the upload's own peak is
not counted there; the peak of the whole run is printed too). Linux only. Usage:

    python bench/attachments_rss.py [--recipients 120] [--attachment-mib 10]
        [--attachments 2] [--batch-size 100] [--connections 8]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
from nats.aio.msg import Msg
from send_path import start_sink, wait_port

from mailer.config import env_name, load_settings
from mailer.db import migrate
from mailer.devrun import with_endpoints
from mailer.devstack import EmbeddedStack, StackOverrides, free_port

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "rss"


def memory(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak RSS) of a process, in bytes."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            values[key] = int(rest.split()[0]) * 1024
    return values


def reset_peak(pid: int) -> None:
    # "5" resets the peak resident set size (VmHWM) to the current RSS.
    Path(f"/proc/{pid}/clear_refs").write_text("5")


def mb(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipients", type=int, default=120)
    p.add_argument("--attachment-mib", type=float, default=10.0)
    p.add_argument("--attachments", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--connections", type=int, default=8)
    args = p.parse_args()

    port = free_port()
    sink, sink_name = start_sink(port)
    var = Path(tempfile.mkdtemp(prefix="mailer-rss-"))
    proc: asyncio.subprocess.Process | None = None
    try:
        await wait_port(port)
        overrides = StackOverrides(smtp_host="127.0.0.1", smtp_port=port)
        async with EmbeddedStack(var, overrides, fresh=True) as stack:
            settings = with_endpoints(load_settings({}, dotenv=None), stack.endpoints)
            await migrate(settings.database_url)
            values = {
                "nats_url": settings.nats_url,
                "database_url": settings.database_url,
                "redis_url": settings.redis_url,
                "smtp_host": "127.0.0.1",
                "smtp_port": str(port),
                "subject_prefix": PREFIX,
                "http_port": "0",
                "public_http_port": "0",
                "working_hours_start": "00:00",
                "working_hours_end": "24:00",
                "rate_per_hour": "10000000",
                "monthly_quota": "10000000",
                "batch_size": str(args.batch_size),
                "smtp_connections": str(args.connections),
                "log_level": "WARNING",
            }
            env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
            env.update({env_name(k): v for k, v in values.items()})
            env["PYTHONPATH"] = str(ROOT)
            log = (var / "mailer.log").open("wb")
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "mailer.cli", "run", env=env, stdout=log, stderr=log
            )
            result = await drive(proc.pid, args, settings.nats_url)
        print(f"sink: {sink_name}; mailer run pid {proc.pid}; log {var / 'mailer.log'}")
        print(
            f"campaign: {args.recipients} recipients, {args.attachments} x "
            f"{args.attachment_mib:g} MiB attachments, batch {args.batch_size}, "
            f"{args.connections} SMTP connections; sent in {result['took']:.1f} s"
        )
        print(f"baseline RSS (idle process, leading):    {mb(result['idle'])}")
        print(f"RSS after the attachments were uploaded: {mb(result['uploaded'])}")
        print(f"peak RSS while sending the campaign:     {mb(result['peak_sending'])}")
        print(f"peak RSS of the whole run:               {mb(result['peak_all'])}")
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        sink.terminate()
        sink.wait()
        shutil.rmtree(var, ignore_errors=True)


async def drive(pid: int, args: argparse.Namespace, nats_url: str) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()

    async def on_event(msg: Msg) -> None:
        event = msgspec.json.decode(msg.data)
        if event["event"] in ("sent", "completed_with_errors") and not done.done():
            done.set_result(event)

    async def call(subject: str, body: object, timeout: float = 60) -> dict[str, Any]:
        reply = await nc.request(
            f"{PREFIX}.{subject}",
            msgspec.json.encode(body),
            timeout=timeout,
            headers={"Mailer-User": "bench"},
        )
        result: dict[str, Any] = msgspec.json.decode(reply.data)
        if "error" in result:
            raise RuntimeError(f"{subject}: {result}")
        return result

    try:
        await nc.subscribe(f"{PREFIX}.events.campaign.>", cb=on_event)
        cid = await _create_when_up(call)
        await asyncio.sleep(3)  # let start-up settle (leader elected, pools filled)
        idle = memory(pid)["VmRSS"]
        size = int(args.attachment_mib * 1024 * 1024)
        for i in range(args.attachments):
            await call(
                "attachments.add",
                {
                    "campaign_id": cid,
                    "filename": f"report-{i}.pdf",
                    "content_type": "application/pdf",
                    "content": base64.b64encode(os.urandom(size)).decode(),
                },
            )
        people = [
            {"email": f"r{j}@example.org", "name": f"User {j}"} for j in range(args.recipients)
        ]
        await call("recipients.add", {"campaign_id": cid, "recipients": people})
        uploaded = memory(pid)["VmRSS"]
        peak_all = memory(pid)["VmHWM"]
        reset_peak(pid)
        began = time.perf_counter()
        await call("campaign.start", {"campaign_id": cid})
        event = await asyncio.wait_for(done, timeout=1800)
        took = time.perf_counter() - began
        if event["counts"] != {"sent": args.recipients}:
            raise RuntimeError(f"unexpected result {event}")
        after = memory(pid)
        return {
            "idle": idle,
            "uploaded": uploaded,
            "peak_sending": after["VmHWM"],
            "peak_all": max(peak_all, after["VmHWM"]),
            "took": took,
        }
    finally:
        await nc.close()


async def _create_when_up(call: Any) -> int:
    """Creates the campaign as soon as the process answers on NATS."""
    async with asyncio.timeout(60):
        while True:
            try:
                created = await call(
                    "campaign.create",
                    {
                        "name": "rss",
                        "subject": "Отчёт",
                        "body_text": "Здравствуйте, {{name}}! Отчёт во вложении.",
                        "body_html": "<p>Здравствуйте, {{name}}! Отчёт во вложении.</p>",
                    },
                    timeout=1,
                )
                return int(created["id"])
            except (TimeoutError, nats.errors.NoRespondersError):
                await asyncio.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(main())
