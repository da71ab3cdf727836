"""The README's quick start, as a newcomer runs it: ``mailer dev`` in one terminal, the
README's commands in another, from the printed ``export`` line to a sent campaign."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path

import pytest

from mailer.config import Settings
from mailer.devrun import LIFT_LIMITS

README = Path(__file__).resolve().parent.parent / "README.md"
pytestmark = pytest.mark.timeout(180)


def _readme_commands() -> str:
    text = README.read_text(encoding="utf-8")
    m = re.search(r"Then, in another terminal.*?```sh\n(.*?)```", text, re.DOTALL)
    assert m, "the README's quick start has no second-terminal block"
    return m[1]


async def test_readme_quick_start_sends_a_campaign_from_a_csv(
    settings: Settings, tmp_path: Path
) -> None:
    # `make run` is `mailer dev`; its servers but PostgreSQL and Redis are its own (those
    # two come from the test session, to spare a second initdb). Limits lifted as the
    # README says, so the test passes at any hour.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    env.update(dict(pair.split("=", 1) for pair in LIFT_LIMITS.split()))
    env.update(
        MAILER_DATABASE_URL=settings.database_url,
        MAILER_REDIS_URL=settings.redis_url,
        MAILER_REDIS_KEY_PREFIX=settings.redis_key_prefix,
        MAILER_VAR_DIR=str(tmp_path / "var"),
        MAILER_HTTP_PORT="0",
        MAILER_PUBLIC_HTTP_PORT="0",
        MAILER_EVENTS_MAX_BYTES=str(8 * 1024 * 1024),
        MAILER_LOG_LEVEL="WARNING",
    )
    dev = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailer.cli", "dev",
        env=env, cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    assert dev.stdout is not None
    printed: list[str] = []
    try:
        async with asyncio.timeout(90):
            while not any(line.strip().startswith("export MAILER_NATS_URL=") for line in printed):
                line = (await dev.stdout.readline()).decode()
                assert line, "mailer dev ended:\n" + "".join(printed)
                printed.append(line)
            while "To lift them" not in printed[-1]:
                printed.append((await dev.stdout.readline()).decode())
        export = next(x.strip() for x in printed if x.strip().startswith("export MAILER_NATS_URL"))
        assert "Limits in force: working hours" in "".join(printed)

        # The second terminal: a fresh directory whose .venv/bin/activate puts `mailer`
        # (this checkout's) on PATH; the README's lines with the printed export line.
        bin_dir = tmp_path / "term" / ".venv" / "bin"
        bin_dir.mkdir(parents=True)
        shim = bin_dir / "mailer"
        shim.write_text(f'#!/bin/sh\nexec {sys.executable} -m mailer.cli "$@"\n')
        shim.chmod(0o755)
        (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
        lines = _readme_commands().splitlines()
        assert lines[0].startswith("export MAILER_NATS_URL=")
        script = "\n".join(["set -e", export, *lines[1:]])
        term_env = {k: v for k, v in env.items() if not k.startswith("MAILER_")}
        term_env["COLUMNS"] = "200"
        term = await asyncio.create_subprocess_exec(
            "bash", "-c", script,
            env=term_env, cwd=bin_dir.parent.parent,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        async with asyncio.timeout(120):
            out, _ = await term.communicate()
        output = out.decode()
        assert term.returncode == 0, output
        assert "Кампания 1 создана (черновик)." in output
        assert "Добавлено: 2, дубликатов: 0, с ошибками: 1." in output
        assert "строка 4: «no-address»" in output
        assert "Кампания 1 завершена: отправлена. Отправлено 2, ошибок 0" in output
        assert "Активной кампании нет." in output
        outbox = list((tmp_path / "var" / "outbox").glob("*.eml"))
        assert len(outbox) == 2
    finally:
        if dev.returncode is None:
            dev.send_signal(signal.SIGINT)
            try:
                async with asyncio.timeout(30):
                    await dev.communicate()
            except TimeoutError:
                dev.kill()
                await dev.wait()
    assert dev.returncode == 0
