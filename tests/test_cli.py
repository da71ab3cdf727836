"""The ``mailer`` client commands end to end on the embedded stack.

Commands run in-process through Click's runner (in a thread: each runs its
own event loop), except ``watch``, which runs as its own process while the
campaign it follows is started and sent.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from mailer.cli import root
from mailer.clock import FakeClock
from mailer.config import Settings


def _env(settings: Settings) -> dict[str, str]:
    return {
        "MAILER_NATS_URL": settings.nats_url,
        "MAILER_SUBJECT_PREFIX": settings.subject_prefix,
        "COLUMNS": "200",
    }


class Mailer:
    """Runs ``mailer <args>`` as manager-1 (unless told) against this test's service."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def __call__(
        self, *args: str, user: str = "manager-1", input: str | None = None, code: int = 0
    ) -> Result:
        argv = [*args, "--user", user]
        result = await asyncio.to_thread(
            CliRunner().invoke, root, argv, input=input, env=_env(self.settings)
        )
        if code >= 0:  # -1: the caller looks at the exit code itself
            assert result.exit_code == code, (
                argv,
                result.exit_code,
                result.output,
                result.exception,
            )
        return result

    async def json(self, *args: str, **kw: Any) -> Any:
        result = await self(*args, "--json", **kw)
        return json.loads(result.stdout)


@pytest.fixture
def mailer(settings: Settings) -> Mailer:
    return Mailer(settings)


CSV = (
    "email,name,city\n"
    "anna@example.org,Анна,Казань\n"
    "boris@example.org,Борис,\n"
    "no-at,Никто,Москва\n"
    "ANNA@example.org,Анна снова,Казань\n"
    ",Без адреса,Тверь\n"
    "\n"
    "gleb@example.org,Глеб,Омск,лишнее\n"
    "vera@example.org,,Сочи\n"
)


async def test_every_command_end_to_end(make_service, mailer: Mailer, sink, tmp_path) -> None:
    await make_service(start_throttle_per_hour=2)
    (tmp_path / "body.txt").write_text("Здравствуйте, {{name}} из {{city}}!", encoding="utf-8")
    (tmp_path / "notes.txt").write_text("Привет", encoding="utf-8")
    (tmp_path / "people.csv").write_text(CSV, encoding="utf-8")
    created = await mailer.json(
        "campaign", "create", "--name", "Осень", "--subject", "Новости",
        "--text", str(tmp_path / "body.txt"), "--attach", str(tmp_path / "notes.txt"),
    )  # fmt: skip
    cid = created["id"]
    assert created["status"] == "draft"

    out = (await mailer("recipients", "import", str(cid), str(tmp_path / "people.csv"))).output
    assert "Добавлено: 3, дубликатов: 1, с ошибками: 3." in out
    assert "строка 4: «no-at» — must contain exactly one @" in out
    assert "строка 6: «» — пустой адрес" in out
    assert "строка 8: «gleb@example.org» — полей больше, чем в заголовке" in out
    # stdin, JSON: everything already there.
    again = await mailer.json("recipients", "import", str(cid), "-", input=CSV)
    assert (again["added"], again["duplicates"]) == (0, 4)
    assert [i["line"] for i in again["invalid"]] == [4, 6, 8]

    page = await mailer.json("recipients", "list", str(cid))
    by_email = {r["email"]: r for r in page["items"]}
    assert by_email["anna@example.org"]["variables"] == {"city": "Казань"}
    assert by_email["vera@example.org"]["name"] is None
    out = (await mailer("recipients", "remove", str(cid), "vera@example.org", "x@y.org")).output
    assert "Удалено: 1, не удалено: 1." in out
    assert (
        "Новости 2"
        in (await mailer("campaign", "update", str(cid), "--subject", "Новости 2", "--json")).output
    )
    assert "Campaign " in (await mailer("campaign", "get", str(cid), "--lang", "en")).output
    listed = await mailer.json("campaign", "list", "--status", "draft")
    assert [c["id"] for c in listed["items"]] == [cid]
    assert "Осень" in (await mailer("campaign", "list")).output
    tested = await mailer.json("campaign", "test", str(cid), "--to", "boss@example.org")
    assert tested["status"] == "sent" and len(sink.messages) == 1

    # watch follows the campaign from before its start to its end.
    watch = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "mailer.cli", "watch", str(cid), "--user", "manager-1",
        env={**os.environ, **_env(mailer.settings)},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    started = await mailer.json("campaign", "start", str(cid))
    assert started["campaign"]["status"] in ("ready", "sending")
    async with asyncio.timeout(60):
        stdout, stderr = await watch.communicate()
    assert watch.returncode == 0, stderr.decode()
    assert f"Кампания {cid} завершена: отправлена. Отправлено 2, ошибок 0" in stdout.decode()
    assert len(sink.messages) == 3

    assert "Активной кампании нет." in (await mailer("status")).output
    assert (await mailer.json("status", "--lang", "en"))["reason_code"] == "empty"
    assert "Квота: доступно" in (await mailer("quota")).output
    assert (await mailer.json("quota", "--sync", "--roles", "admin"))["monthly_limit"] > 0
    audit = await mailer.json("audit", str(cid))
    assert "campaign.start" in [a["action"] for a in audit["items"]]
    assert "campaign.start" in (await mailer("audit", str(cid))).output
    lines = (await mailer("events", "--campaign", str(cid), "--from-start", "--count", "2")).output
    events = [json.loads(line) for line in lines.splitlines()]
    assert [e["event"]["event"] for e in events] == ["queued", "started"]
    [me] = await mailer.json("ping")
    assert me["subject_prefix"] == mailer.settings.subject_prefix and me["version"]
    assert mailer.settings.subject_prefix in (await mailer("ping")).output

    admin = {"user": "boss"}
    await mailer("unsubscribe", "add", "Zoe@example.org", "--roles", "admin", **admin)
    out = (await mailer("unsubscribe", "check", "zoe@example.org", "--lang", "en")).output
    assert "zoe@example.org: unsubscribed (cli" in out
    listed = await mailer.json("unsubscribe", "list", "--roles", "admin", **admin)
    assert [u["email"] for u in listed["items"]] == ["zoe@example.org"]
    assert "zoe@example.org" in (await mailer("unsubscribe", "list", "--roles", "admin")).output
    out = (await mailer("unsubscribe", "remove", "zoe@example.org", "--roles", "admin")).output
    assert "отписка снята" in out
    assert "не отписан" in (await mailer("unsubscribe", "check", "zoe@example.org")).output

    # Another campaign through pause, resume, cancel and delete.
    other = (await mailer.json("campaign", "create", "--name", "B", "--subject", "S",
                               "--text", "-", input="Текст"))["id"]  # fmt: skip
    await mailer("recipients", "import", str(other), "-", input="email\nq@example.org\n")
    await mailer("campaign", "start", str(other))
    assert "приостановлена" in (await mailer("campaign", "pause", str(other))).output
    await mailer("campaign", "resume", str(other))
    assert (await mailer.json("campaign", "cancel", str(other)))["status"] == "cancelled"
    # Its actor may still be letting go of the lease: campaign_busy (exit 5) says
    # "retry in a moment", and a script does exactly that.
    for _ in range(100):
        deleted = await mailer("campaign", "delete", str(other), code=-1)
        if deleted.exit_code != 5:
            break
        await asyncio.sleep(0.1)
    assert deleted.exit_code == 0, deleted.output
    assert f"Кампания {other} удалена." in deleted.output

    # Errors: the API's message, a documented exit code.
    third = (await mailer.json("campaign", "create", "--name", "C", "--subject", "S",
                               "--text", "-", input="x"))["id"]  # fmt: skip
    await mailer("recipients", "import", str(third), "-", input="email\nr@example.org\n")
    throttled = await mailer("campaign", "start", str(third), code=5)
    assert "Слишком много запусков рассылок" in throttled.stderr
    missing = await mailer("campaign", "get", "999999", code=4)
    assert "Кампания 999999 не найдена. [not_found]" in missing.stderr
    err = await mailer("campaign", "get", "999999", "--json", "--lang", "en", code=4)
    assert json.loads(err.stdout)["error"]["message"] == "Campaign 999999 not found."
    assert "Недостаточно прав" in (await mailer("unsubscribe", "list", code=4)).stderr
    unreachable = await mailer("quota", "--nats-url", "nats://127.0.0.1:1", code=6)
    assert "mailer недоступен" in unreachable.stderr
    await mailer("campaign", "get", code=2)  # a usage error: no id


NIGHT = datetime(2026, 11, 23, 17, 30, tzinfo=UTC)  # 20:30 in Moscow


async def test_status_while_deferred_in_both_languages(make_service, mailer: Mailer) -> None:
    await make_service(
        clock=FakeClock(NIGHT), working_hours_start="09:00", working_hours_end="18:00"
    )
    cid = (await mailer.json("campaign", "create", "--name", "Ночь", "--subject", "S",
                             "--text", "-", input="x"))["id"]  # fmt: skip
    await mailer("recipients", "import", str(cid), "-", input="email\na@example.org\n")
    out = (await mailer("campaign", "start", str(cid))).output
    assert "Внимание: Сейчас нерабочее время" in out
    view = await mailer.json("status")
    for _ in range(100):  # the deferral is written by the campaign actor, just after the start
        if view["reason_code"] == "outside_hours":
            break
        await asyncio.sleep(0.05)
        view = await mailer.json("status")
    assert view["reason_code"] == "outside_hours" and view["next_run_at"]
    ru = (await mailer("status")).output
    assert f"Активная кампания: {cid} «Ночь»" in ru
    assert "Сейчас вне рабочего времени (9:00-18:00 МСК). Продолжим завтра в 09:00 МСК." in ru
    assert "Продолжим " in ru and "через" in ru
    en = (await mailer("status", "--lang", "en")).output
    assert "Outside working hours (9:00-18:00 MSK). We continue tomorrow at 09:00 MSK." in en
    assert "We go on " in en
    got = (await mailer("campaign", "get", str(cid))).output
    assert "outside_hours" in got


def test_help_on_every_command() -> None:
    """Every command and option says what it is for; --version answers."""
    runner = CliRunner()
    assert runner.invoke(root, ["--version"]).output.startswith("mailer, version ")

    def walk(group: Any, path: list[str]) -> None:
        for name, command in group.commands.items():
            assert command.help, [*path, name]
            for param in command.params:
                if param.param_type_name == "option":
                    assert param.help, ([*path, name], param.name)
            result = runner.invoke(root, [*path, name, "--help"])
            assert result.exit_code == 0, (path, name, result.output)
            if hasattr(command, "commands"):
                walk(command, [*path, name])

    walk(root, [])
    names = set(root.commands)
    assert {"campaign", "recipients", "status", "watch", "quota", "unsubscribe"} <= names
    assert {"audit", "events", "ping", "run", "migrate", "dev", "demo"} <= names
    campaign = root.commands["campaign"]
    assert set(campaign.commands) == {  # type: ignore[attr-defined]
        "create", "update", "get", "list", "start", "pause", "resume", "cancel", "delete", "test",
    }  # fmt: skip


def test_a_campaign_file_that_does_not_exist_is_a_usage_error(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        root, ["recipients", "import", "1", str(tmp_path / "none.csv")], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 2 and "none.csv" in result.stderr


def _doc_cli_lines() -> list[list[str]]:
    import shlex

    root_dir = Path(__file__).resolve().parent.parent
    found = []
    for doc in ("README.md", "docs/playbook.md"):
        text = (root_dir / doc).read_text(encoding="utf-8")
        for block in re.findall(r"```sh\n(.*?)```", text, re.DOTALL):
            for line in block.splitlines():
                if line.strip().startswith("mailer ") and "<" not in line:
                    found.append(shlex.split(line.strip(), comments=True)[1:])
    return found


@pytest.mark.parametrize("argv", _doc_cli_lines(), ids=" ".join)
def test_mailer_lines_of_the_readme_and_playbook_parse(argv: list[str]) -> None:
    """Click parses every option before it answers --help: a wrong one would exit 2."""
    result = CliRunner().invoke(root, [*argv, "--help"])
    assert result.exit_code == 0, (argv, result.output)
