"""What a report says: RFC 3464 DSNs, RFC 5965 (ARF) complaints, and the rest.

``parse_report`` reads one inbound message and answers with its kind:

- a ``multipart/report; report-type=delivery-status`` (RFC 3464): ``hard``
  when a recipient block says ``Action: failed`` with a 5.x.x status, ``soft``
  for a 4.x.x status or ``Action: delayed``; ``delivered``/``relayed``/
  ``expanded`` notices are no bounce (``None``);
- a ``multipart/report; report-type=feedback-report`` (RFC 5965): a
  ``complaint`` for every feedback type but ``not-spam``;
- anything else goes to ``flufl.bounce``, which knows the non-standard bounce
  formats of many MTAs: a permanent failure it finds is ``hard``, a temporary
  one ``soft``; what it does not recognize is ``None``.

It also collects every VERP address (``bounce+<token>@...``) the report
carries (the original message's Return-Path, inside a complaint above all):
the caller trusts only those whose token verifies.

The stdlib parser in its ``compat32`` policy is used because that is what
flufl.bounce expects; a malformed message yields ``None``, never an exception.
"""

from __future__ import annotations

import email
import email.policy
import re
from dataclasses import dataclass
from email.message import Message
from typing import Literal

from flufl.bounce import all_failures

__all__ = ["Kind", "Report", "parse_report"]

Kind = Literal["hard", "soft", "complaint"]

_VERP = re.compile(rb"bounce\+[a-z2-7]{31}@[A-Za-z0-9.\-]+", re.IGNORECASE)
_FIELD = re.compile(r"^([A-Za-z\-]+)\s*:\s*(.*?)\s*$", re.MULTILINE)
_DETAIL_CHARS = 300


@dataclass(frozen=True)
class Report:
    kind: Kind | None  # None: not a bounce or complaint we act on
    detail: str  # status and diagnostic, or the feedback type (short, for the record)
    format: Literal["dsn", "arf", "other", "unrecognized"]
    verp: tuple[str, ...]  # bounce addresses found inside, unverified


def _fields(part: Message) -> list[dict[str, str]]:
    """The field blocks of a message/delivery-status or message/feedback-report part."""
    payload = part.get_payload()
    blocks: list[Message] = (
        [p for p in payload if isinstance(p, Message)] if isinstance(payload, list) else []
    )
    if blocks:
        return [{k.lower(): str(v) for k, v in b.items()} for b in blocks]
    text = part.get_payload(decode=True)
    raw = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(payload)
    out: list[dict[str, str]] = []
    for chunk in re.split(r"\r?\n\s*\r?\n", raw):
        found = {k.lower(): v for k, v in _FIELD.findall(chunk)}
        if found:
            out.append(found)
    return out


def _dsn(part: Message) -> tuple[Kind | None, str]:
    hard: list[str] = []
    soft: list[str] = []
    for block in _fields(part):
        action = block.get("action", "").strip().lower()
        status = block.get("status", "").strip().split(" ")[0]
        if not action:
            continue  # the per-message block
        note = f"{action} {status} {block.get('diagnostic-code', '')}".strip()
        if action == "failed" and status.startswith("5"):
            hard.append(note)
        elif action in ("failed", "delayed"):
            soft.append(note)
    if hard:
        return "hard", hard[0]
    if soft:
        return "soft", soft[0]
    return None, ""


def _arf(part: Message) -> tuple[Kind | None, str]:
    for block in _fields(part):
        kind = block.get("feedback-type", "").strip().lower()
        if kind:
            return (None if kind == "not-spam" else "complaint"), f"feedback-type {kind}"
    return None, ""


def parse_report(data: bytes) -> Report:
    verp = tuple(dict.fromkeys(m.decode("ascii").lower() for m in _VERP.findall(data)))
    try:
        msg = email.message_from_bytes(data, policy=email.policy.compat32)
    except Exception:  # the parser is lenient; this is belt and braces
        return Report(None, "unparsable", "unrecognized", verp)
    if msg.get_content_type() == "multipart/report":
        report_type = (msg.get_param("report-type") or "").__str__().lower()
        for part in msg.walk():
            ctype = part.get_content_type()
            if report_type == "delivery-status" and ctype == "message/delivery-status":
                kind, detail = _dsn(part)
                return Report(kind, detail[:_DETAIL_CHARS], "dsn", verp)
            if report_type == "feedback-report" and ctype == "message/feedback-report":
                kind, detail = _arf(part)
                return Report(kind, detail[:_DETAIL_CHARS], "arf", verp)
    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # a heuristic detector choking on odd input: not a bounce we know
        return Report(None, "unrecognized", "unrecognized", verp)
    if permanent:
        return Report("hard", "non-standard bounce (permanent)", "other", verp)
    if temporary:
        return Report("soft", "non-standard bounce (temporary)", "other", verp)
    return Report(None, "unrecognized", "unrecognized", verp)
