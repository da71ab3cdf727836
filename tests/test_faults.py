"""The chaos suite's actor-crash hook (mailer/faults.py): inert unless turned on, refused in
production, and when on it crashes the named actor, which its supervisor restarts."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import msgspec
import nats
import pytest

from mailer.config import ConfigError, Settings, load_settings
from tests.helpers import LeaderWatch, worker_env
from tests.test_config import PRODUCTION

pytestmark = pytest.mark.timeout(60)


def test_production_refuses_fault_injection() -> None:
    with pytest.raises(ConfigError, match="MAILER_FAULT_INJECTION is not allowed in production"):
        load_settings({**PRODUCTION, "MAILER_FAULT_INJECTION": "true"}, dotenv=None)
    assert load_settings(PRODUCTION, dotenv=None).fault_injection is False


async def _crash(nc, prefix: str, instance: str, actor: str) -> str | None:
    reply = await nc.request(
        f"{prefix}.internal.fault.crash.{instance}",
        msgspec.json.encode({"actor": actor}),
        timeout=5,
    )
    crashed: str | None = msgspec.json.decode(reply.data)["crashed"]
    return crashed


async def test_a_crash_request_crashes_the_actor_and_it_is_restarted(
    settings: Settings, nc, tmp_path: Path
) -> None:
    log_path = tmp_path / "w.log"
    watch = LeaderWatch()
    await watch.start(nc, settings.subject_prefix)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailer.cli",
            "run",
            env=worker_env(settings, "w", fault_injection="true"),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        assert await watch.wait(timeout=30) == "w"  # up: it leads
        async with asyncio.timeout(10):  # the hook is installed right after start-up
            while True:
                try:
                    first = await _crash(nc, settings.subject_prefix, "w", "runner")
                    break
                except nats.errors.NoRespondersError:
                    continue
        assert first == "runner"
        assert await _crash(nc, settings.subject_prefix, "w", "campaign") is None  # none runs
        # The runner was restarted: a second crash finds it alive again.
        async with asyncio.timeout(10):
            while (hit := await _crash(nc, settings.subject_prefix, "w", "runner")) is None:
                pass
        assert hit == "runner"
        assert proc.returncode is None
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 20)
        watch.stop()
    text = log_path.read_text()
    assert "InjectedFault('injected fault in runner')" in text, text[-2000:]
    assert "actor crashed" in text


async def test_without_the_setting_nobody_answers(settings: Settings, nc, tmp_path: Path) -> None:
    log_path = tmp_path / "plain.log"
    watch = LeaderWatch()
    await watch.start(nc, settings.subject_prefix)
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailer.cli",
            "run",
            # INFO: if it ever fails to stop, its log says where it was.
            env=worker_env(settings, "plain", log_level="INFO"),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        assert await watch.wait(timeout=30) == "plain"
        with pytest.raises(nats.errors.NoRespondersError):
            await _crash(nc, settings.subject_prefix, "plain", "runner")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            raise AssertionError(log_path.read_text()[-4000:]) from None
        finally:
            watch.stop()
