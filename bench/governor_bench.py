"""The rate governor under load: single-token requests from 1, 8 and 32 requesters.

The real ``mailer run`` process (its governor answers ``<prefix>.internal.governor.tokens``)
on the embedded stack with the durable PostgreSQL of bench/suite.py, limits lifted so every
request is granted one token (each still runs the whole decision: working hours, the Redis
script, the monthly quota). The anchor, in the same run: a trivial nats-py responder in its
own process answering a fixed reply on its own subject — the ceiling of a Python NATS
request/reply service on this machine. The requesters run in separate processes (one for a
single requester, two otherwise) so that neither side shares an interpreter with the other.
Each point runs ``--seconds`` after a 1 s warm-up, ``--runs`` times; the load average is
printed with every figure. Usage::

    python -m bench.governor_bench [--runs 3] [--seconds 5] [--requesters 1,8,32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import nats

from bench.suite import proc_cpu_seconds, start_mailer, start_sink, stop_mailer, wait_port
from mailer.db import migrate
from mailer.devstack import (
    PRODUCTION_LIKE_POSTGRES,
    EmbeddedStack,
    StackOverrides,
    create_database,
    free_port,
)
from mailer.messages import TokenReply, TokenRequest

WARMUP_SECONDS = 1.0

_RESPONDER = """
import asyncio, sys, nats
async def main():
    nc = await nats.connect(sys.argv[1])
    async def cb(msg):
        await msg.respond(b'{"granted":1}')
    await nc.subscribe(sys.argv[2], queue="anchor", cb=cb)
    await nc.flush()
    print("ready", flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


@dataclass
class Point:
    rps: list[float] = field(default_factory=list)
    p50: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    loads: list[float] = field(default_factory=list)


def fmt(values: list[float], digits: int = 0) -> str:
    lo, med, hi = min(values), statistics.median(values), max(values)
    return " / ".join(f"{v:,.{digits}f}" for v in (lo, med, hi))


def spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdout=subprocess.PIPE)


# --- a requester process -------------------------------------------------------------------


async def requester_main(url: str, subject: str, n: int, start_at: float, seconds: float) -> None:
    """``n`` requesters on one connection; prints the measured latencies (s) as JSON."""
    nc = await nats.connect(url)
    payload = msgspec.json.encode(
        TokenRequest(campaign_id=1, owner_id="bench", want=1, kind="campaign")
    )
    decoder = msgspec.json.Decoder(TokenReply)
    latencies: list[float] = []
    refused = total = 0
    await asyncio.sleep(max(0.0, start_at - time.time()))
    measure_from = time.perf_counter() + WARMUP_SECONDS
    end = measure_from + seconds

    async def one() -> None:
        nonlocal refused, total
        while True:
            began = time.perf_counter()
            if began >= end:
                return
            reply = await nc.request(subject, payload, timeout=10)
            took = time.perf_counter() - began
            total += 1
            if decoder.decode(reply.data).granted != 1:
                refused += 1
            if began >= measure_from:
                latencies.append(took)

    await asyncio.gather(*(one() for _ in range(n)))
    await nc.close()
    sys.stdout.write(json.dumps({"latencies": latencies, "refused": refused, "total": total}))


async def load(
    url: str, subject: str, requesters: int, seconds: float, server_pid: int
) -> tuple[float, float, float, float, float]:
    """(requests/s, p50 ms, p99 ms, load average, the server's CPU µs a request) of
    ``requesters`` against ``subject``, whose server runs as ``server_pid``."""
    cpu_before = proc_cpu_seconds(server_pid)
    total = 0
    procs_n = 1 if requesters == 1 else 2
    start_at = time.time() + 1.0  # every process connected before the first request
    procs = [
        spawn(
            [
                sys.executable,
                "-m",
                "bench.governor_bench",
                "--worker",
                url,
                subject,
                str(requesters // procs_n + (1 if i < requesters % procs_n else 0)),
                str(start_at),
                str(seconds),
            ]
        )
        for i in range(procs_n)
    ]
    outs = await asyncio.gather(*(asyncio.to_thread(p.communicate) for p in procs))
    loadavg = os.getloadavg()[0]
    latencies: list[float] = []
    refused = 0
    for p, (out, _) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"requester exited {p.returncode}")
        data = json.loads(out)
        latencies += data["latencies"]
        refused += data["refused"]
        total += data["total"]
    cpu = (proc_cpu_seconds(server_pid) - cpu_before) / max(1, total) * 1e6
    if refused:
        raise RuntimeError(f"{refused} requests were not granted one token")
    latencies.sort()
    p50 = latencies[len(latencies) // 2] * 1000
    p99 = latencies[int(len(latencies) * 0.99)] * 1000
    return len(latencies) / seconds, p50, p99, loadavg, cpu


# --- the bench -----------------------------------------------------------------------------


async def measure(
    stack: EmbeddedStack,
    sink_port: int,
    work: Path,
    *,
    runs: int,
    seconds: float,
    requesters: list[int],
) -> tuple[dict[int, Point], dict[int, Point]]:
    """(governor, anchor) points by requester count, measured alternately in one run."""
    url = stack.endpoints.nats_url
    dsn = await create_database(stack.endpoints.database_url, "bench_governor")
    await migrate(dsn)
    m = await start_mailer(stack, dsn, sink_port, 8, "govbench", work)
    anchor_subject = "bench.anchor.tokens"
    anchor = spawn([sys.executable, "-c", _RESPONDER, url, anchor_subject])
    governor: dict[int, Point] = {n: Point() for n in requesters}
    trivial: dict[int, Point] = {n: Point() for n in requesters}
    try:
        assert anchor.stdout is not None
        if (await asyncio.to_thread(anchor.stdout.readline)).strip() != b"ready":
            raise RuntimeError("the anchor responder did not start")
        gov_subject = f"{m.prefix}.internal.governor.tokens"
        # What the process spends with no request at all (its other actors, timers).
        idle_from = proc_cpu_seconds(m.proc.pid)
        await asyncio.sleep(3)
        idle = (proc_cpu_seconds(m.proc.pid) - idle_from) / 3 * 100
        print(f"mailer run idle: {idle:.1f} % of a core (load {os.getloadavg()[0]:.2f})")
        for run in range(1, runs + 1):
            for n in requesters:
                for label, subject, points, pid in (
                    ("governor", gov_subject, governor, m.proc.pid),
                    ("anchor  ", anchor_subject, trivial, anchor.pid),
                ):
                    rps, p50, p99, la, cpu = await load(url, subject, n, seconds, pid)
                    pt = points[n]
                    pt.rps.append(rps)
                    pt.p50.append(p50)
                    pt.p99.append(p99)
                    pt.cpu.append(cpu)
                    pt.loads.append(la)
                    print(
                        f"run {run} {label} {n:>2} requesters: {rps:>8,.0f} req/s  "
                        f"p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  server CPU {cpu:4.0f} µs/req  "
                        f"(load {la:.2f})",
                        flush=True,
                    )
    finally:
        anchor.terminate()
        anchor.wait()
        stop_mailer(m)
    return governor, trivial


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--requesters", default="1,8,32")
    p.add_argument("--keep", action="store_true", help="keep the work dir (the mailer log)")
    args = p.parse_args()
    requesters = [int(x) for x in args.requesters.split(",")]
    work = Path(tempfile.mkdtemp(prefix="mailer-govbench-"))
    port = free_port()
    sink = start_sink(port, work)
    try:
        await wait_port(port, sink.proc, sink.name)
        overrides = StackOverrides(smtp_host="127.0.0.1", smtp_port=port)
        async with EmbeddedStack(
            work, overrides, fresh=True, postgres_settings=PRODUCTION_LIKE_POSTGRES
        ) as stack:
            governor, trivial = await measure(
                stack, port, work, runs=args.runs, seconds=args.seconds, requesters=requesters
            )
    finally:
        sink.stop()
    if args.keep:
        print(f"work dir kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"single-token requests, {args.runs} runs of {args.seconds:.0f} s; "
        "mailer run with PostgreSQL fsync=on; min / median / max"
    )
    print(
        "| requesters | governor req/s | p50 ms | p99 ms | CPU µs/req | "
        "trivial responder req/s | p99 ms | CPU µs/req | ratio req/s (per run) | load |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for n in requesters:
        g, t = governor[n], trivial[n]
        ratios = [a / b for a, b in zip(g.rps, t.rps, strict=True)]
        print(
            f"| {n} | {fmt(g.rps)} | {fmt(g.p50, 2)} | {fmt(g.p99, 2)} | {fmt(g.cpu)} | "
            f"{fmt(t.rps)} | {fmt(t.p99, 2)} | {fmt(t.cpu)} | {fmt(ratios, 2)} | "
            f"{fmt(g.loads + t.loads, 2)} |"
        )
    print("target: ≥ 20 000 req/s with 32 requesters, p99 ≤ 2 ms")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        url, subject, n, start_at, seconds = sys.argv[2:7]
        asyncio.run(requester_main(url, subject, int(n), float(start_at), float(seconds)))
    else:
        asyncio.run(main())
