"""Which statements of a running campaign read whole tables, on a database with history.

Starts the embedded stack with PostgreSQL's ``auto_explain`` loaded, fills a database with
``--history`` recipients of finished campaigns and as many send-log rows (bench/suite.py's
``fill_history``), turns plan logging on for that database only, sends one campaign through
the real ``mailer run`` process, then reads the plans PostgreSQL logged and prints, for each
distinct statement, the scans it used on ``send_log`` and ``recipient``. A sequential scan of
either there is a statement whose cost grows with history. Usage::

    python bench/explain_history.py [--history 1000000] [--recipients 5000]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import tempfile
from collections import defaultdict
from pathlib import Path

import asyncpg  # type: ignore[import-untyped, unused-ignore]

from bench.suite import fill_history, run_campaign, start_mailer, start_sink, stop_mailer, wait_port
from mailer.db import migrate
from mailer.devstack import (
    PRODUCTION_LIKE_POSTGRES,
    EmbeddedStack,
    StackOverrides,
    create_database,
    free_port,
)

SCAN = re.compile(
    r"(Seq Scan|Index Scan|Index Only Scan|Bitmap Heap Scan) (?:using \S+ )?"
    r"on (send_log|recipient)\b"
)


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument("--recipients", type=int, default=5000)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="mailer-explain-"))
    port = free_port()
    sink = start_sink(port, work)
    pg = {
        **PRODUCTION_LIKE_POSTGRES,
        "shared_preload_libraries": "auto_explain",
        "auto_explain.log_min_duration": "-1",
        "auto_explain.log_nested_statements": "on",
    }
    try:
        await wait_port(port, sink.proc, sink.name)
        overrides = StackOverrides(smtp_host="127.0.0.1", smtp_port=port)
        async with EmbeddedStack(work, overrides, fresh=True, postgres_settings=pg) as stack:
            admin = stack.endpoints.database_url
            dsn = await create_database(admin, "bench_history")
            await migrate(dsn)
            took = await fill_history(dsn, args.history)
            print(f"history: {args.history:,} recipients + send-log rows in {took:.1f} s")
            conn = await asyncpg.connect(admin)
            try:
                await conn.execute(
                    "ALTER DATABASE bench_history SET auto_explain.log_min_duration = 0"
                )
            finally:
                await conn.close()
            m = await start_mailer(stack, dsn, port, 8, "explain", work)
            try:
                r = await run_campaign(stack, m, args.recipients)
            finally:
                stop_mailer(m)
            print(f"campaign of {args.recipients:,}: {r.msg_per_s:,.0f} msg/s")
        log = (work / "stack" / "pg" / "postgres.log").read_text(errors="replace")
    finally:
        sink.stop()
    shutil.rmtree(work, ignore_errors=True)

    # auto_explain's entries: "duration: X ms  plan:\n\tQuery Text: ...\n\t<plan lines>"
    scans: dict[str, set[str]] = defaultdict(set)
    slowest: dict[str, float] = defaultdict(float)
    for entry in re.split(r"\n(?=\S.*LOG:  duration: )", log):
        m_dur = re.search(r"duration: ([0-9.]+) ms\s+plan:", entry)
        m_q = re.search(r"Query Text: (.*)", entry)
        if not m_dur or not m_q:
            continue
        text = m_q.group(1).strip()
        key = text[:110]
        slowest[key] = max(slowest[key], float(m_dur.group(1)))
        for kind, table in SCAN.findall(entry):
            scans[key].add(f"{kind} on {table}")
    print(f"\n{'slowest ms':>10}  scans on send_log/recipient  statement")
    for key in sorted(slowest, key=lambda k: -slowest[k]):
        found = ", ".join(sorted(scans[key])) or "-"
        flag = "SEQ " if "Seq Scan" in found else "    "
        print(f"{flag}{slowest[key]:>8.2f}  {found:<60}  {key}")


if __name__ == "__main__":
    asyncio.run(main())
