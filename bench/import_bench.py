"""Bulk ingest end to end: ``MailerClient.import_recipients`` of a 1 000 000-line CSV.

The real ``mailer run`` process, the durable PostgreSQL of bench/suite.py; the clock runs from
the start of the upload to the reply (upload to the Object Store, streaming, checks, COPY,
INSERT, commit). Each run imports into a new campaign of a fresh database. ``--with-add``
also times the same list through ``recipients.add`` calls of 5000 (the anchor). Usage::

    python bench/import_bench.py [--recipients 1000000] [--runs 3] [--with-add]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.suite import start_mailer, start_sink, stop_mailer, wait_port
from mailer.client import ClientOptions, MailerClient
from mailer.db import migrate
from mailer.devstack import (
    PRODUCTION_LIKE_POSTGRES,
    EmbeddedStack,
    StackOverrides,
    create_database,
    free_port,
)


def write_csv(path: Path, n: int) -> None:
    with path.open("w", encoding="utf-8") as f:
        f.write("email,name,city\n")
        for i in range(n):
            f.write(f"user{i}@example{i % 997}.org,User {i},City {i % 100}\n")


async def measure_import(
    stack: EmbeddedStack,
    port: int,
    work: Path,
    *,
    n: int,
    runs: int,
    with_add: bool = False,
) -> tuple[list[float], list[float], list[float]]:
    """``runs`` imports of an ``n``-line CSV, each into a new campaign of a fresh database
    served by its own ``mailer run``; the seconds each took, the ``recipients.add`` anchor's
    (``with_add``) and the load average at each start. Used by bench/suite.py too."""
    csv_path = work / "list.csv"
    write_csv(csv_path, n)
    size_mb = csv_path.stat().st_size / 1e6
    took: list[float] = []
    added_took: list[float] = []
    loads: list[float] = []
    for run in range(1, runs + 1):
        dsn = await create_database(stack.endpoints.database_url, f"bench_import{run}")
        await migrate(dsn)
        m = await start_mailer(stack, dsn, port, 8, f"import{run}", work)
        try:
            options = ClientOptions(url=stack.endpoints.nats_url, prefix=m.prefix)
            async with await MailerClient.connect(options, user="bench") as client:
                view = await client.create_campaign("import", "s", body_text="t")
                loads.append(os.getloadavg()[0])
                began = time.perf_counter()
                result = await client.import_recipients(view.id, csv_path)
                took.append(time.perf_counter() - began)
                if result.added != n:
                    raise RuntimeError(f"added {result.added} of {n}: {result}")
                print(
                    f"  recipients.import of {n:,} lines ({size_mb:.0f} MB): "
                    f"{took[-1]:.1f} s (load {loads[-1]:.2f})",
                    flush=True,
                )
                if with_add:
                    other = await client.create_campaign("add", "s", body_text="t")
                    people = [
                        {"email": f"user{i}@example{i % 997}.org", "name": f"User {i}"}
                        for i in range(n)
                    ]
                    began = time.perf_counter()
                    for i in range(0, n, 5000):
                        await client.add_recipients(other.id, people[i : i + 5000])
                    added_took.append(time.perf_counter() - began)
                    print(f"  recipients.add x5000: {added_took[-1]:.1f} s", flush=True)
        finally:
            stop_mailer(m)
        # The service's own breakdown (download, read and COPY, INSERT, total).
        for line in m.log.read_text().splitlines():
            if "recipients imported" in line:
                print(f"  {line}", flush=True)
    csv_path.unlink()
    return took, added_took, loads


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipients", type=int, default=1_000_000)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--with-add", action="store_true")
    args = p.parse_args()
    os.environ["BENCH_MAILER_LOG_LEVEL"] = "INFO"  # the service's "recipients imported" line
    n = args.recipients
    work = Path(tempfile.mkdtemp(prefix="mailer-import-"))
    port = free_port()
    sink = start_sink(port, work)
    try:
        await wait_port(port, sink.proc, sink.name)
        overrides = StackOverrides(smtp_host="127.0.0.1", smtp_port=port)
        async with EmbeddedStack(
            work, overrides, fresh=True, postgres_settings=PRODUCTION_LIKE_POSTGRES
        ) as stack:
            took, added_took, loads = await measure_import(
                stack, port, work, n=n, runs=args.runs, with_add=args.with_add
            )
    finally:
        sink.stop()
    shutil.rmtree(work, ignore_errors=True)
    print()
    print(
        f"{n:,} recipients, {args.runs} runs, PostgreSQL fsync=on; "
        f"load average (1 min) at the start: "
        + " / ".join(f"{x:.2f}" for x in (min(loads), statistics.median(loads), max(loads)))
    )
    fmt = " / ".join(f"{x:.1f}" for x in (min(took), statistics.median(took), max(took)))
    print(f"recipients.import end to end, s (min / median / max): {fmt}   target ≤ 10 s")
    if added_took:
        a = added_took
        fmt = " / ".join(f"{x:.1f}" for x in (min(a), statistics.median(a), max(a)))
        print(f"recipients.add in calls of 5000, s (min / median / max): {fmt}")


if __name__ == "__main__":
    asyncio.run(main())
