"""Hostile input, property-based: every endpoint, thousands of malformed requests.

Properties, for every request Hypothesis makes up (random bytes, random JSON,
valid requests with fields dropped, added or replaced by hostile values,
oversized payloads, odd or missing headers):

- the reply is JSON: a valid reply, or the one error shape with a known code
  (never ``internal_error``), a message, and the micro error headers;
- an error reply writes nothing: the row count of every table is unchanged
  (the engine's own asynchronous writes -- ``system`` audit rows, campaign
  send-log rows -- are left out of the count; a failed test email is logged
  on purpose and is the one error that writes);
- the service keeps serving: valid requests and discovery work afterwards,
  and no handler ever raised (micro's ``num_errors`` stays 0).

Hypothesis runs in a worker thread (its engine is synchronous); each example
is sent on the test's event loop with ``run_coroutine_threadsafe``.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from datetime import UTC, datetime
from typing import Any

import msgspec
import msgspec.inspect as mi
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailer.api.routes import SMALL_PAYLOAD, Route, routes
from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER, LANG_HEADER, ROLES_HEADER, USER_HEADER
from mailer.clock import FakeClock
from mailer.config import Settings
from mailer.errors import CODES
from mailer.texts import TEXTS
from tests.helpers import Crm, people

EXAMPLES = 3000
FUZZER = "fuzzer"

HOSTILE_TEXT = st.one_of(
    st.text(max_size=40),
    st.sampled_from(
        [
            "",
            " ",
            "\r\n",
            "x\r\nBcc: victim@example.org",
            "subject\n",
            "a\x00b",
            "{{name}}",
            "<script>alert(1)</script>",
            "'; DROP TABLE campaign; --",
            "😀" * 20,
            "ru@пример.рф",
            "a@b",
            "user@example.org",
            "x" * 5000,
            "draft",
            "sending",
            "admin",
            "text/plain",
            "../../etc/passwd",
        ]
    ),
    st.binary(max_size=40).map(lambda b: base64.b64encode(b).decode()),
)
# Short strings mostly made of the characters that break things.
SPECIAL_TEXT = st.text(
    alphabet=st.sampled_from(
        ["a", "\x00", "\r", "\n", "\x01", "\t", "я", "😀", "{", "}", "<", "@", " "]
    ),
    max_size=12,
)
HOSTILE_TEXT = st.one_of(HOSTILE_TEXT, SPECIAL_TEXT)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, 1, -1, 2**31, 2**63 - 1, 2**63, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False),
    HOSTILE_TEXT,
)
JSON = st.recursive(
    LEAVES,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
HEADERS = st.fixed_dictionaries(
    {
        USER_HEADER: st.sampled_from([*[FUZZER] * 8, "stranger", "", " ", "a" * 300]),
        ROLES_HEADER: st.sampled_from(["", "", "admin", "viewer, admin", ",,,"]),
        LANG_HEADER: st.sampled_from(["", "en", "ru", "EN-us", "zz"]),
    }
).map(lambda h: {k: v for k, v in h.items() if v})


def _templates(cid: int) -> dict[str, dict[str, Any]]:
    """A valid request per subject, on the fuzzer's own campaign: mutations start here."""
    ref = {"campaign_id": cid}
    return {
        "campaign.create": {"name": "n", "subject": "s", "body_text": "b"},
        "campaign.update": {**ref, "name": "n"},
        "campaign.get": ref,
        "campaign.list": {"limit": 5},
        "campaign.delete": ref,
        "campaign.start": ref,
        "campaign.pause": ref,
        "campaign.resume": ref,
        "campaign.cancel": ref,
        "campaign.test": {**ref, "email": "t@example.org"},
        "manager.status": {},
        "recipients.add": {**ref, "recipients": [{"email": "a@example.org"}]},
        "recipients.list": ref,
        "recipients.remove": {**ref, "emails": ["a@example.org"]},
        "attachments.add": {
            **ref,
            "filename": "a.txt",
            "content_type": "text/plain",
            "content": "aGk=",
        },
        "attachments.list": ref,
        "attachments.remove": {**ref, "attachment_id": 1},
        "unsubscribe.add": {"email": "a@example.org"},
        "unsubscribe.remove": {"email": "a@example.org"},
        "unsubscribe.check": {"email": "a@example.org"},
        "unsubscribe.list": {},
        "quota.get": {},
        "quota.sync": {},
        "audit.list": ref,
    }


@st.composite
def _request(
    draw: st.DrawFn, all_routes: list[Route], templates: dict[str, dict[str, Any]], cid: int
) -> tuple[str, bytes, dict[str, str]]:
    route = draw(st.sampled_from(all_routes))
    template = templates[route.subject]
    kind = draw(
        st.sampled_from(["junk", "json", "mutant", "shaped", "shaped", "shaped", "oversized"])
    )
    if kind == "shaped":
        payload = msgspec.json.encode(draw(_shaped(mi.type_info(route.request), cid)))
    elif kind == "junk":
        payload = draw(st.binary(max_size=300))
    elif kind == "json":
        payload = msgspec.json.encode(draw(JSON))
    elif kind == "oversized" and route.max_payload <= SMALL_PAYLOAD:
        pad = "x" * (route.max_payload + draw(st.integers(1, 1000)))
        payload = msgspec.json.encode({**template, "pad": pad})
    else:
        body = dict(template)
        fields = sorted(set(body) | set(route.request.__struct_fields__))
        for _ in range(draw(st.integers(1, 3))):
            op = draw(st.sampled_from(["drop", "add", "replace", "replace", "replace"]))
            if op == "drop" and body:
                del body[draw(st.sampled_from(sorted(body)))]
            elif op == "add" or not fields:
                body[draw(st.text(min_size=1, max_size=12))] = draw(JSON)
            else:
                field = draw(st.sampled_from(fields))
                hostile = st.one_of(JSON, st.lists(st.dictionaries(st.text(max_size=8), JSON)))
                body[field] = draw(hostile)
        payload = msgspec.json.encode(body)
    return route.subject, payload, draw(HEADERS)


ADDRESSES = st.sampled_from(
    ["a@example.org", "Anna@Example.ORG", "борис@пример.рф", "x@y", "no-at", "a\x00@example.org"]
)


def _shaped(t: mi.Type, cid: int, field: str = "") -> st.SearchStrategy[Any]:
    """Values of the request's own shape that mostly pass its constraints.

    They get past strict decoding into the operations, carrying what the
    constraints allow but the operations might not expect: NUL and control
    characters, any Unicode, markup, injection attempts, ids near the limits.
    """
    if field == "campaign_id":
        return st.one_of(st.just(cid), st.integers(1, 10), st.just(2**63 - 1))
    if field in ("email", "emails") and isinstance(t, mi.StrType):
        return st.one_of(ADDRESSES, st.text(max_size=40))
    if isinstance(t, mi.StrType):
        lo, hi = t.min_length or 0, min(t.max_length or 60, 60)
        if t.pattern:
            text = st.from_regex(t.pattern, fullmatch=True)
        else:
            text = st.one_of(st.text(max_size=hi), SPECIAL_TEXT, HOSTILE_TEXT)
        return text.filter(lambda v: lo <= len(v) <= (t.max_length or 10**9))
    if isinstance(t, mi.IntType):
        lo = t.ge if t.ge is not None else -(2**63)
        hi = t.le if t.le is not None else 2**63 - 1
        return st.integers(lo, hi)
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=200)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(_shaped(x, cid, field) for x in t.types))
    if isinstance(t, mi.ListType):
        lo = t.min_length or 0
        return st.lists(_shaped(t.item_type, cid, field), min_size=lo, max_size=max(lo, 4))
    if isinstance(t, mi.DictType):
        return st.dictionaries(_shaped(t.key_type, cid), _shaped(t.value_type, cid), max_size=4)
    if isinstance(t, mi.StructType):
        required = {f.encode_name: _shaped(f.type, cid, f.name) for f in t.fields if f.required}
        optional = {f.encode_name: _shaped(f.type, cid, f.name) for f in t.fields if not f.required}
        return st.fixed_dictionaries(required, optional=optional)
    raise AssertionError(f"no strategy for {t}")


async def _row_counts(db: Any) -> dict[str, int]:
    tables = [
        r["table_name"]
        for r in await db.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' "
            "AND table_name <> 'schema_migration' ORDER BY table_name"
        )
    ]
    # The engine writes these by itself (campaign actors, the scheduler): only
    # the API's kind of row is counted there.
    where = {"audit_log": "WHERE actor_id <> 'system'", "send_log": "WHERE is_test"}
    sql = " UNION ALL ".join(
        f"SELECT '{t}' AS t, count(*)::bigint AS n FROM {t} {where.get(t, '')}" for t in tables
    )
    return {r["t"]: int(r["n"]) for r in await db.fetch(sql)}


def test_every_error_code_has_its_texts() -> None:
    for code in CODES:
        keys = [k for k in TEXTS if k == code or k.startswith(f"{code}_")]
        assert keys, code
        assert all(set(TEXTS[k]) == {"ru", "en"} for k in keys), code


async def test_hostile_requests_get_structured_errors_and_write_nothing(
    make_service, nc, crm: Crm, db, settings: Settings
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    service = await make_service(clock=clock)
    cid = await crm.campaign(people(3), user=FUZZER)
    all_routes = routes(service.settings)
    templates = _templates(cid)
    assert set(templates) == {r.subject for r in all_routes}, "a template for every endpoint"
    loop = asyncio.get_running_loop()
    seen: dict[str, int] = {}

    async def probe(subject: str, payload: bytes, headers: dict[str, str]) -> None:
        before = await _row_counts(db)
        reply = await nc.request(
            f"{settings.subject_prefix}.{subject}", payload, headers=headers, timeout=15
        )
        data = json.loads(reply.data)
        assert isinstance(data, dict)
        reply_headers = reply.headers or {}
        if ERROR_CODE_HEADER not in reply_headers:
            assert "error" not in data
            seen["ok"] = seen.get("ok", 0) + 1
            return
        assert set(data) == {"error"}
        error = data["error"]
        code = error["code"]
        seen[code] = seen.get(code, 0) + 1
        assert code != "internal_error", (subject, payload[:200], data)
        assert code in CODES, code
        assert int(reply_headers[ERROR_CODE_HEADER]) == CODES[code]
        assert error["message"] and error["message"] != code  # a human text, not the key
        assert reply_headers[ERROR_HEADER]
        assert 400 <= int(reply_headers[ERROR_CODE_HEADER]) < 600
        if code != "test_email_failed":
            assert await _row_counts(db) == before, (subject, payload[:200], code)

    @settings_for_run
    @given(_request(all_routes, templates, cid))
    def run(request: tuple[str, bytes, dict[str, str]]) -> None:
        asyncio.run_coroutine_threadsafe(probe(*request), loop).result(timeout=60)

    began = time.monotonic()
    await asyncio.to_thread(run)
    took = time.monotonic() - began
    print(f"\nhypothesis: {EXAMPLES} examples in {took:.1f}s; replies by code: {seen}")
    assert sum(seen.values()) >= EXAMPLES
    assert seen.get("validation_error", 0) > 100 and seen.get("bad_request", 0) > 50

    # Still serving, and no handler ever raised.
    created = await crm.call("campaign.create", {"name": "after", "subject": "s", "body_text": "b"})
    assert (await crm.get(created["id"]))["status"] == "draft"
    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox)
    await nc.publish("$SRV.STATS.mailer", b"", reply=inbox)
    while True:
        stats = json.loads((await sub.next_msg(timeout=5)).data)
        if stats["metadata"]["subject_prefix"] == settings.subject_prefix:
            break
    assert all(e["num_errors"] == 0 for e in stats["endpoints"]), stats["endpoints"]
    assert sum(e["num_requests"] for e in stats["endpoints"]) >= EXAMPLES


settings_for_run = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
