"""docs/api.md stays true: every subject documented, every example a valid request, the
Python client runs against a real service."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import msgspec
import pytest

from mailer.api.routes import routes
from mailer.config import Settings
from mailer.errors import CODES

DOC = (Path(__file__).parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
ROUTES = {r.subject: r for r in routes(Settings())}
CLI = re.compile(r"^nats req mailer\.(\S+) '(.*?)'", re.MULTILINE)
PY = re.compile(r'^await call\("([^"]+)", (\{.*?\})(?:, [a-z]+=.*)?\)$', re.MULTILINE)


def test_every_subject_and_error_code_is_documented() -> None:
    headings = set(re.findall(r"^### (\S+)$", DOC, re.MULTILINE))
    assert set(ROUTES) <= headings
    for code in CODES:
        assert f"`{code}`" in DOC, code


@pytest.mark.parametrize("subject,body", CLI.findall(DOC))
def test_cli_examples_are_valid_requests(subject: str, body: str) -> None:
    msgspec.json.decode(body.encode(), type=ROUTES[subject].request, strict=True)


def test_python_examples_are_valid_requests() -> None:
    found = PY.findall(DOC)
    assert len(found) >= len(ROUTES) - 1  # attachments.add builds its content in code
    for subject, body in found:
        if subject == "attachments.add":
            continue  # its content is computed (base64 of the file)
        value = ast.literal_eval(body)
        msgspec.json.decode(json.dumps(value).encode(), type=ROUTES[subject].request, strict=True)


async def test_python_client_runs(make_service, settings, sink) -> None:
    await make_service()
    [block] = [
        b for b in re.findall(r"```python\n(.*?)```", DOC, re.DOTALL) if "async def main" in b
    ]
    code = block.replace("nats://127.0.0.1:4222", settings.nats_url)
    code = code.replace('f"mailer.{subject}"', f'f"{settings.subject_prefix}.{{subject}}"')
    code = code.replace("asyncio.run(main())", "")
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/api.md", "exec"), namespace)
    await namespace["main"]()  # type: ignore[operator]
