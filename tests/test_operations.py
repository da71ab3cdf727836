"""The operations artifacts stay true to the code: alert rules and their promtool tests, the
Grafana dashboard, and the on-call playbook, whose SQL runs against the real schema.

promtool is not on PyPI: where it is on PATH (Debian's `prometheus` package) the rules are
checked and unit-tested by it; elsewhere those two tests skip and the checks here still run.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import yaml
from prometheus_client import REGISTRY

import mailer.events
import mailer.metrics
import mailer.unsubscribe_http
from mailer.config import settings_table

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yaml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "mailer-dashboard.json"
PLAYBOOK = ROOT / "docs" / "playbook.md"

# Modules whose import registers metrics (the names the rules and the dashboard may use).
METRIC_MODULES = (mailer.metrics, mailer.events, mailer.unsubscribe_http)

REQUIRED_ALERTS = {
    "MailerRateLimiterRedisErrors",
    "MailerApiThrottleRedisErrors",
    "MailerCampaignProcessingTooLong",
    "MailerCircuitBreakerOpen",
    "MailerQueueDepthHigh",
    "MailerNoLeader",
    "MailerMultipleLeaders",
    "MailerSendingStalled",
    "MailerEventsPublishFailing",
    "MailerActorRestarts",
    "MailerMailboxFull",
}
# What the dashboard must show (MISSION "Observability and operations" and the brief).
REQUIRED_DASHBOARD_METRICS = {
    "mailer_emails_sent_total",
    "mailer_emails_failed_total",
    "mailer_tokens_granted_total",
    "mailer_tokens_denied_total",
    "mailer_defers_total",
    "mailer_queue_depth",
    "mailer_campaigns_active",
    "mailer_leader",
    "mailer_circuit_breaker_state",
    "mailer_processing_oldest_seconds",
    "mailer_send_duration_seconds_bucket",
    "mailer_actor_mailbox_depth",
    "mailer_actor_restarts_total",
    "mailer_rate_limiter_redis_errors_total",
    "mailer_api_throttle_redis_errors_total",
    "mailer_recipients_pending",
    "mailer_recipients_sendable",
    "mailer_campaigns_waiting",
    "mailer_quota_emails_available",
    "mailer_rate_hour_used",
    "mailer_rate_hour_limit",
    "mailer_dependency_up",
    "mailer_smtp_connection_errors_total",
    "mailer_api_requests_total",
    "mailer_api_request_duration_seconds_bucket",
}
PLAYBOOK_SECTIONS = {
    "sending-stalled",
    "quota-exhausted",
    "redis-down",
    "campaign-stuck",
    "circuit-breaker-open",
    "no-leader--two-leaders",
    "how-to-change-limits",
    "recipients-in-doubt",
}
SEVERITIES = {"critical", "warning", "info"}

METRIC_NAME = re.compile(r"\bmailer_[a-z0-9_]*[a-z0-9]\b")
DURATION = re.compile(r"^(\d+[smhdwy])+$")


# --- helpers ---------------------------------------------------------------------------------


def exported_metric_names() -> set[str]:
    """Every sample name the running registry can expose, children or not."""
    assert METRIC_MODULES  # imported for their registrations
    suffixes = {
        "counter": ("_total",),
        "gauge": ("",),
        "histogram": ("_bucket", "_sum", "_count"),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
        "stateset": ("",),
        "unknown": ("",),
    }
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in doc["groups"] for rule in group["rules"] if "alert" in rule]


def dashboard_panels() -> list[dict[str, Any]]:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    panels: list[dict[str, Any]] = []
    for panel in doc["panels"]:
        panels.append(panel)
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
    return [p for p in panels if p.get("type") != "row"]


def github_slug(heading: str) -> str:
    """The anchor GitHub (and GitLab) give a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def playbook_anchors() -> set[str]:
    text = PLAYBOOK.read_text(encoding="utf-8")
    prose = re.sub(r"(?ms)^( *)```.*?^\1```", "", text)  # a `# comment` in a block is no heading
    return {github_slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", prose)}


def playbook_sql_blocks() -> list[str]:
    """Every ```sql block of the playbook, dedented (list items indent theirs)."""
    text = PLAYBOOK.read_text(encoding="utf-8")
    pattern = re.compile(r"(?ms)^( *)```sql\n(.*?)^\1```")
    return [textwrap.dedent(m.group(2)) for m in pattern.finditer(text)]


# --- alert rules --------------------------------------------------------------------------------


def test_alerts_parse_and_are_complete() -> None:
    rules = alert_rules()
    names = [r["alert"] for r in rules]
    assert len(names) == len(set(names)), "duplicate alert names"
    assert set(names) >= REQUIRED_ALERTS, REQUIRED_ALERTS - set(names)
    anchors = playbook_anchors()
    for rule in rules:
        name = rule["alert"]
        assert rule.get("expr"), name
        assert DURATION.match(str(rule.get("for", ""))), f"{name}: needs a `for:` duration"
        assert rule.get("labels", {}).get("severity") in SEVERITIES, name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), f"{name}: no summary"
        assert annotations.get("description"), f"{name}: no description"
        url = annotations.get("runbook_url", "")
        path, _, anchor = url.partition("#")
        assert path.endswith("docs/playbook.md"), f"{name}: runbook_url {url!r}"
        assert anchor in anchors, f"{name}: no heading #{anchor} in docs/playbook.md"


def test_alert_expressions_use_only_exported_metrics() -> None:
    exported = exported_metric_names()
    for rule in alert_rules():
        used = set(METRIC_NAME.findall(rule["expr"]))
        assert used, f"{rule['alert']}: names no mailer metric"
        assert used <= exported, f"{rule['alert']}: unknown metrics {used - exported}"


def test_every_alert_has_firing_and_quiet_promtool_cases() -> None:
    doc = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert doc["rule_files"] == ["alerts.yaml"]
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r["alert"] for r in alert_rules()}
    assert names - fires == set(), "alerts never shown firing"
    assert names - quiet == set(), "alerts never shown quiet"
    assert (fires | quiet) <= names, "tests of alerts that do not exist"


# --- dashboard ---------------------------------------------------------------------------------


def test_dashboard_panels_and_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    variables = {v["name"]: v for v in doc["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert doc["uid"] and doc["title"] and doc["schemaVersion"] >= 36
    exported = exported_metric_names()
    used: set[str] = set()
    panels = dashboard_panels()
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "duplicate panel ids"
    for panel in panels:
        title = panel.get("title")
        assert panel.get("datasource", {}).get("uid") == "${datasource}", title
        targets = panel.get("targets") or []
        assert targets, f"panel {title!r} has no target"
        for target in targets:
            assert target.get("expr"), f"panel {title!r}: empty query"
            names = set(METRIC_NAME.findall(target["expr"]))
            assert names <= exported, f"panel {title!r}: unknown metrics {names - exported}"
            used |= names
    assert used >= REQUIRED_DASHBOARD_METRICS, REQUIRED_DASHBOARD_METRICS - used
    # Whoever is paged can see on the dashboard what the alert looked at.
    for rule in alert_rules():
        shown = set(METRIC_NAME.findall(rule["expr"]))
        assert shown <= used, f"{rule['alert']}: no panel shows {shown - used}"


def test_sending_panels_count_per_hour_like_the_limits() -> None:
    # The limits are per clock hour (100/h is 0.028/s): the sending panels say per hour.
    for panel in dashboard_panels():
        for target in panel["targets"]:
            expr = target["expr"]
            if any(m in expr for m in ("mailer_emails_", "mailer_tokens_")):
                assert "* 3600" in expr, (panel["title"], expr)
                assert "per hour" in panel["title"], panel["title"]


# --- playbook ------------------------------------------------------------------------------------


def test_playbook_sections_links_and_settings() -> None:
    text = PLAYBOOK.read_text(encoding="utf-8")
    anchors = playbook_anchors()
    assert anchors >= PLAYBOOK_SECTIONS, PLAYBOOK_SECTIONS - anchors
    for link in re.findall(r"\]\(#([^)]+)\)", text):
        assert link in anchors, f"link to missing section #{link}"
    table = {name: default for name, default, _ in settings_table()}
    for name in set(re.findall(r"\bMAILER_[A-Z0-9_]*[A-Z0-9]\b", text)):
        assert name in table, f"the playbook names an unknown setting {name}"
    rows = re.findall(r"(?m)^\| `(MAILER_[A-Z0-9_]+)` \| `?([^`|]*?)`? \|", text)
    assert rows, "the playbook's limits table is missing"
    for name, default in rows:
        assert table[name] == default.strip(), f"{name}: default {default!r} != {table[name]!r}"


async def _seed(db: asyncpg.Connection) -> None:
    """A little of every table, so the playbook's statements meet rows and constraints."""
    await db.execute(
        """
        INSERT INTO campaign (id, owner_id, name, subject, body_text, status, created_at,
                              updated_at, finished_at)
        VALUES (42, 'manager-1', 'Autumn', 'News', 'Hello', 'completed_with_errors',
                now() - interval '2 hours', now(), now()),
               (43, 'manager-2', 'Winter', 'News', 'Hello', 'sending',
                now() - interval '1 hour', now(), NULL);
        INSERT INTO recipient (id, campaign_id, email, status, smtp_message_id, error,
                               sent_at, claimed_by, claimed_at, created_at, updated_at)
        VALUES (1001, 42, 'a@example.org', 'in_doubt', '<c42.r1001.0a0b0c0d@example.com>',
                'connection lost after DATA', NULL, NULL, NULL, now(), now()),
               (1002, 42, 'b@example.org', 'in_doubt', NULL,
                'owner died between claim and record; delivery unknown', NULL, NULL, NULL,
                now(), now()),
               (1003, 42, 'c@example.org', 'in_doubt', NULL, 'connection lost after DATA',
                NULL, NULL, NULL, now(), now()),
               (1004, 42, 'd@example.org', 'sent', '<c42.r1004.01020304@example.com>', NULL,
                now(), NULL, NULL, now(), now()),
               (1005, 43, 'e@example.org', 'sending', NULL, NULL, NULL, 'mailer-0', now(),
                now(), now()),
               (1006, 43, 'f@example.org', 'pending', NULL, NULL, NULL, NULL, NULL, now(),
                now());
        INSERT INTO queue_entry (campaign_id, priority, queued_at, started_at, completed_at,
                                 defer_reason, deferred_until, lease_owner, lease_until,
                                 leased_at, lease_epoch)
        VALUES (42, 0, now() - interval '2 hours', now() - interval '2 hours', now(),
                NULL, NULL, NULL, NULL, NULL, 3),
               (43, 0, now() - interval '1 hour', now() - interval '50 minutes', NULL,
                NULL, NULL, 'mailer-0', now() + interval '20 seconds',
                now() - interval '40 minutes', 1);
        INSERT INTO send_log (campaign_id, recipient_id, email, status, smtp_message_id,
                              provider_answer, error, took_ms, created_at)
        VALUES (42, 1001, 'a@example.org', 'in_doubt', '<c42.r1001.0a0b0c0d@example.com>',
                NULL, 'connection lost after DATA', 30000, now() - interval '1 hour'),
               (42, 1004, 'd@example.org', 'sent', '<c42.r1004.01020304@example.com>',
                '250 2.0.0 Ok', NULL, 40, now() - interval '1 hour'),
               (43, NULL, 'x@example.org', 'transient', NULL, '421 try later',
                '421 try later', 12, now() - interval '5 minutes');
        INSERT INTO audit_log (at, actor_id, action, campaign_id, details)
        VALUES (now(), 'system', 'campaign.status', 42,
                '{"from": "sending", "to": "completed_with_errors"}');
        """
    )


async def test_playbook_sql_runs_against_the_schema(db: asyncpg.Connection) -> None:
    blocks = playbook_sql_blocks()
    assert len(blocks) >= 10
    await _seed(db)
    failures: list[str] = []
    for block in blocks:
        # Each block runs in a transaction of its own that is rolled back; the block's
        # BEGIN;/COMMIT; lines (there for the operator) are left out for that.
        lines = [ln for ln in block.splitlines() if ln.strip().upper() not in {"BEGIN;", "COMMIT;"}]
        sql = "\n".join(lines)
        assert not re.search(r"(?i)\b(commit|rollback)\s*;", sql), f"transaction control:\n{sql}"
        # Literals and comments may hold colons: look at the code around them.
        code = re.sub(r"'(?:[^']|'')*'|--[^\n]*", "''", sql)
        assert not re.search(r"(?<!:):[a-z_]+\b|\$\d", code), f"use literal example ids:\n{sql}"
        tx = db.transaction()
        await tx.start()
        try:
            await db.execute(sql)
        except asyncpg.PostgresError as exc:
            failures.append(f"{type(exc).__name__}: {exc}\n{sql}")
        finally:
            await tx.rollback()
    assert not failures, "\n\n".join(failures)


# --- promtool ---------------------------------------------------------------------------------

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not on PATH (Debian: apt-get install prometheus); "
    "the YAML checks above ran without it",
)


def _promtool(*args: str) -> None:
    assert PROMTOOL is not None
    result = subprocess.run(
        [PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_promtool_check_rules() -> None:
    _promtool("check", "rules", str(ALERTS))


@needs_promtool
def test_promtool_test_rules() -> None:
    _promtool("test", "rules", str(ALERTS_TEST))


def _resolve_block(to: str) -> str:
    """The playbook's resolve-in-doubt block that sets recipients to ``to``."""
    (block,) = [b for b in playbook_sql_blocks() if f"SET status = '{to}'" in b and "resolved" in b]
    return "\n".join(
        ln for ln in block.splitlines() if ln.strip().upper() not in {"BEGIN;", "COMMIT;"}
    )


@pytest.mark.parametrize("to", ["sent", "pending"])
async def test_playbook_resolve_audits_only_what_it_changed(
    db: asyncpg.Connection, to: str
) -> None:
    await _seed(db)
    sql = _resolve_block(to)

    async def audits() -> list[Any]:
        return list(
            await db.fetch(
                "SELECT details FROM audit_log WHERE action = 'recipients.resolve_in_doubt'"
            )
        )

    await db.execute(sql)
    first = await audits()
    assert len(first) == 1
    details = json.loads(first[0]["details"])
    assert details["recipient_ids"] == ([1001, 1002] if to == "sent" else [1003])
    # Run again: nothing is in doubt any more among those ids, so nothing is audited.
    await db.execute(sql)
    assert len(await audits()) == 1
