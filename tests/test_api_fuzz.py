"""Hostile input, property-based: every endpoint, thousands of malformed requests.

Properties, for every request Hypothesis makes up (random bytes, random JSON,
valid requests, valid requests with fields dropped, added or replaced by
hostile values, oversized payloads, odd or missing headers):

- the reply is JSON: a valid reply, or the one error shape with a known code
  (never ``internal_error``), a message, and the micro error headers;
- a request over its subject's size limit, and only such a request, gets
  ``payload_too_large``;
- an error reply writes nothing: a checksum of the contents of every table
  and of every Redis key of the service (throttle windows, rate counters) is
  the same after it as before (a failed test email is logged on purpose and
  is the one error that writes: its send-log row is checked instead);
- the service keeps serving: valid requests and discovery work afterwards,
  and no handler ever raised (micro's ``num_errors`` stays 0).

Hostile input must reach the deep code paths, not bounce off a missing
campaign: requests name standing campaigns of the fuzzer in every state
(draft with recipients and an attachment, ready, paused, sending, cancelled,
and another owner's draft). A request that moves one out of its state
(start, pause, cancel, delete, ...) is fine; the campaign is then re-created
in that state before the next request. Ids in the generated requests are
placeholders the probe replaces with the current ids. Every endpoint must
have succeeded at least once by the end.

To compare exact checksums nothing else may write meanwhile: another "pod"
(this test) holds the leader lease, so this service runs no scheduler and no
campaign; the sending campaign is one "another pod" is sending. The clock
moves a second per request, so even a rewrite of identical values shows in
``updated_at``.

Hypothesis runs in a worker thread (its engine is synchronous); each example
is sent on the test's event loop with ``run_coroutine_threadsafe``. Examples
are not shrunk: the service's state moves on between them, so a shrunk
example would not reproduce; the failure names the request instead.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import msgspec
import msgspec.inspect as mi
import redis.asyncio as redis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from nats.aio.client import Client

from mailer.actors.leader import KEY, bucket_name
from mailer.api.routes import Route, routes
from mailer.bus import ERROR_CODE_HEADER, ERROR_HEADER, LANG_HEADER, ROLES_HEADER, USER_HEADER
from mailer.clock import FakeClock
from mailer.config import Settings
from mailer.errors import CODES
from mailer.messages import imports_bucket
from mailer.texts import TEXTS
from tests.helpers import Crm, people

EXAMPLES = 2000
FUZZER = "fuzzer"
OTHER_OWNER = "manager-2"
# Who re-creates the standing campaigns (an admin with a start throttle of its own).
SETUP = {"user": "setup", "roles": "admin"}
LEADER_TTL = 600.0

# The standing campaigns, by the status each is kept in.
SLOT_STATUS = {
    "draft": "draft",
    "ready": "ready",
    "paused": "paused",
    "sending": "sending",
    "cancelled": "cancelled",
    "other": "draft",
}
# Placeholders in generated requests, replaced by the slot's current id (and
# its draft's first attachment) just before sending.
PLACEHOLDER = {name: 8_765_432_100_000_000 + i for i, name in enumerate(SLOT_STATUS, 1)}
ATTACHMENT_PLACEHOLDER = 8_765_432_100_000_100
# The file the tour uploads before its recipients.import (the service deletes it after each
# import, so the hostile requests naming it find nothing: import_not_found).
TOUR_IMPORT = "fuzz-tour.csv"
ANY_SLOT = st.sampled_from(list(PLACEHOLDER.values()))
P = PLACEHOLDER
# The ready slot's scheduled start: within a year of the test's clock.
SCHEDULED_AT = "2027-06-01T09:00:00+03:00"

# Subjects that only read: their successes write nothing either.
READS = {
    "campaign.get",
    "campaign.list",
    "manager.status",
    "recipients.list",
    "attachments.list",
    "unsubscribe.check",
    "unsubscribe.list",
    "suppression.check",
    "suppression.list",
    "quota.get",
    "audit.list",
}

# Errors that say the environment failed, not the request: never expected here.
NEVER = {
    "internal_error",
    "governor_unavailable",
    "sender_unavailable",
    "throttle_backend_unavailable",
    "quota_sync_unavailable",
    "quota_sync_failed",
}

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
# Callers allowed to act on the fuzzer's campaigns (and on admin-only subjects, 2 of 3).
GOOD_HEADERS = st.tuples(
    st.sampled_from(
        [
            {USER_HEADER: FUZZER},
            {USER_HEADER: FUZZER, ROLES_HEADER: "admin"},
            {USER_HEADER: "boss", ROLES_HEADER: "admin"},
        ]
    ),
    st.sampled_from([{}, {LANG_HEADER: "en"}]),
).map(lambda t: t[0] | t[1])
WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyzабвгдеёжз 0123456789", min_size=1, max_size=30)
GOOD_EMAIL = st.sampled_from(
    ["t@example.org", "Anna@Example.ORG", "борис@пример.рф", "a@example.org", "user0@example.org"]
)


def _valid() -> dict[str, st.SearchStrategy[dict[str, Any]]]:
    """A valid request per subject (on the standing campaigns): mutations start here."""
    fd = st.fixed_dictionaries

    def ref(*slots: str) -> st.SearchStrategy[dict[str, Any]]:
        ids = st.sampled_from([P[s] for s in slots]) if slots else ANY_SLOT
        return fd({"campaign_id": ids})

    text = fd({"name": WORD, "subject": WORD}, optional={"body_text": WORD, "body_html": WORD})
    return {
        "campaign.create": text.map(
            lambda b: b if "body_text" in b or "body_html" in b else {**b, "body_text": "b"}
        ),
        "campaign.update": fd(
            {"campaign_id": ANY_SLOT},
            optional={
                "name": WORD,
                "subject": WORD,
                "body_text": st.one_of(WORD, st.none()),
                "priority": st.integers(-100, 100),
            },
        ).map(lambda b: b if len(b) > 1 else {**b, "name": "n"}),
        "campaign.get": ref(),
        "campaign.list": fd(
            {},
            optional={
                "limit": st.integers(1, 500),
                "owner_id": st.just(FUZZER),
                "status": st.lists(st.sampled_from(sorted(set(SLOT_STATUS.values())))),
            },
        ),
        "campaign.delete": ref("draft", "paused", "cancelled", "sending", "sending", "ready"),
        "campaign.start": ref("draft", "draft", "draft", "ready"),
        "campaign.pause": ref("ready", "ready", "sending", "paused"),
        "campaign.resume": ref("paused", "paused", "paused", "ready"),
        "campaign.cancel": ref(),
        "campaign.test": fd(
            {"campaign_id": st.sampled_from([P["draft"], P["draft"], P["other"]])},
            optional={"name": WORD, "variables": st.dictionaries(WORD, WORD, max_size=2)},
        ).flatmap(lambda b: GOOD_EMAIL.map(lambda e: {**b, "email": e})),
        "manager.status": fd({}, optional={"owner_id": st.just(FUZZER)}),
        "recipients.add": fd(
            {
                "campaign_id": st.sampled_from([P["draft"], P["ready"], P["paused"], P["sending"]]),
                "recipients": st.lists(
                    fd({"email": GOOD_EMAIL}, optional={"name": WORD}), min_size=1, max_size=3
                ),
            }
        ),
        "recipients.import": fd(
            {
                "campaign_id": st.sampled_from([P["draft"], P["ready"], P["paused"], P["sending"]]),
                "object": st.just(TOUR_IMPORT),
            },
            optional={"format": st.sampled_from(["csv", "jsonl"])},
        ),
        "recipients.list": ref(),
        "recipients.remove": fd(
            {"campaign_id": ANY_SLOT, "emails": st.lists(GOOD_EMAIL, min_size=1, max_size=3)}
        ),
        "attachments.add": fd(
            {
                "campaign_id": st.sampled_from([P["draft"], P["draft"], P["paused"], P["other"]]),
                "filename": WORD.filter(lambda w: w.strip() == w),
                "content_type": st.sampled_from(["text/plain", "application/pdf"]),
                "content": st.binary(max_size=64).map(lambda b: base64.b64encode(b).decode()),
            }
        ),
        "attachments.list": ref(),
        "attachments.remove": fd(
            {"campaign_id": st.just(P["draft"]), "attachment_id": st.just(ATTACHMENT_PLACEHOLDER)}
        ),
        "unsubscribe.add": fd({"email": GOOD_EMAIL}, optional={"source": WORD}),
        "unsubscribe.remove": fd({"email": GOOD_EMAIL}),
        "unsubscribe.check": fd({"email": GOOD_EMAIL}),
        "unsubscribe.list": fd({}, optional={"limit": st.integers(1, 500)}),
        "suppression.add": fd({"email": GOOD_EMAIL}, optional={"detail": WORD}),
        "suppression.remove": fd({"email": GOOD_EMAIL}),
        "suppression.check": fd({"email": GOOD_EMAIL}),
        "suppression.list": fd(
            {},
            optional={
                "limit": st.integers(1, 500),
                "reason": st.sampled_from(["manual", "complaint", "unsubscribed"]),
            },
        ),
        "campaign.unschedule": ref("ready", "ready", "ready", "draft", "paused"),
        "campaign.retry_failed": fd(
            {"campaign_id": ANY_SLOT}, optional={"permanent": st.booleans()}
        ),
        "recipients.resolve": fd(
            {
                "campaign_id": ANY_SLOT,
                "recipient_ids": st.lists(st.integers(1, 10**6), min_size=1, max_size=3),
                "to": st.sampled_from(["sent", "failed", "retry"]),
            },
            optional={"note": WORD},
        ),
        "quota.get": st.just({}),
        "quota.sync": st.just({}),
        # A large allowance: the tour's test emails must not run out of quota.
        "quota.set": st.just({"monthly_limit": 1_000_000_000}),
        "limits.reload": st.just({}),
        "audit.list": ref(),
    }


VALID = _valid()

# Valid requests the test itself sends between the generated ones, in turn,
# each expected to succeed: every endpoint works on the standing campaigns,
# and the campaigns keep moving (started, paused, resumed, cancelled, deleted
# and re-created) under the hostile requests that follow.
TOUR_EVERY = 8
TOUR: list[tuple[str, dict[str, Any]]] = [
    ("campaign.create", {"name": "tour", "subject": "s", "body_text": "b"}),
    ("campaign.start", {"campaign_id": P["draft"]}),
    ("campaign.update", {"campaign_id": P["ready"], "name": "tour", "priority": 1}),
    ("campaign.get", {"campaign_id": P["sending"]}),
    ("campaign.pause", {"campaign_id": P["ready"]}),
    ("campaign.list", {"limit": 5, "owner_id": FUZZER}),
    ("campaign.resume", {"campaign_id": P["paused"]}),
    ("campaign.test", {"campaign_id": P["draft"], "email": "t@example.org", "name": "T"}),
    ("campaign.cancel", {"campaign_id": P["sending"]}),
    ("manager.status", {}),
    ("campaign.delete", {"campaign_id": P["cancelled"]}),
    ("recipients.add", {"campaign_id": P["paused"], "recipients": [{"email": "n@example.org"}]}),
    ("recipients.import", {"campaign_id": P["paused"], "object": TOUR_IMPORT}),
    ("recipients.list", {"campaign_id": P["paused"], "limit": 2}),
    ("recipients.remove", {"campaign_id": P["ready"], "emails": ["user0@example.org"]}),
    (
        "attachments.add",
        {
            "campaign_id": P["draft"],
            "filename": "t.txt",
            "content_type": "text/plain",
            "content": "aGk=",
        },
    ),
    ("attachments.list", {"campaign_id": P["draft"]}),
    ("attachments.remove", {"campaign_id": P["draft"], "attachment_id": ATTACHMENT_PLACEHOLDER}),
    ("unsubscribe.add", {"email": "t@example.org"}),
    ("unsubscribe.check", {"email": "t@example.org"}),
    ("unsubscribe.list", {"limit": 3}),
    ("unsubscribe.remove", {"email": "t@example.org"}),
    ("suppression.add", {"email": "t@example.org", "detail": "tour"}),
    ("suppression.check", {"email": "t@example.org"}),
    ("suppression.list", {"limit": 3}),
    ("suppression.remove", {"email": "t@example.org"}),
    ("campaign.unschedule", {"campaign_id": P["ready"]}),
    ("campaign.retry_failed", {"campaign_id": P["paused"]}),
    ("recipients.resolve", {"campaign_id": P["sending"], "recipient_ids": [1], "to": "sent"}),
    ("quota.get", {}),
    ("quota.sync", {}),
    ("quota.set", {"monthly_limit": 1_000_000_000}),
    ("limits.reload", {}),
    ("audit.list", {"campaign_id": P["draft"]}),
    ("campaign.delete", {"campaign_id": P["draft"]}),
]
TOUR_HEADERS = {USER_HEADER: FUZZER, ROLES_HEADER: "admin"}


@st.composite
def _request(draw: st.DrawFn, all_routes: list[Route]) -> tuple[str, bytes, dict[str, str]]:
    route = draw(st.sampled_from(all_routes))
    template = draw(VALID[route.subject])
    kind = draw(
        st.sampled_from(
            # Hypothesis favours the first: valid requests move the campaigns around.
            ["valid", "shaped", "mutant", "junk", "json", "shaped", "mutant", "oversized"]
        )
    )
    headers = draw(GOOD_HEADERS if kind == "valid" else HEADERS)
    if kind == "valid":
        payload = msgspec.json.encode(template)
    elif kind == "shaped":
        payload = msgspec.json.encode(draw(_shaped_request(route.request)))
    elif kind == "junk":
        payload = draw(st.binary(max_size=300))
    elif kind == "json":
        payload = msgspec.json.encode(draw(JSON))
    elif kind == "oversized":
        # Every subject, the 4 MiB ones and attachments.add's too. Placeholders
        # shrink when replaced: the margin keeps the request over its limit.
        pad = "x" * (route.max_payload + draw(st.integers(200, 5000)))
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
    return route.subject, payload, headers


ADDRESSES = st.sampled_from(
    ["a@example.org", "Anna@Example.ORG", "борис@пример.рф", "x@y", "no-at", "a\x00@example.org"]
)


@functools.cache
def _shaped_request(request: type[Any]) -> st.SearchStrategy[Any]:
    return _shaped(mi.type_info(request))


def _shaped(t: mi.Type, field: str = "") -> st.SearchStrategy[Any]:
    """Values of the request's own shape that mostly pass its constraints.

    They get past strict decoding into the operations, carrying what the
    constraints allow but the operations might not expect: NUL and control
    characters, any Unicode, markup, injection attempts, ids near the limits.
    """
    if field == "campaign_id":
        return st.one_of(ANY_SLOT, st.integers(1, 10), st.just(2**63 - 1))
    if field == "attachment_id":
        return st.one_of(st.just(ATTACHMENT_PLACEHOLDER), st.integers(1, 10), st.just(2**63 - 1))
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
    if isinstance(t, mi.DateTimeType):
        # Past, near, far, and without an offset (refused), as RFC 3339 text.
        return st.one_of(
            st.datetimes(timezones=st.just(UTC)),
            st.datetimes(),
            st.sampled_from([SCHEDULED_AT, "2026-11-23T10:15:00+00:00"]),
        ).map(lambda v: v if isinstance(v, str) else v.isoformat())
    if isinstance(t, mi.BytesType):
        return st.binary(max_size=200)
    if isinstance(t, mi.BoolType):
        return st.booleans()
    if isinstance(t, mi.NoneType):
        return st.none()
    if isinstance(t, mi.LiteralType):
        return st.sampled_from(t.values)
    if isinstance(t, mi.UnionType):
        return st.one_of(*(_shaped(x, field) for x in t.types))
    if isinstance(t, mi.ListType):
        lo = t.min_length or 0
        return st.lists(_shaped(t.item_type, field), min_size=lo, max_size=max(lo, 4))
    if isinstance(t, mi.DictType):
        return st.dictionaries(_shaped(t.key_type), _shaped(t.value_type), max_size=4)
    if isinstance(t, mi.StructType):
        required = {f.encode_name: _shaped(f.type, f.name) for f in t.fields if f.required}
        optional = {f.encode_name: _shaped(f.type, f.name) for f in t.fields if not f.required}
        return st.fixed_dictionaries(required, optional=optional)
    raise AssertionError(f"no strategy for {t}")


# --- what "nothing written" is measured with -------------------------------------------------


async def _table_digest_sql(db: Any) -> str:
    tables = [
        r["table_name"]
        for r in await db.fetch(
            "SELECT table_name FROM information_schema.tables "
            "WHERE table_schema = 'public' AND table_type = 'BASE TABLE' ORDER BY table_name"
        )
    ]
    assert {"campaign", "recipient", "attachment", "audit_log", "quota"} <= set(tables)
    # Every column of every row, in a stable order.
    return " UNION ALL ".join(
        f"SELECT '{t}' AS t, count(*)::bigint AS n, "
        f"md5(coalesce(string_agg(x::text, E'\\n' ORDER BY x::text), '')) AS h FROM {t} x"
        for t in tables
    )


# Every key under the service's prefix with its whole value, in one round trip.
_REDIS_DUMP = """
local out = {}
local keys = redis.call('KEYS', ARGV[1])
table.sort(keys)
for _, k in ipairs(keys) do
  local t = redis.call('TYPE', k)['ok']
  local v = {}
  if t == 'string' then v = {redis.call('GET', k)}
  elseif t == 'zset' then v = redis.call('ZRANGE', k, 0, -1, 'WITHSCORES')
  elseif t == 'hash' then v = redis.call('HGETALL', k)
  elseif t == 'set' then v = redis.call('SMEMBERS', k)
  elseif t == 'list' then v = redis.call('LRANGE', k, 0, -1)
  end
  table.insert(out, {k, t, v})
end
return out
"""


class State:
    """The standing campaigns, and the checksum of everything the service wrote."""

    def __init__(
        self, crm: Crm, db: Any, redis_client: redis.Redis, settings: Settings, clock: FakeClock
    ) -> None:
        self.crm = crm
        self.db = db
        self.redis = redis_client
        self.prefix = settings.redis_key_prefix
        self.clock = clock
        self.ids: dict[str, int] = {}
        self.attachment = 0
        self.recreated: Counter[str] = Counter()
        self.sql = ""
        self.digest: tuple[Any, ...] = ()
        self._dump = redis_client.register_script(_REDIS_DUMP)

    async def start(self) -> None:
        self.sql = await _table_digest_sql(self.db)
        await self.ensure()
        self.recreated.clear()
        self.digest = await self.measure()

    async def settled(self) -> tuple[Any, ...]:
        """The measurement after a request that wrote: once the governor's quota ledger
        has closed the blocks that request took (closed a moment after the reply, in a
        task of their own), so the close is not taken for the next request's write."""
        for _ in range(250):
            if not await self.db.fetchval(
                "SELECT count(*) FROM quota_block WHERE closed_at IS NULL AND expires_at > now()"
            ):
                break
            await asyncio.sleep(0.02)
        return await self.measure()

    async def measure(self) -> tuple[Any, ...]:
        rows, dump = await asyncio.gather(
            self.db.fetch(self.sql), self._dump(args=[self.prefix + "*"])
        )
        tables = {r["t"]: (r["n"], r["h"]) for r in rows}
        keys = []
        for key, kind, value in dump:
            # A hash's or set's order is Redis's business, not content.
            if kind == b"set":
                content = tuple(sorted(value))
            elif kind == b"hash":
                content = tuple(sorted(zip(value[::2], value[1::2], strict=True)))
            else:
                content = tuple(value)
            keys.append((key, kind, content))
        return tables, tuple(keys)

    def resolve(self, payload: bytes) -> bytes:
        for name, placeholder in PLACEHOLDER.items():
            payload = payload.replace(str(placeholder).encode(), str(self.ids[name]).encode())
        return payload.replace(str(ATTACHMENT_PLACEHOLDER).encode(), str(self.attachment).encode())

    async def ensure(self) -> None:
        """Re-creates every standing campaign that left its state (or is gone), and
        gives the quota back if a generated ``quota.set`` took it (the tour's test
        emails need it, as they need the standing campaigns)."""
        await self.db.execute(
            "UPDATE quota SET monthly_override = NULL, emails_available = 1000000"
            " WHERE emails_available < 1000"
        )
        rows = {
            r["id"]: r
            for r in await self.db.fetch(
                "SELECT c.id, c.owner_id, c.status, "
                "EXISTS (SELECT 1 FROM recipient r WHERE r.campaign_id = c.id "
                "        AND r.status = 'pending') AS has_pending, "
                "(SELECT min(a.id) FROM attachment a WHERE a.campaign_id = c.id) AS attachment "
                "FROM campaign c WHERE c.id = ANY($1::bigint[])",
                list(self.ids.values()),
            )
        }
        for name, status in SLOT_STATUS.items():
            row = rows.get(self.ids.get(name, 0))
            owner = OTHER_OWNER if name == "other" else FUZZER
            if (
                row is None
                or row["status"] != status
                or row["owner_id"] != owner
                or not row["has_pending"]
                or row["attachment"] is None
            ):
                self.ids[name], attachment = await self._make(name, owner)
                self.recreated[name] += 1
            else:
                attachment = row["attachment"]
            if name == "draft":
                self.attachment = attachment

    async def _make(self, name: str, owner: str) -> tuple[int, int]:
        crm = self.crm
        cid = int(
            (
                await crm.call(
                    "campaign.create",
                    {"name": f"standing {name}", "subject": "s", "body_text": "Привет, {{name}}"},
                    user=owner,
                )
            )["id"]
        )
        await crm.call("recipients.add", {"campaign_id": cid, "recipients": people(3)}, user=owner)
        attachment = await crm.call(
            "attachments.add",
            {
                "campaign_id": cid,
                "filename": "notes.txt",
                "content_type": "text/plain",
                "content": base64.b64encode(b"hello").decode(),
            },
            user=owner,
        )
        ref = {"campaign_id": cid}
        if name == "ready":
            # Scheduled (the service runs no scheduler here): unschedule has one to take back.
            await crm.call("campaign.start", {**ref, "send_at": SCHEDULED_AT}, **SETUP)
        if name in ("paused", "sending"):
            await crm.call("campaign.start", ref, **SETUP)
        if name == "paused":
            await crm.call("campaign.pause", ref, **SETUP)
        if name == "cancelled":
            await crm.call("campaign.cancel", ref, **SETUP)
        if name == "sending":
            # Another pod's campaign actor has it (that pod runs no scheduler here).
            await self.db.execute(
                "UPDATE campaign SET status = 'sending', updated_at = $2 WHERE id = $1",
                cid,
                self.clock.now(),
            )
            await self.db.execute(
                "UPDATE queue_entry SET started_at = $2 WHERE campaign_id = $1",
                cid,
                self.clock.now(),
            )
        return cid, int(attachment["id"])


async def _upload_tour_import(nc: Client, prefix: str) -> None:
    store = await nc.jetstream().object_store(imports_bucket(prefix))
    await store.put(TOUR_IMPORT, b"email,name\nfuzz-import@example.org,Tour\n")


def test_every_error_code_has_its_texts() -> None:
    for code in CODES:
        keys = [k for k in TEXTS if k == code or k.startswith(f"{code}_")]
        assert keys, code
        assert all(set(TEXTS[k]) == {"ru", "en"} for k in keys), code


async def _hold_leadership(nc: Client, settings: Settings) -> None:
    """Another process leads: this service's scheduler stays idle, no campaign runs here."""
    kv = await nc.jetstream().create_key_value(
        bucket=bucket_name(settings.subject_prefix), ttl=LEADER_TTL, history=1
    )
    await kv.create(KEY, b"another-pod")


async def test_hostile_requests_get_structured_errors_and_write_nothing(
    make_service, nc, crm: Crm, db, redis_client, settings: Settings
) -> None:
    clock = FakeClock(datetime(2026, 11, 23, 10, 15, tzinfo=UTC))
    await _hold_leadership(nc, settings)
    service = await make_service(
        clock=clock,
        leader_ttl_seconds=LEADER_TTL,
        # The hostile requests are what is tested, not the limits: those would
        # soon refuse every start and test email, and the code behind them
        # would go untested.
        start_throttle_per_hour=1_000_000,
        test_email_throttle_per_hour=1_000_000,
        rate_per_hour=1_000_000,
        quota_sync_interval_seconds=10**9,
    )
    assert service.leader_epoch is None
    for _ in range(500):  # the quota syncer's first sync, on start
        if await db.fetchval("SELECT last_synced_at FROM quota") is not None:
            break
        await asyncio.sleep(0.02)
    state = State(crm, db, redis_client, settings, clock)
    await state.start()
    all_routes = routes(service.settings)
    assert set(VALID) == {r.subject for r in all_routes}, "a valid request for every endpoint"
    limits = {r.subject: r.max_payload for r in all_routes}
    loop = asyncio.get_running_loop()
    seen: Counter[str] = Counter()
    ok: Counter[str] = Counter()
    too_large: Counter[str] = Counter()

    async def probe(subject: str, payload: bytes, headers: dict[str, str]) -> str:
        payload = state.resolve(payload)
        clock.advance(1)
        where = (subject, payload[:300], headers)
        reply = await nc.request(
            f"{settings.subject_prefix}.{subject}", payload, headers=headers, timeout=15
        )
        data = json.loads(reply.data)
        assert isinstance(data, dict), where
        reply_headers = reply.headers or {}
        oversized = len(payload) > limits[subject]
        if ERROR_CODE_HEADER not in reply_headers:
            assert "error" not in data, where
            assert not oversized, where
            seen["ok"] += 1
            ok[subject] += 1
            if subject in READS:
                # Reading writes nothing either.
                changed = _changes(state.digest, await state.measure())
                assert not changed, (*where, "ok", changed)
                return "ok"
            # A change may move a standing campaign out of its state: put one back.
            await state.ensure()
            state.digest = await state.settled()
            return "ok"
        assert set(data) == {"error"}, where
        error = data["error"]
        code = error["code"]
        seen[code] += 1
        assert code not in NEVER, (*where, data)
        assert code in CODES, code
        assert int(reply_headers[ERROR_CODE_HEADER]) == CODES[code]
        assert error["message"] and error["message"] != code  # a human text, not the key
        assert reply_headers[ERROR_HEADER]
        assert (code == "payload_too_large") == oversized, (*where, len(payload), data)
        if oversized:
            too_large[subject] += 1
            assert error["details"] == {
                "size": str(len(payload)),
                "limit": str(limits[subject]),
            }, where
        after = await state.measure()
        if code == "test_email_failed":
            # The attempt is in the send log, on purpose: that is its one write.
            row = await db.fetchrow(
                "SELECT status, is_test FROM send_log WHERE id = $1",
                int(error["details"]["send_log_id"]),
            )
            assert row is not None and row["is_test"] and row["status"] != "sent", where
            await state.ensure()
            state.digest = await state.settled()
            return code
        changed = _changes(state.digest, after)
        assert not changed, (*where, code, changed)
        return code

    # Every subject just over its limit (the 4 MiB ones, attachments.add's
    # ~13.4 MiB) and exactly at it (refused for the unknown field, not the size).
    for route in all_routes:
        named = "campaign_id" in route.request.__struct_fields__
        body = {"campaign_id": state.ids["draft"]} if named else {}
        for size in (route.max_payload + 1, route.max_payload):
            base = msgspec.json.encode({**body, "pad": ""})
            payload = msgspec.json.encode({**body, "pad": "x" * (size - len(base))})
            assert len(payload) == size
            code = await probe(route.subject, payload, {USER_HEADER: FUZZER})
            expected = "payload_too_large" if size > route.max_payload else "validation_error"
            assert code == expected, (route.subject, size, code)
    assert set(too_large) == set(limits)

    assert {subject for subject, _ in TOUR} == set(limits), "the tour visits every endpoint"
    examples = 0

    @settings_for_run
    @given(_request(all_routes))
    def run(request: tuple[str, bytes, dict[str, str]]) -> None:
        nonlocal examples
        if examples % TOUR_EVERY == 0:
            subject, body = TOUR[examples // TOUR_EVERY % len(TOUR)]
            if subject == "recipients.import":
                upload = _upload_tour_import(nc, settings.subject_prefix)
                asyncio.run_coroutine_threadsafe(upload, loop).result(timeout=60)
            tour = probe(subject, msgspec.json.encode(body), TOUR_HEADERS)
            code = asyncio.run_coroutine_threadsafe(tour, loop).result(timeout=60)
            assert code == "ok", (subject, body, code)
        examples += 1
        asyncio.run_coroutine_threadsafe(probe(*request), loop).result(timeout=60)

    began = time.monotonic()
    await asyncio.to_thread(run)
    took = time.monotonic() - began
    print(
        f"\nhypothesis: {EXAMPLES} examples in {took:.1f}s; replies by code: {dict(seen)}"
        f"\nsuccesses by subject: {dict(ok)}\nstanding campaigns re-created: "
        f"{dict(state.recreated)}"
    )
    assert examples == EXAMPLES and sum(seen.values()) >= EXAMPLES
    assert seen["validation_error"] > 100 and seen["bad_request"] > 50
    # Hostile requests reached the campaigns, in their states, not only "not found".
    for code in ("invalid_state", "forbidden", "unauthenticated", "payload_too_large"):
        assert seen[code] > 10, code
    assert set(too_large) == set(limits)
    assert set(SLOT_STATUS) - {"other"} <= set(state.recreated), state.recreated

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
    # micro counts every error reply (num_errors), and none was a 500: last_error is
    # "status:code" of the endpoint's last error reply.
    errors = sum(n for code, n in seen.items() if code != "ok")
    assert sum(e["num_errors"] for e in stats["endpoints"]) >= errors > 0
    assert not any(e["last_error"].startswith("500:") for e in stats["endpoints"])
    assert sum(e["num_requests"] for e in stats["endpoints"]) >= EXAMPLES


def _changes(before: tuple[Any, ...], after: tuple[Any, ...]) -> list[str]:
    """What differs between two measurements: table names, Redis keys."""
    (tables_before, keys_before), (tables_after, keys_after) = before, after
    changed = [
        t
        for t in sorted(set(tables_before) | set(tables_after))
        if tables_before.get(t) != tables_after.get(t)
    ]
    redis_before = {k[0]: k for k in keys_before}
    redis_after = {k[0]: k for k in keys_after}
    changed += [
        f"redis:{k.decode()}"
        for k in sorted(set(redis_before) | set(redis_after))
        if redis_before.get(k) != redis_after.get(k)
    ]
    return changed


settings_for_run = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    # The service's state moves on between examples: shrinking cannot replay one.
    phases=[Phase.generate],
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
