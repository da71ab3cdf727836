"""The benchmark users can trust: ``make bench``.

What it runs, every figure beside its anchor in the same run:

* the SMTP sink is Postfix's C ``smtp-sink`` (``apt-get install postfix``; as root it runs
  as ``nobody``), else aiosmtpd's Sink in a separate process -- the sink must not share a
  CPU-bound interpreter with what it measures;
* PostgreSQL is the embedded stack's server with production durability
  (``mailer.devstack.PRODUCTION_LIKE_POSTGRES``: fsync, synchronous_commit and
  full_page_writes on, 1 GB shared_buffers);
* mailer is the real ``mailer run`` command in its own process, with its defaults except the
  limits that would stop a benchmark (rate, quota, campaign size, working hours);
* the anchor is bare aiosmtplib sending pre-rendered bytes over the same number of
  connections to the same sink (no database, no NATS): the ceiling of a Python client;
* "with history": the same campaign on a database that already holds 1 000 000 send-log
  rows and 1 000 000 recipients of finished campaigns, against a fresh one;
* scale-out: the same campaign sent by 1 and by 2 ``mailer run`` processes (shards on,
  ``MAILER_SHARD_MIN_RECIPIENTS=1000``): msg/s, messages per mailer CPU-second (the
  processes' user + system time summed) and each process's share (its
  ``mailer_emails_sent_total``); beside it, 2 processes sending two campaigns of half the
  recipients with shards off (each process a whole campaign): the cost of a second
  process without any shard.

Each comparison runs ``--runs`` times (3); the table gives min / median / max and the
1-minute load average seen at the start of each run (the machine is shared: a high load
means the figures are low). Usage::

    python bench/suite.py [--recipients 20000] [--connections 8] [--runs 3] [--history 1000000]
                          [--only scaleout]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosmtplib
import asyncpg  # type: ignore[import-untyped, unused-ignore]
import msgspec
import nats

from mailer.client.discovery import ping
from mailer.db import migrate
from mailer.devstack import (
    PRODUCTION_LIKE_POSTGRES,
    EmbeddedStack,
    StackOverrides,
    create_database,
    free_port,
)
from mailer.render import MessageTemplate

if __package__ in (None, ""):
    # Run as `python bench/suite.py`: the rows it borrows from bench.governor_bench and
    # bench.import_bench are imported as bench.*, which needs the project's root.
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

HERE = Path(__file__).resolve().parent
TICKS = os.sysconf("SC_CLK_TCK")


# --- the sink ---------------------------------------------------------------------------


@dataclass
class Sink:
    name: str
    proc: subprocess.Popen[bytes]
    stderr_path: Path

    def stop(self) -> str:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return self.stderr_path.read_text(errors="replace").strip()


def start_sink(port: int, work: Path) -> Sink:
    err = work / "sink.stderr"
    postfix_sink = shutil.which("smtp-sink") or (
        "/usr/sbin/smtp-sink" if Path("/usr/sbin/smtp-sink").exists() else None
    )
    if postfix_sink:
        # -c: counters on stdout; 1000: listen backlog. As root it must drop privileges
        # (it refuses to run as root without -u).
        cmd = [postfix_sink, "-c", f"127.0.0.1:{port}", "1000"]
        if os.geteuid() == 0:
            cmd[1:1] = ["-u", "nobody"]
        name = "postfix smtp-sink"
    else:
        cmd = [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"127.0.0.1:{port}"]
        cmd += ["-c", "aiosmtpd.handlers.Sink"]
        name = "aiosmtpd Sink (separate process)"
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=err.open("wb"))
    return Sink(name, proc, err)


async def wait_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    for _ in range(200):
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError(f"{what} did not open port {port}")


# --- the anchor: bare aiosmtplib -------------------------------------------------------------


def prerender(n: int) -> list[bytes]:
    template = MessageTemplate(
        from_email="crm@example.com",
        from_name="CRM",
        subject="Bench",
        text="Здравствуйте, {{name}}!",
        html="<p>Здравствуйте, {{name}}!</p>",
        message_id_domain="example.com",
    )
    now = datetime.now(UTC)
    return [
        template.render(
            to_email=f"u{i}@example.org",
            to_name=f"User {i}",
            variables={},
            message_id=f"<b{i}@example.com>",
            date=now,
            unsubscribe_url="http://localhost/u/x",
        )
        for i in range(n)
    ]


async def bare_aiosmtplib(port: int, data: list[bytes], connections: int) -> tuple[float, float]:
    """msg/s and CPU ms per message of this process sending pre-rendered bytes."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(data)):
        queue.put_nowait(i)

    async def worker() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, start_tls=False)
        await smtp.connect()
        while not queue.empty():
            i = queue.get_nowait()
            await smtp.sendmail("crm@example.com", [f"u{i}@example.org"], data[i])
        await smtp.quit()

    cpu0 = time.process_time()
    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    took = time.perf_counter() - began
    return len(data) / took, (time.process_time() - cpu0) * 1000 / len(data)


# --- mailer: the real `mailer run` process ------------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def tree_cpu_seconds() -> dict[str, float]:
    """CPU seconds (user + system, the exited children's included) of this bench's
    descendant processes by command name: the stack's servers, the sink, mailer."""
    parent: dict[int, int] = {}
    stat: dict[int, tuple[str, float]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            text = (d / "stat").read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        f = text.rsplit(")", 1)[1].split()
        parent[int(d.name)] = int(f[1])
        stat[int(d.name)] = (name, sum(int(x) for x in f[11:15]) / TICKS)
    me, out = os.getpid(), {}
    for pid, (name, cpu) in stat.items():
        p = pid
        while p > 1 and p != me:
            p = parent.get(p, 1)
        if p == me:
            # postgres backends rename themselves; one bucket for the server.
            key = "postgres" if name.startswith("postgres") else name
            out[key] = out.get(key, 0.0) + cpu
    return out


@dataclass
class Mailer:
    proc: subprocess.Popen[bytes]
    prefix: str
    log: Path
    http_port: int = 0


async def start_mailer(
    stack: EmbeddedStack,
    dsn: str,
    port: int,
    connections: int,
    prefix: str,
    work: Path,
    *,
    instance: str = "",
    processes: int = 1,
    extra: dict[str, str] | None = None,
) -> Mailer:
    """One ``mailer run``; returns once ``processes`` of ``prefix`` answer discovery
    pings (the last of several started on one prefix waits for all of them)."""
    ep = stack.endpoints
    instance = instance or prefix
    http_port = free_port()
    env = {
        **os.environ,
        "MAILER_NATS_URL": ep.nats_url,
        "MAILER_DATABASE_URL": dsn,
        "MAILER_REDIS_URL": ep.redis_url,
        "MAILER_SMTP_HOST": "127.0.0.1",
        "MAILER_SMTP_PORT": str(port),
        "MAILER_SMTP_CONNECTIONS": str(connections),
        "MAILER_SUBJECT_PREFIX": prefix,
        "MAILER_REDIS_KEY_PREFIX": f"{prefix}:",
        "MAILER_INSTANCE_ID": instance,
        "MAILER_HTTP_PORT": str(http_port),
        "MAILER_PUBLIC_HTTP_PORT": "0",
        # The limits that would make this a test of the limits, lifted; the rest defaults.
        "MAILER_RATE_PER_HOUR": "1000000000",
        "MAILER_MONTHLY_QUOTA": "1000000000",
        "MAILER_MAX_CAMPAIGN_RECIPIENTS": "10000000",
        "MAILER_WORKING_HOURS_START": "00:00",
        "MAILER_WORKING_HOURS_END": "24:00",
        # A bench that reads the service's own log lines raises it (import_bench: INFO).
        "MAILER_LOG_LEVEL": os.environ.get("BENCH_MAILER_LOG_LEVEL", "WARNING"),
        "MAILER_VAR_DIR": str(work / f"var-{instance}"),
        **(extra or {}),
    }
    log = work / f"{instance}.log"
    proc = spawn_mailer_run(env, log, work)
    nc = await nats.connect(ep.nats_url)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(
                    f"mailer run exited {proc.returncode}: {log.read_text()[-3000:]}"
                )
            answered = [i for i in await ping(nc, wait=0.1) if i.subject_prefix == prefix]
            if len(answered) >= processes:
                break
        else:
            raise RuntimeError("mailer run did not answer discovery pings")
    finally:
        await nc.close()
    return Mailer(proc, prefix, log, http_port)


def spawn_mailer_run(env: dict[str, str], log: Path, work: Path) -> subprocess.Popen[bytes]:
    mailer = shutil.which("mailer", path=str(Path(sys.executable).parent)) or "mailer"
    return subprocess.Popen(
        [mailer, "run"], env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, cwd=work
    )


def stop_mailer(m: Mailer) -> None:
    m.proc.terminate()
    try:
        m.proc.wait(30)
    except subprocess.TimeoutExpired:
        m.proc.kill()
        m.proc.wait()


@dataclass
class CampaignRun:
    msg_per_s: float
    cpu_ms_per_msg: float
    add_per_s: float


async def run_campaign(
    stack: EmbeddedStack,
    m: Mailer,
    n: int,
    others: tuple[Mailer, ...] = (),
    *,
    campaigns: int = 1,
) -> CampaignRun:
    """``n`` recipients through ``m``'s prefix, in ``campaigns`` campaigns started
    together (n split evenly); the CPU is that of ``m`` and ``others``."""
    pids = [m.proc.pid] + [o.proc.pid for o in others]
    nc = await nats.connect(stack.endpoints.nats_url)
    done: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
    finals: dict[int, dict[str, Any]] = {}

    async def on_event(msg: Any) -> None:
        event = msgspec.json.decode(msg.data)
        if event.get("event") in ("sent", "completed_with_errors"):
            finals[int(event["campaign_id"])] = event
            if len(finals) >= campaigns and not done.done():
                # One event with the campaigns' counts summed.
                counts: dict[str, int] = {}
                for e in finals.values():
                    for k, v in (e.get("counts") or {}).items():
                        counts[k] = counts.get(k, 0) + v
                done.set_result({"counts": counts})

    async def call(subject: str, body: object) -> dict[str, Any]:
        reply = await nc.request(
            f"{m.prefix}.{subject}",
            msgspec.json.encode(body),
            timeout=120,
            headers={"Mailer-User": "bench"},
        )
        result: dict[str, Any] = msgspec.json.decode(reply.data)
        if "error" in result and isinstance(result["error"], dict):
            raise RuntimeError(f"{subject}: {result}")
        return result

    try:
        await nc.subscribe(f"{m.prefix}.events.campaign.>", cb=on_event)
        ids: list[int] = []
        added = time.perf_counter()
        per = n // campaigns
        for c in range(campaigns):
            created = await call(
                "campaign.create",
                {
                    "name": f"bench {c}",
                    "subject": "Bench",
                    "body_text": "Здравствуйте, {{name}}!",
                    "body_html": "<p>Здравствуйте, {{name}}!</p>",
                },
            )
            ids.append(created["id"])
            first, last = c * per, n if c == campaigns - 1 else (c + 1) * per
            for i in range(first, last, 5000):
                people = [
                    {"email": f"r{j}@example.org", "name": f"User {j}"}
                    for j in range(i, min(last, i + 5000))
                ]
                await call("recipients.add", {"campaign_id": ids[-1], "recipients": people})
        add_per_s = n / (time.perf_counter() - added)
        cpu0 = sum(proc_cpu_seconds(pid) for pid in pids)
        began = time.perf_counter()
        for cid in ids:
            await call("campaign.start", {"campaign_id": cid})
        event = await asyncio.wait_for(done, timeout=900)
        took = time.perf_counter() - began
        cpu = sum(proc_cpu_seconds(pid) for pid in pids) - cpu0
        if event.get("counts") != {"sent": n}:
            raise RuntimeError(f"unexpected result {event}")
        return CampaignRun(n / took, cpu * 1000 / n, add_per_s)
    finally:
        await nc.close()


# --- scale-out: one campaign, 1 vs 2 processes ------------------------------------------------

SHARD_MIN = "1000"


def sent_by(m: Mailer) -> float:
    """The process's ``mailer_emails_sent_total{kind="campaign"}`` (its /metrics)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{m.http_port}/metrics", timeout=10) as r:
        text = r.read().decode()
    for line in text.splitlines():
        if line.startswith('mailer_emails_sent_total{kind="campaign"}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class ScaleRun:
    msg_per_s: float
    msg_per_cpu_s: float
    shares: list[float]
    # CPU seconds per 1 000 messages of each kind of process during the campaign.
    cpu_per_1000: dict[str, float]


async def scaleout_run(
    stack: EmbeddedStack,
    admin: str,
    port: int,
    conns: int,
    n: int,
    processes: int,
    run: int,
    work: Path,
    *,
    campaigns: int = 1,
) -> ScaleRun:
    """The campaign on a fresh database, sent by ``processes`` ``mailer run`` processes
    with shards on; ``campaigns`` > 1: n split into that many campaigns run at once, shards
    off (each process sends whole campaigns: the cost of a second process without shards)."""
    dsn = await create_database(admin, f"bench_scale{processes}_{campaigns}_{run}")
    await migrate(dsn)
    prefix = f"benchs{processes}x{campaigns}x{run}"
    extra = {"MAILER_SHARD_MIN_RECIPIENTS": SHARD_MIN if campaigns == 1 else "0"}
    if campaigns > 1:
        extra["MAILER_MAX_ACTIVE_CAMPAIGNS"] = str(campaigns)
    started: list[Mailer] = []
    try:
        for i in range(processes):
            started.append(
                await start_mailer(
                    stack,
                    dsn,
                    port,
                    conns,
                    prefix,
                    work,
                    instance=f"{prefix}-{i}",
                    processes=i + 1,
                    extra=extra,
                )
            )
        before = tree_cpu_seconds()
        r = await run_campaign(stack, started[0], n, tuple(started[1:]), campaigns=campaigns)
        after = tree_cpu_seconds()
        sent = [await asyncio.to_thread(sent_by, m) for m in started]
    finally:
        for m in started:
            stop_mailer(m)
    cpu_s = r.cpu_ms_per_msg * n / 1000
    used = {k: (v - before.get(k, 0.0)) * 1000 / n for k, v in after.items()}
    return ScaleRun(
        r.msg_per_s, n / cpu_s, [x / n for x in sent], {k: v for k, v in used.items() if v > 0}
    )


# --- anchor: django-post-office in a throwaway venv --------------------------------------------


def post_office_python(venv: Path) -> tuple[str | None, str]:
    """The throwaway venv's python with Django + django-post-office + psycopg (created and
    installed from the package index on first use), or None and why not."""
    python = venv / "bin" / "python"
    if not python.exists():
        made = subprocess.run(
            [sys.executable, "-m", "venv", str(venv)], check=False, capture_output=True, text=True
        )
        if made.returncode:
            return None, f"venv failed: {made.stderr[-300:]}"
    check = subprocess.run(
        [str(python), "-c", "import post_office, psycopg"], check=False, capture_output=True
    )
    if check.returncode:
        got = subprocess.run(
            [
                str(python),
                "-m",
                "pip",
                "install",
                "-q",
                "django",
                "django-post-office",
                "psycopg[binary]",
            ],
            check=False,
            capture_output=True,
            text=True,
        )
        if got.returncode:
            return None, f"pip install failed: {got.stderr[-300:]}"
    return str(python), ""


def post_office_run(python: str, dsn: str, port: int, n: int) -> float:
    out = subprocess.run(
        [python, str(HERE / "post_office_anchor.py"), dsn, str(port), str(n)],
        check=False,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if out.returncode:
        raise RuntimeError(f"post_office_anchor failed: {out.stderr[-2000:]}")
    result = msgspec.json.decode(out.stdout.strip().splitlines()[-1])
    if result["sent"] != n:
        raise RuntimeError(f"post_office sent {result['sent']} of {n}")
    return float(result["msg_per_s"])


# --- history: a database that has sent a million messages before ---------------------------


async def fill_history(dsn: str, rows: int) -> float:
    """``rows`` recipients in finished campaigns of 100 000 and their send-log rows, spread
    over the last 90 days (older than this month's quota window where possible)."""
    began = time.perf_counter()
    conn = await asyncpg.connect(dsn)
    try:
        per = 100_000
        for c in range(0, rows, per):
            count = min(per, rows - c)
            cid = await conn.fetchval(
                """INSERT INTO campaign (owner_id, name, subject, body_text, body_html, status,
                                         created_at, updated_at, finished_at)
                   VALUES ('history', 'history', 's', 't', '', 'sent',
                           now() - interval '90 days', now() - interval '60 days',
                           now() - interval '60 days')
                   RETURNING id"""
            )
            await conn.execute(
                """INSERT INTO recipient (campaign_id, email, name, status, sent_at,
                                          created_at, updated_at)
                   SELECT $1::bigint, 'h' || $1::bigint || '-' || g || '@example.org', 'H', 'sent',
                          now() - interval '60 days', now() - interval '90 days',
                          now() - interval '60 days'
                   FROM generate_series(1, $2) g""",
                cid,
                count,
            )
            await conn.execute(
                """INSERT INTO send_log (campaign_id, recipient_id, email, is_test, status,
                                         smtp_message_id, provider_answer, took_ms, created_at)
                   SELECT campaign_id, id, email, false, 'sent', '<x@example.com>', '250 ok',
                          1.0, now() - interval '60 days' - (id % 30) * interval '1 day'
                   FROM recipient WHERE campaign_id = $1""",
                cid,
            )
        await conn.execute("VACUUM ANALYZE")
    finally:
        await conn.close()
    return time.perf_counter() - began


# --- the table ------------------------------------------------------------------------------


@dataclass
class Series:
    values: list[float] = field(default_factory=list)

    def add(self, v: float) -> None:
        self.values.append(v)

    def fmt(self, digits: int = 0) -> str:
        if not self.values:
            return "—"
        lo, med, hi = min(self.values), statistics.median(self.values), max(self.values)
        return " / ".join(f"{v:,.{digits}f}" for v in (lo, med, hi))

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


async def timed_run(label: str, loads: list[float], run: Awaitable[Any]) -> Any:
    loads.append(os.getloadavg()[0])
    print(f"  {label} (load {loads[-1]:.2f}) ...", flush=True)
    return await run


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--recipients", type=int, default=20_000)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--history", type=int, default=1_000_000)
    p.add_argument(
        "--governor-seconds",
        type=float,
        default=5.0,
        help="each governor point (bench/governor_bench.py, 32 requesters); 0 skips it",
    )
    p.add_argument(
        "--import-recipients",
        type=int,
        default=1_000_000,
        help="lines of the recipients.import run (bench/import_bench.py); 0 skips it",
    )
    p.add_argument(
        "--post-office-venv",
        default=str(Path(tempfile.gettempdir()) / "mailer-bench-post-office"),
        help="throwaway venv for django-post-office ('' skips that anchor)",
    )
    p.add_argument(
        "--only",
        choices=("all", "scaleout", "send"),
        default="all",
        help="scaleout: only the 1 vs 2 processes comparison (and its table rows); "
        "send: only the send path against bare aiosmtplib",
    )
    args = p.parse_args()
    n, conns = args.recipients, args.connections
    only_scaleout = args.only == "scaleout"
    only_send = args.only == "send"
    if only_scaleout or only_send:
        args.history, args.governor_seconds, args.post_office_venv = 0, 0.0, ""
        args.import_recipients = 0

    work = Path(tempfile.mkdtemp(prefix="mailer-bench-"))
    port = free_port()
    sink = start_sink(port, work)
    series: dict[str, Series] = {
        k: Series()
        for k in (
            "bare",
            "bare_cpu",
            "mailer",
            "mailer_cpu",
            "ratio",
            "history",
            "history_ratio",
            "add",
            "post_office",
            "po_ratio",
            "governor",
            "governor_p99",
            "trivial",
            "governor_ratio",
            "import",
            "scale1",
            "scale2",
            "scale1_cpu",
            "scale2_cpu",
            "scale_cpu_ratio",
            "scale_rate_ratio",
            "share_min",
            "halves_cpu",
            "halves_cpu_ratio",
        )
    }
    shares: list[list[float]] = []
    loads: list[float] = []
    try:
        await wait_port(port, sink.proc, sink.name)
        print(f"sink: {sink.name} (pid {sink.proc.pid}); work dir {work}", flush=True)
        overrides = StackOverrides(smtp_host="127.0.0.1", smtp_port=port)
        async with EmbeddedStack(
            work, overrides, fresh=True, postgres_settings=PRODUCTION_LIKE_POSTGRES
        ) as stack:
            admin = stack.endpoints.database_url
            data = prerender(n)
            po_python, po_why = (
                await asyncio.to_thread(post_office_python, Path(args.post_office_venv))
                if args.post_office_venv
                else (None, "skipped (--post-office-venv '')")
            )
            history_dsn = ""
            if args.history:
                history_dsn = await create_database(admin, "bench_history")
                await migrate(history_dsn)
                took = await fill_history(history_dsn, args.history)
                print(f"history: {args.history:,} recipients + send-log rows in {took:.1f} s")
            for run in range(1, (0 if only_scaleout else args.runs) + 1):
                print(f"run {run}/{args.runs}", flush=True)
                rate, cpu = await timed_run(
                    "bare aiosmtplib", loads, bare_aiosmtplib(port, data, conns)
                )
                series["bare"].add(rate)
                series["bare_cpu"].add(cpu)

                dsn = await create_database(admin, f"bench_run{run}")
                await migrate(dsn)
                m = await start_mailer(stack, dsn, port, conns, f"bench{run}", work)
                try:
                    r = await timed_run("mailer", loads, run_campaign(stack, m, n))
                finally:
                    stop_mailer(m)
                series["mailer"].add(r.msg_per_s)
                series["mailer_cpu"].add(r.cpu_ms_per_msg)
                series["add"].add(r.add_per_s)
                series["ratio"].add(r.msg_per_s / rate)

                if history_dsn:
                    m = await start_mailer(stack, history_dsn, port, conns, f"benchh{run}", work)
                    try:
                        h = await timed_run("mailer with history", loads, run_campaign(stack, m, n))
                    finally:
                        stop_mailer(m)
                    series["history"].add(h.msg_per_s)
                    series["history_ratio"].add(h.msg_per_s / r.msg_per_s)
                if po_python:
                    po_dsn = await create_database(admin, f"bench_po{run}")
                    po = await timed_run(
                        "django-post-office",
                        loads,
                        asyncio.to_thread(post_office_run, po_python, po_dsn, port, n),
                    )
                    series["post_office"].add(po)
                    series["po_ratio"].add(r.msg_per_s / po)
                print(
                    f"  bare {rate:,.0f} msg/s; mailer {r.msg_per_s:,.0f} msg/s"
                    + (f"; with history {h.msg_per_s:,.0f} msg/s" if history_dsn else ""),
                    flush=True,
                )
            for run in range(1, (0 if only_send else args.runs) + 1):
                print(f"scale-out run {run}/{args.runs}", flush=True)
                one = await timed_run(
                    "1 mailer run process",
                    loads,
                    scaleout_run(stack, admin, port, conns, n, 1, run, work),
                )
                two = await timed_run(
                    "2 mailer run processes",
                    loads,
                    scaleout_run(stack, admin, port, conns, n, 2, run, work),
                )
                halves = await timed_run(
                    "2 mailer run processes, 2 campaigns of half, no shards",
                    loads,
                    scaleout_run(stack, admin, port, conns, n, 2, run, work, campaigns=2),
                )
                s_ = series
                s_["scale1"].add(one.msg_per_s)
                s_["scale2"].add(two.msg_per_s)
                s_["scale1_cpu"].add(one.msg_per_cpu_s)
                s_["scale2_cpu"].add(two.msg_per_cpu_s)
                s_["scale_cpu_ratio"].add(two.msg_per_cpu_s / one.msg_per_cpu_s)
                s_["scale_rate_ratio"].add(two.msg_per_s / one.msg_per_s)
                s_["share_min"].add(min(two.shares) * 100)
                s_["halves_cpu"].add(halves.msg_per_cpu_s)
                s_["halves_cpu_ratio"].add(halves.msg_per_cpu_s / one.msg_per_cpu_s)
                shares.append(two.shares)
                print(
                    f"  1 process {one.msg_per_s:,.0f} msg/s, {one.msg_per_cpu_s:,.0f} msg/CPU-s; "
                    f"2 processes {two.msg_per_s:,.0f} msg/s, {two.msg_per_cpu_s:,.0f} msg/CPU-s, "
                    "shares "
                    + " / ".join(f"{x:.1%}" for x in two.shares)
                    + f"; 2 processes, 2 campaigns, no shards {halves.msg_per_s:,.0f} msg/s, "
                    f"{halves.msg_per_cpu_s:,.0f} msg/CPU-s",
                    flush=True,
                )
                cores = os.cpu_count() or 1
                for label, x in (
                    ("1 process", one),
                    ("2 processes", two),
                    ("2 processes, 2 campaigns, no shards", halves),
                ):
                    total = sum(x.cpu_per_1000.values())
                    pg = x.cpu_per_1000.get("postgres", 0.0)
                    print(
                        f"  CPU s per 1 000 messages, {label}: "
                        + ", ".join(
                            f"{k} {v:.3f}"
                            for k, v in sorted(x.cpu_per_1000.items(), key=lambda kv: -kv[1])
                        )
                        + f"; all {total:.3f}: {cores} cores are busy at "
                        f"{cores * 1000 / total:,.0f} msg/s; one PostgreSQL core at "
                        f"{1000 / pg if pg else float('nan'):,.0f} msg/s",
                        flush=True,
                    )
            if args.governor_seconds > 0:
                # Imported here: bench.governor_bench builds on this module.
                from bench.governor_bench import measure as measure_governor

                print("concurrent governor, 32 requesters", flush=True)
                gov, trivial = await measure_governor(
                    stack,
                    port,
                    work,
                    runs=args.runs,
                    seconds=args.governor_seconds,
                    requesters=[32],
                )
                for i, g in enumerate(gov[32].rps):
                    series["governor"].add(g)
                    series["governor_p99"].add(gov[32].p99[i])
                    series["trivial"].add(trivial[32].rps[i])
                    series["governor_ratio"].add(g / trivial[32].rps[i])
                    loads.append(gov[32].loads[i])
            if args.import_recipients > 0:
                # Imported here: bench.import_bench builds on this module.
                from bench.import_bench import measure_import

                print(f"recipients.import of {args.import_recipients:,} lines", flush=True)
                os.environ["BENCH_MAILER_LOG_LEVEL"] = "INFO"  # its "recipients imported" line
                took, _, import_loads = await measure_import(
                    stack, port, work, n=args.import_recipients, runs=args.runs
                )
                for t in took:
                    series["import"].add(t)
                loads += import_loads
    finally:
        err = sink.stop()
        if err:
            print(f"sink stderr: {err[-2000:]}")
    shutil.rmtree(work, ignore_errors=True)

    s = series
    print()
    print(
        f"{n:,} recipients, {conns} SMTP connections, {args.runs} runs; sink: {sink.name}; "
        f"PostgreSQL fsync=on synchronous_commit=on shared_buffers=1GB"
    )
    print(
        f"load average (1 min) at the start of each run: min {min(loads):.2f}, "
        f"median {statistics.median(loads):.2f}, max {max(loads):.2f}; now "
        + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    rows = [
        (
            "goal",
            "figure (min / median / max)",
            "anchor (min / median / max)",
            "ratio (median)",
            "target",
        ),
        (
            "pipelined send path",
            f"mailer run {s['mailer'].fmt()} msg/s",
            f"bare aiosmtplib {s['bare'].fmt()} msg/s",
            f"{s['ratio'].fmt(2)}",
            "≥ 1.0",
        ),
        (
            "CPU per message",
            f"mailer run {s['mailer_cpu'].fmt(3)} ms",
            f"bare aiosmtplib {s['bare_cpu'].fmt(3)} ms",
            f"{s['mailer_cpu'].median / s['bare_cpu'].median:.2f}",
            "—",
        ),
        (
            "flat with history",
            f"{args.history:,} send-log rows: {s['history'].fmt()} msg/s",
            f"empty send log {s['mailer'].fmt()} msg/s",
            f"{s['history_ratio'].fmt(2)}",
            "≥ 0.95",
        ),
        (
            f"bulk ingest (recipients.import, {args.import_recipients:,} lines)",
            f"{s['import'].fmt(1)} s end to end",
            f"recipients.add, 5 000/call: {s['add'].fmt()} recipients/s",
            "—",
            "1 000 000 in ≤ 10 s",
        )
        if s["import"].values
        else (
            "ingest (recipients.add, 5 000/call)",
            f"{s['add'].fmt()} recipients/s",
            "—",
            "—",
            "1 000 000 in ≤ 10 s (recipients.import: --import-recipients)",
        ),
        (
            "concurrent governor (32 requesters, 1 token each)",
            f"mailer run {s['governor'].fmt()} req/s, p99 {s['governor_p99'].fmt(1)} ms",
            f"trivial nats-py responder {s['trivial'].fmt()} req/s",
            f"{s['governor_ratio'].fmt(2)}",
            "≥ 20 000 req/s, p99 ≤ 2 ms",
        )
        if s["governor"].values
        else ("concurrent governor", "skipped (--governor-seconds 0)", "—", "—", "≥ 20 000 req/s"),
        (
            "scale-out: msg/s",
            f"2 processes {s['scale2'].fmt()} msg/s",
            f"1 process {s['scale1'].fmt()} msg/s",
            f"{s['scale_rate_ratio'].fmt(2)}",
            "—",
        ),
        (
            "scale-out: messages per mailer CPU-second",
            f"2 processes {s['scale2_cpu'].fmt()}",
            f"1 process {s['scale1_cpu'].fmt()}",
            f"{s['scale_cpu_ratio'].fmt(2)}",
            "≥ 0.9",
        ),
        (
            "scale-out: the same, 2 campaigns of half, no shards",
            f"2 processes {s['halves_cpu'].fmt()} msg per mailer CPU-s",
            f"1 process {s['scale1_cpu'].fmt()}",
            f"{s['halves_cpu_ratio'].fmt(2)}",
            "—",
        ),
        (
            "scale-out: each process's share of the campaign",
            f"smaller share {s['share_min'].fmt(1)} %",
            "per run: " + "; ".join(" / ".join(f"{x:.1%}" for x in sh) for sh in shares),
            "—",
            "≥ 30 % each",
        ),
        (
            "vs django-post-office",
            f"mailer run {s['mailer'].fmt()} msg/s",
            f"post_office.send_queued {s['post_office'].fmt()} msg/s"
            if po_python
            else f"not measured: {po_why}",
            f"{s['po_ratio'].fmt(2)}",
            "≥ 6",
        ),
    ]
    if only_scaleout:  # the other goals were not measured: their rows would be empty
        rows = [rows[0], *(r for r in rows if r[0].startswith("scale-out"))]
    if only_send:
        rows = rows[:3]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for i, r in enumerate(rows):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    asyncio.run(main())
