"""Start-up that explains itself: each failure is one clear line and its own exit code.

Every case runs the real ``mailer run`` (or ``mailer migrate``) process: a bad value
exits 2 before anything connects; a dependency that cannot be had exits 3 after one
WARNING line per attempt (secrets masked), never with a traceback; while it waits, the
internal HTTP server already answers ``/healthz`` and ``/readyz`` names what is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mailer.config import Settings
from mailer.devstack import free_port
from tests.helpers import worker_env

pytestmark = pytest.mark.timeout(90)

SECRET = "s3cret-Pa55"


async def _mailer(
    settings: Settings, tmp_path: Path, *args: str, **extra: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mailer.cli",
        *args,
        env=worker_env(settings, "startup", **{"startup_timeout_seconds": "2", **extra}),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path,
    )


async def _finish(proc: asyncio.subprocess.Process, within: float = 30) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(proc.communicate(), within)
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def _dsn(
    settings: Settings,
    *,
    host: str | None = None,
    port: int | None = None,
    database: str | None = None,
    scheme: str = "postgresql",
) -> str:
    from urllib.parse import urlsplit

    u = urlsplit(settings.database_url)
    return (
        f"{scheme}://{u.username or 'postgres'}:{SECRET}@{host or u.hostname}:"
        f"{port or u.port}/{database or u.path.lstrip('/')}"
    )


def _one_clear_line(code: int, err: str, expected_code: int, *needles: str) -> str:
    assert code == expected_code, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    for needle in needles:
        assert needle in last, last
    assert SECRET not in err, "a password in the logs"
    return last


async def test_postgresql_unreachable_exits_3_after_one_line_per_attempt(
    settings: Settings, tmp_path: Path
) -> None:
    dead = free_port()  # nothing listens there
    proc = await _mailer(settings, tmp_path, "run", database_url=_dsn(settings, port=dead))
    code, _, err = await _finish(proc)
    last = _one_clear_line(code, err, 3, "start-up failed: postgres at", "within 2 s")
    assert f"127.0.0.1:{dead}" in last and "***" in last
    attempts = [line for line in err.splitlines() if "waiting for postgres" in line]
    assert len(attempts) >= 2, err
    assert all("Connect" in a or "refused" in a.lower() for a in attempts), attempts


async def test_an_unknown_database_exits_3_at_once(settings: Settings, tmp_path: Path) -> None:
    proc = await _mailer(
        settings, tmp_path, "run", database_url=_dsn(settings, database="no_such_db")
    )
    code, _, err = await _finish(proc)
    _one_clear_line(code, err, 3, "postgres at", "no_such_db", "does not exist")
    assert "waiting for postgres" not in err  # waiting would not create it


async def test_a_host_that_does_not_resolve_exits_3(settings: Settings, tmp_path: Path) -> None:
    proc = await _mailer(
        settings, tmp_path, "run", database_url=_dsn(settings, host="db.no-such-host.invalid")
    )
    code, _, err = await _finish(proc)
    _one_clear_line(code, err, 3, "postgres at", "db.no-such-host.invalid")


@pytest.mark.parametrize(
    ("name", "value", "needle"),
    [
        ("database_url", "mysql://mailer:s3cret-Pa55@db/mailer", "MAILER_DATABASE_URL="),
        ("timezone", "Europe/Atlantis", "MAILER_TIMEZONE='Europe/Atlantis'"),
        ("nats_url", "http://nats:4222", "MAILER_NATS_URL="),
    ],
)
async def test_a_bad_value_exits_2_before_anything_connects(
    settings: Settings, tmp_path: Path, name: str, value: str, needle: str
) -> None:
    proc = await _mailer(settings, tmp_path, "run", **{name: value})
    code, _, err = await _finish(proc)
    last = _one_clear_line(code, err, 2, "configuration error", needle)
    assert "waiting for" not in err
    if name == "database_url":
        assert "mailer:***@db" in last


async def test_the_http_port_in_use_exits_3(settings: Settings, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = await _mailer(settings, tmp_path, "run", http_port=str(port))
        code, _, err = await _finish(proc)
    _one_clear_line(code, err, 3, "http (internal)", f"127.0.0.1:{port}")


async def test_while_nats_is_awaited_the_probes_answer_and_then_it_exits_3(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    dead = free_port()
    proc = await _mailer(
        settings,
        tmp_path,
        "run",
        http_port=str(port),
        nats_url=f"nats://mailer:{SECRET}@127.0.0.1:{dead}",
        startup_timeout_seconds="6",
    )
    seen: dict[str, Any] = {}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        for _ in range(100):
            with contextlib.suppress(aiohttp.ClientError, OSError):
                async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
                    seen["healthz"] = r.status
                async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
                    seen["readyz"] = (r.status, await r.json())
                break
            await asyncio.sleep(0.05)
    code, _, err = await _finish(proc)
    assert seen["healthz"] == 200
    status, body = seen["readyz"]
    assert status == 503 and body["nats"] is False and body["started"] is False
    last = _one_clear_line(code, err, 3, "nats at", "within 6 s")
    assert f"mailer:***@127.0.0.1:{dead}" in last
    assert "waiting for nats" in err


async def test_migrate_explains_an_unreachable_database_too(
    settings: Settings, tmp_path: Path
) -> None:
    proc = await _mailer(
        settings, tmp_path, "migrate", database_url=_dsn(settings, port=free_port())
    )
    code, _, err = await _finish(proc)
    _one_clear_line(code, err, 3, "postgres at")


async def test_a_database_that_comes_up_late_is_waited_for(
    settings: Settings, tmp_path: Path
) -> None:
    # PostgreSQL answers only after the first attempts failed: start-up waits, then runs.
    from urllib.parse import urlsplit

    real = urlsplit(settings.database_url)
    port = free_port()
    relay: asyncio.AbstractServer | None = None

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_r, up_w = await asyncio.open_connection(real.hostname, real.port)
        await asyncio.gather(pipe(reader, up_w), pipe(up_r, writer))

    late = settings.database_url.replace(f":{real.port}/", f":{port}/")
    proc = await _mailer(
        settings,
        tmp_path,
        "run",
        http_port="0",
        database_url=late,
        startup_timeout_seconds="30",
        log_level="INFO",
    )
    assert proc.stderr is not None
    lines: list[str] = []
    while not any("waiting for postgres" in line for line in lines):
        lines.append((await asyncio.wait_for(proc.stderr.readline(), 30)).decode())
    relay = await asyncio.start_server(forward, "127.0.0.1", port)
    try:
        while not any("mailer started" in line for line in lines):
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "".join(lines)
            lines.append(line)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
        relay.close()
    assert proc.returncode == 0, "".join(lines)


async def test_a_sigterm_while_a_dependency_is_awaited_stops_at_once_with_0(
    settings: Settings, tmp_path: Path
) -> None:
    # A pod stopped while it waits for PostgreSQL: the start-up is given up, not waited out.
    dead = free_port()
    proc = await _mailer(
        settings,
        tmp_path,
        "run",
        database_url=_dsn(settings, port=dead),
        startup_timeout_seconds="60",
    )
    assert proc.stderr is not None
    async with asyncio.timeout(30):
        while b"waiting for postgres" not in await proc.stderr.readline():
            pass
    proc.send_signal(signal.SIGTERM)
    code, _, err = await _finish(proc, within=15)
    assert code == 0, err
    assert "Traceback" not in err, err
