"""No blind spots: a freshly started ``mailer run`` process, before any campaign, request or
failure, already exports a series for every metric name an alert or a dashboard panel uses.

A counter without a series until its first event is invisible to ``increase()`` at that
event (there is no earlier sample to compare with), so the alert on it misses exactly the
first occurrence; a gauge without a series makes a panel say "no data" instead of 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mailer.config import Settings
from mailer.devstack import free_port
from tests.helpers import worker_env
from tests.test_operations import METRIC_NAME, alert_rules, dashboard_panels

pytestmark = pytest.mark.timeout(90)


def used_metric_names() -> dict[str, set[str]]:
    """Every mailer metric name an alert expression or a panel query names, and where."""
    used: dict[str, set[str]] = {}
    for rule in alert_rules():
        for name in METRIC_NAME.findall(rule["expr"]):
            used.setdefault(name, set()).add(f"alert {rule['alert']}")
    for panel in dashboard_panels():
        for target in panel.get("targets", []):
            for name in METRIC_NAME.findall(target["expr"]):
                used.setdefault(name, set()).add(f"panel {panel['title']!r}")
    return used


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url) as resp:
        return resp.status, await resp.text()


async def test_a_fresh_process_exports_every_metric_the_alerts_and_panels_use(
    settings: Settings, tmp_path: Path
) -> None:
    port = free_port()
    log_path = tmp_path / "mailer.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "mailer.cli",
            "run",
            env=worker_env(settings, "fresh", http_port=str(port)),
            stdout=log,
            stderr=asyncio.subprocess.STDOUT,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            async with asyncio.timeout(45):
                while True:  # a separate process: its readiness is only seen by asking
                    assert proc.returncode is None, log_path.read_text()
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        status, _ = await _get(http, f"{base}/readyz")
                        if status == 200:
                            break
                    await asyncio.sleep(0.1)
            status, text = await _get(http, f"{base}/metrics")
        assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.kill()
            await proc.wait()

    families = list(text_string_to_metric_families(text))
    exported = {sample.name for family in families for sample in family.samples}
    # Every mailer family has a series, not only those the rules use today.
    empty = [f.name for f in families if f.name.startswith("mailer_") and not f.samples]
    assert not empty, f"families without a series: {empty}"
    assert 'mailer_defers_total{reason="circuit_breaker"}' in text
    used = used_metric_names()
    assert len(used) >= 25, sorted(used)
    missing = {name: sorted(where) for name, where in used.items() if name not in exported}
    assert not missing, f"no series in a fresh process for: {missing}"
    # The values are real readings, not placeholders: the dependencies were checked.
    for dependency in ("postgres", "nats", "redis", "smtp"):
        assert f'mailer_dependency_up{{dependency="{dependency}"}} 1.0' in text, dependency
