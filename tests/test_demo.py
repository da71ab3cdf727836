"""``mailer demo`` as a user runs it: the console script, twice, in one working directory.

The demo starts its own embedded stack under ``./var`` of its working directory
(``MAILER_VAR_DIR`` defaults to ``var``); the test runs it in a private temporary
directory with every ``MAILER_*`` variable removed, so it neither writes into the
repository's ``var/`` nor points at the session's servers. The second run reuses the
directory the first one left (stack data, outbox) and must still succeed.
"""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(180)

RECIPIENTS = 12


def _mailer_command() -> list[str]:
    script = Path(sys.executable).parent / "mailer"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "mailer.cli"]


@pytest.fixture
def workdir() -> Iterator[Path]:
    folder = Path(tempfile.mkdtemp(prefix="mailer-demo-"))
    folder.chmod(0o755)  # the postgres account must enter it when we run as root
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


async def _demo(workdir: Path, log_path: Path, **settings: str) -> tuple[int, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update({f"MAILER_{k.upper()}": v for k, v in settings.items()})
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            *_mailer_command(),
            "demo",
            "--recipients",
            str(RECIPIENTS),
            cwd=workdir,
            env=env,
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        code = await asyncio.wait_for(proc.wait(), timeout=120)
    finally:
        if proc.returncode is None:  # timed out: SIGTERM stops its servers too
            proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), timeout=15)
            except TimeoutError:
                proc.kill()
                await proc.wait()
            print(_text(log_path))
    return code, _text(log_path)


def _text(path: Path) -> str:
    return path.read_text(errors="replace")


def _to_addresses(outbox: Path) -> list[str]:
    parser = email.parser.BytesHeaderParser(policy=email.policy.default)
    found = []
    for path in sorted(outbox.glob("*.eml")):
        with path.open("rb") as f:
            (address,) = parser.parse(f)["To"].addresses
        found.append(address.addr_spec)
    return found


async def test_demo_runs_twice_in_one_directory(workdir: Path, tmp_path: Path) -> None:
    logs = tmp_path
    expected = sorted(f"client{i:03d}@example.org" for i in range(RECIPIENTS))
    outbox = workdir / "var" / "outbox"
    for run in (1, 2):
        code, out = await _demo(workdir, logs / f"demo-{run}.log")
        print(f"--- demo run {run} ---\n{out}")
        assert code == 0, out
        assert "demo OK" in out.splitlines(), out
        # One message per recipient, each to a different one: the second run's
        # outbox holds its own messages only.
        assert sorted(_to_addresses(outbox)) == expected, f"run {run}"
    # Everything it wrote is under the working directory's var/.
    assert sorted(p.name for p in _entries(workdir)) == ["var"]
    assert {"outbox", "stack"} <= {p.name for p in _entries(workdir / "var")}


def _entries(folder: Path) -> list[Path]:
    return list(folder.iterdir())


async def test_a_demo_that_hits_a_limit_says_so_at_once(workdir: Path, tmp_path: Path) -> None:
    # Fewer sends per hour than recipients: the campaign is deferred; the demo
    # reports why and fails instead of waiting for the next hour.
    code, out = await _demo(workdir, tmp_path / "demo.log", rate_per_hour="5")
    assert code == 1, out
    assert "demo FAILED" in out.splitlines(), out
    assert "the campaign waits (rate_per_hour until " in out, out
