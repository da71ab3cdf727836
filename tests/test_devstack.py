"""The embedded stack starts real servers, the sink behaves, and stop() leaves no process.

The stack is started once for this module in a private temporary directory (a fresh
initdb costs well under a second) with no overrides, so MAILER_* variables of the
environment cannot point it at the machine's own servers.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from email.message import EmailMessage
from pathlib import Path

import aiosmtplib
import asyncpg
import nats
import pytest
import redis.asyncio as aioredis

from mailer.devstack import (
    EmbeddedStack,
    StackEndpoints,
    StackError,
    StackOverrides,
    create_database,
    database_dsn,
    drop_database,
    pid_alive,
)
from mailer.sink import PERMANENT_FAILURE, TRANSIENT_FAILURE, SmtpSink

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
async def stack() -> AsyncIterator[EmbeddedStack]:
    var = _tempdir()
    st = EmbeddedStack(var, StackOverrides())
    began = time.perf_counter()
    await st.start()
    st.timings["fixture"] = time.perf_counter() - began
    try:
        yield st
    finally:
        await st.stop()
        shutil.rmtree(var, ignore_errors=True)


def _tempdir() -> Path:
    var = Path(tempfile.mkdtemp(prefix="mailer-devstack-"))
    var.chmod(0o755)  # the postgres account must enter it when we run as root
    return var


def _sink(stack: EmbeddedStack) -> SmtpSink:
    assert stack.sink is not None
    return stack.sink


async def _send(ep: StackEndpoints, to: str) -> None:
    await aiosmtplib.send(_message(to), hostname=ep.smtp_host, port=ep.smtp_port)


def _message(to: str, subject: str = "hello") -> EmailMessage:
    msg = EmailMessage()
    msg["From"] = "crm@example.com"
    msg["To"] = to
    msg["Subject"] = subject
    msg.set_content("Hi there.\n.leading dot survives\n")
    return msg


async def test_starts_fast(stack: EmbeddedStack, capsys: pytest.CaptureFixture[str]) -> None:
    timings = ", ".join(f"{k} {v:.2f}s" for k, v in stack.timings.items())
    with capsys.disabled():
        print(f"\n[devstack] start-up: {timings}")
    assert set(stack.pids()) == {"nats", "postgres", "redis"}
    assert stack.timings["total"] < 15


async def test_postgres_is_real(stack: EmbeddedStack) -> None:
    dsn = stack.endpoints.database_url
    assert dsn.startswith("postgresql://postgres@127.0.0.1:")
    conn = await asyncpg.connect(dsn)
    try:
        version = await conn.fetchval("select version()")
        assert "PostgreSQL 18" in version
        assert await conn.fetchval("show fsync") == "off"
    finally:
        await conn.close()


async def test_database_from_template(stack: EmbeddedStack) -> None:
    admin = stack.endpoints.database_url
    tpl_dsn = await create_database(admin, "tpl_devstack")
    conn = await asyncpg.connect(tpl_dsn)
    try:
        await conn.execute("create table t (id int primary key); insert into t values (41)")
    finally:
        await conn.close()

    clone_dsn = await create_database(admin, "clone-devstack", template="tpl_devstack")
    assert clone_dsn == database_dsn(admin, "clone-devstack")
    conn = await asyncpg.connect(clone_dsn)
    try:
        assert await conn.fetchval("select id + 1 from t") == 42
    finally:
        await conn.close()

    # Dropping works with a session still open (WITH FORCE).
    lingering = await asyncpg.connect(clone_dsn)
    await drop_database(admin, "clone-devstack")
    await drop_database(admin, "tpl_devstack")
    await drop_database(admin, "tpl_devstack")  # IF EXISTS: idempotent
    assert lingering.is_closed() or await _closed_by_server(lingering)
    conn = await asyncpg.connect(admin)
    try:
        left = await conn.fetch("select datname from pg_database where datname like '%devstack'")
        assert left == []
    finally:
        await conn.close()


async def _closed_by_server(conn: asyncpg.Connection) -> bool:
    try:
        await conn.fetchval("select 1")
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError):
        return True
    finally:
        conn.terminate()
    return False


async def test_redis_is_real(stack: EmbeddedStack) -> None:
    client = aioredis.from_url(stack.endpoints.redis_url)
    try:
        assert await client.ping() is True
        assert await client.incr("devstack:n") == 1
        assert await client.incr("devstack:n") == 2
        assert await client.config_get("save") == {"save": ""}  # persistence off
    finally:
        await client.aclose()


async def test_nats_jetstream_is_real(stack: EmbeddedStack) -> None:
    nc = await nats.connect(stack.endpoints.nats_url)
    try:
        js = nc.jetstream()
        info = await js.account_info()
        assert info.limits is not None
        await js.add_stream(name="DEVSTACK", subjects=["devstack.>"])
        ack = await js.publish("devstack.one", b"x")
        assert ack.stream == "DEVSTACK" and ack.seq == 1
    finally:
        await nc.close()


async def test_sink_stores_messages(stack: EmbeddedStack) -> None:
    ep, sink = stack.endpoints, _sink(stack)
    sink.reset()
    await aiosmtplib.send(
        _message("a@example.com"),
        recipients=["a@example.com", "b@example.com"],
        hostname=ep.smtp_host,
        port=ep.smtp_port,
    )
    (got,) = await sink.wait_for(1, timeout=5)
    assert got.mail_from == "crm@example.com"
    assert got.rcpt_tos == ("a@example.com", "b@example.com")
    assert b"Subject: hello" in got.data
    assert b"\n.leading dot survives" in got.data  # dot-stuffing undone
    assert got.path is not None and got.path.parent == ep.outbox_dir
    assert got.path.suffix == ".eml"
    stored = got.path.read_bytes()
    assert stored.startswith(b"Return-Path: <crm@example.com>\r\n")
    assert stored.endswith(got.data)
    assert not list(got.path.parent.glob("*.tmp"))


async def test_sink_wait_for_wakes_on_arrival(stack: EmbeddedStack) -> None:
    ep, sink = stack.endpoints, _sink(stack)
    sink.reset()
    waiter = asyncio.create_task(sink.wait_for(3, timeout=5))
    await asyncio.sleep(0)
    assert not waiter.done()
    async with aiosmtplib.SMTP(hostname=ep.smtp_host, port=ep.smtp_port) as client:
        for i in range(3):
            await client.send_message(_message(f"r{i}@example.com"))
    assert len(await waiter) == 3
    with pytest.raises(TimeoutError, match="3 of 4"):
        await sink.wait_for(4, timeout=0.05)


async def test_sink_programmed_failures(stack: EmbeddedStack) -> None:
    ep, sink = stack.endpoints, _sink(stack)
    sink.reset()
    sink.fail("gone@example.com")  # 550 at RCPT, for ever
    sink.fail("busy@example.com", TRANSIENT_FAILURE, stage="data", times=1)

    with pytest.raises(aiosmtplib.SMTPRecipientsRefused) as refused:
        await _send(ep, "gone@example.com")
    (error,) = refused.value.recipients
    assert error.code == 550 and error.message == PERMANENT_FAILURE[4:]

    with pytest.raises(aiosmtplib.SMTPDataError) as data_error:
        await _send(ep, "busy@example.com")
    assert data_error.value.code == 451

    # times=1: the retry goes through, like a greylisting server's.
    await _send(ep, "busy@example.com")
    assert [m.rcpt_tos for m in await sink.wait_for(1)] == [("busy@example.com",)]
    assert [(r.stage, r.address) for r in sink.rejections] == [
        ("rcpt", "gone@example.com"),
        ("data", "busy@example.com"),
    ]

    sink.hook = lambda stage, address: "552 5.2.2 Mailbox full" if "full" in address else None
    with pytest.raises(aiosmtplib.SMTPRecipientsRefused):
        await _send(ep, "full@example.com")
    with pytest.raises(ValueError, match="not a 4xx/5xx"):
        sink.fail("x@example.com", "250 fine")
    sink.reset()


async def test_second_stack_on_same_dir_is_refused(stack: EmbeddedStack) -> None:
    other = EmbeddedStack(stack.var_dir, StackOverrides())
    with pytest.raises(StackError, match="used by another embedded stack"):
        await other.start()
    assert other.pids() == {} and other.sink is None


async def test_overrides_skip_components(tmp_path: Path) -> None:
    env = {
        "MAILER_NATS_URL": "nats://nats.example:4222",
        "MAILER_DATABASE_URL": "postgresql://db.example/x",
        "MAILER_REDIS_URL": " ",  # blank counts as unset
        "MAILER_SMTP_HOST": "",
    }
    overrides = StackOverrides.from_env(env)
    assert overrides.to_start() == {"redis", "smtp"}
    assert StackOverrides.from_env({"MAILER_SMTP_HOST": "relay"}).smtp_port == 25

    only_sink = StackOverrides(
        nats_url="nats://n:1", database_url="postgresql://d/x", redis_url="redis://r:1/0"
    )
    async with EmbeddedStack(tmp_path, only_sink) as st:
        assert st.pids() == {}
        ep = st.endpoints
        assert (ep.nats_url, ep.database_url, ep.redis_url) == (
            "nats://n:1",
            "postgresql://d/x",
            "redis://r:1/0",
        )
        assert ep.outbox_dir == st.var_dir / "outbox" and st.var_dir.name == tmp_path.name
        assert ep.as_env()["MAILER_SMTP_PORT"] == str(ep.smtp_port)
    assert os.listdir(tmp_path) == ["outbox"]  # no stack dir for a sink alone


async def test_stop_leaves_no_process(stack: EmbeddedStack) -> None:
    servers = stack.pids()
    conn = await asyncpg.connect(stack.endpoints.database_url)
    try:
        # Backends and auxiliary processes (checkpointer, walwriter, ...) of the postmaster.
        pg_children = [r["pid"] for r in await conn.fetch("select pid from pg_stat_activity")]
    finally:
        await conn.close()
    assert len(pg_children) >= 3
    smtp_port = stack.endpoints.smtp_port

    began = time.perf_counter()
    await stack.stop()
    took = time.perf_counter() - began

    alive = [pid for pid in [*servers.values(), *pg_children] if pid_alive(pid)]
    assert alive == [], f"still running: {alive}"
    assert took < 5, f"stop took {took:.1f}s"
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", smtp_port), timeout=1):
        pass
    await stack.stop()  # idempotent


def test_orphan_of_a_crashed_run_is_stopped(tmp_path: Path) -> None:
    folder = tmp_path / "redis"
    folder.mkdir()
    orphan = subprocess.Popen(["sleep", "60"], cwd=folder)
    (folder / "server.pid").write_text(str(orphan.pid))
    EmbeddedStack._reap_orphan(folder)
    assert orphan.wait(timeout=5) == -signal.SIGKILL
    assert not (folder / "server.pid").exists()

    stranger = subprocess.Popen(["sleep", "60"])  # same pid file, not in that folder
    try:
        (folder / "server.pid").write_text(str(stranger.pid))
        EmbeddedStack._reap_orphan(folder)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def _alive_after(pids: dict[str, int], within: float) -> list[str]:
    """Names of the pids still alive once all are gone or ``within`` seconds passed."""
    deadline = time.monotonic() + within
    while any(pid_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    return [name for name, pid in pids.items() if pid_alive(pid)]


_CRASHING_PARENT = """
import asyncio, json, sys
from mailer.devstack import EmbeddedStack, StackOverrides

async def main():
    stack = EmbeddedStack(sys.argv[1], StackOverrides())
    await stack.start()
    print(json.dumps(stack.pids()), flush=True)
    await asyncio.sleep(60)

asyncio.run(main())
"""


async def test_servers_die_with_a_killed_parent_and_the_dir_is_reusable() -> None:
    var = _tempdir()
    try:
        parent = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CRASHING_PARENT, str(var), stdout=asyncio.subprocess.PIPE
        )
        assert parent.stdout is not None
        line = await asyncio.wait_for(parent.stdout.readline(), 20)
        servers: dict[str, int] = json.loads(line)
        assert set(servers) == {"nats", "postgres", "redis"}
        parent.kill()  # SIGKILL: no atexit, no finally; only PR_SET_PDEATHSIG is left
        await parent.wait()

        alive = await asyncio.to_thread(_alive_after, servers, 10)
        assert alive == []

        # Same directory again: the lock died with the parent, stale pid files are ignored.
        async with EmbeddedStack(var, StackOverrides()) as again:
            conn = await asyncpg.connect(again.endpoints.database_url)
            try:
                assert await conn.fetchval("select 1") == 1
            finally:
                await conn.close()
    finally:
        shutil.rmtree(var, ignore_errors=True)
