"""NATS authentication of the service's Bus, and the permissions a CRM caller needs.

Each test starts its own nats-server (the binary the tests' stack uses) with a
config file that requires credentials, on a port the server picks itself; the
port is read from the server's own log line, and the server is killed after.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from mailer.bus import Bus, NatsAuthError
from mailer.events import stream_name
from mailer.messages import CampaignEvent
from tests.conftest import MakeService
from tests.helpers import Crm, Events, people

NATS_SERVER = Path(sys.executable).parent / "nats-server"
API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
_LISTENING = re.compile(rb"Listening for client connections on ([\d.]+):(\d+)")


@contextlib.asynccontextmanager
async def nats_server(
    config: str, folder: Path, env: dict[str, str] | None = None
) -> AsyncIterator[str]:
    """A nats-server running ``config`` (``$VARS`` in it from ``env``); yields its URL."""
    conf = folder / "nats.conf"
    conf.write_text(config, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        str(NATS_SERVER),
        "-c",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    assert proc.stderr is not None
    stderr = proc.stderr
    drain: asyncio.Task[None] | None = None
    try:
        url = ""
        async with asyncio.timeout(10):
            while True:
                line = await stderr.readline()
                if not line:
                    raise RuntimeError("nats-server exited before it was ready")
                if m := _LISTENING.search(line):
                    url = f"nats://{m[1].decode()}:{m[2].decode()}"
                if b"Server is ready" in line:
                    break

        async def discard() -> None:
            # The server keeps logging; a full pipe would block it.
            while await stderr.readline():
                pass

        drain = asyncio.create_task(discard())
        yield url
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        if drain is not None:
            await drain


def users_config(folder: Path, nkey_public: str | None = None) -> str:
    """mailer's own user (password), and optionally an NKey user."""
    nkey_user = f'{{ nkey: "{nkey_public}" }}' if nkey_public else ""
    return f"""
listen: "127.0.0.1:-1"
jetstream {{ store_dir: "{folder / "js"}" }}
authorization {{
  users = [
    {{ user: "mailer", password: "mailer-secret" }}
    {nkey_user}
  ]
}}
"""


def documented_permissions(prefix: str) -> str:
    """The nats-server ``authorization`` block of docs/api.md, for ``prefix``.

    The docs write it for the default prefix ``mailer`` and its stream
    ``MAILER_EVENTS_mailer``, with passwords from ``$MAILER_NATS_PASSWORD`` and
    ``$CRM_DEALS_NATS_PASSWORD`` (nats-server reads them from its environment).
    """
    blocks = [
        b
        for b in re.findall(r"```conf\n(.*?)```", API_DOC.read_text("utf-8"), re.DOTALL)
        if "crm-deals" in b
    ]
    assert len(blocks) == 1, "docs/api.md: expected one ```conf block with the crm-deals user"
    block = blocks[0].replace("MAILER_EVENTS_mailer", stream_name(prefix))
    block = block.replace('"mailer.', f'"{prefix}.')
    unscoped = re.findall(r"(?<![\w.])mailer\.\S*", block)
    assert not unscoped, f"subjects the test did not scope: {unscoped}"
    return block


def new_user_seed(path: Path) -> str:
    """Writes a fresh NKey user seed to ``path``; returns the user's public key."""
    # nkeys is what nats-py signs with; the project must depend on it for NKey
    # and creds auth. Without it only the NKey test is skipped, loudly.
    nkeys = pytest.importorskip("nkeys", reason="NKey auth needs the nkeys package")
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    path.write_bytes(seed + b"\n")
    path.chmod(0o600)
    return str(nkeys.from_seed(bytearray(seed)).public_key.decode())


async def round_trip(bus: Bus) -> bytes:
    async def echo(msg: Msg) -> None:
        await msg.respond(b"pong:" + msg.data)

    await bus.nc.subscribe(bus.subject("auth", "echo"), cb=echo)
    reply = await bus.nc.request(bus.subject("auth", "echo"), b"ping", timeout=5)
    return reply.data


async def test_bus_authenticates_with_user_and_password_and_refuses_wrong_ones(
    tmp_path: Path,
) -> None:
    async with nats_server(users_config(tmp_path), tmp_path) as url:
        bus = Bus(url, prefix="auth.mailer", name="t", user="mailer", password="mailer-secret")
        try:
            async with asyncio.timeout(10):
                await bus.connect()
            assert await round_trip(bus) == b"pong:ping"
        finally:
            await bus.close()

        bad = [
            Bus(url, prefix="auth.mailer", name="t", user="mailer", password="wrong"),
            Bus(url, prefix="auth.mailer", name="t", user="nobody", password="mailer-secret"),
            Bus(url, prefix="auth.mailer", name="t"),  # no credentials at all
        ]
        for bus in bad:
            # Refused at once, not retried forever behind a pod that never gets ready.
            with pytest.raises(NatsAuthError):
                async with asyncio.timeout(10):
                    await bus.connect()
            assert not bus.connected


async def test_bus_authenticates_with_an_nkey_seed_file(tmp_path: Path) -> None:
    seed_file = tmp_path / "mailer.nk"
    public = new_user_seed(seed_file)
    other_seed = tmp_path / "other.nk"
    new_user_seed(other_seed)
    async with nats_server(users_config(tmp_path, public), tmp_path) as url:
        bus = Bus(url, prefix="auth.mailer", name="t", nkey_seed_file=str(seed_file))
        try:
            async with asyncio.timeout(10):
                await bus.connect()
            assert await round_trip(bus) == b"pong:ping"
        finally:
            await bus.close()
        stranger = Bus(url, prefix="auth.mailer", name="t", nkey_seed_file=str(other_seed))
        with pytest.raises(NatsAuthError):
            async with asyncio.timeout(10):
                await stranger.connect()


async def test_token_auth(tmp_path: Path) -> None:
    config = 'listen: "127.0.0.1:-1"\nauthorization { token: "t0ken-secret" }\n'
    async with nats_server(config, tmp_path) as url:
        bus = Bus(url, prefix="auth.mailer", name="t", token="t0ken-secret")
        try:
            await bus.connect()
            assert await round_trip(bus) == b"pong:ping"
        finally:
            await bus.close()
        with pytest.raises(NatsAuthError):
            await Bus(url, prefix="auth.mailer", name="t", token="wrong").connect()


def test_auth_settings_are_checked_before_connecting() -> None:
    with pytest.raises(ValueError, match="one NATS auth method"):
        Bus("nats://x", prefix="p", name="t", user="u", password="p", token="t")
    with pytest.raises(ValueError, match="both a user and a password"):
        Bus("nats://x", prefix="p", name="t", user="u")


async def fetch_until(
    sub: JetStreamContext.PullSubscription, campaign_id: int, last: str
) -> list[tuple[int, str]]:
    """(campaign_id, event) of every message until ``last`` of ``campaign_id``; acks each."""
    seen: list[tuple[int, str]] = []
    async with asyncio.timeout(30):
        while (campaign_id, last) not in seen:
            for msg in await sub.fetch(20, timeout=30):
                event = msgspec.json.decode(msg.data, type=CampaignEvent)
                seen.append((event.campaign_id, event.event))
                await msg.ack_sync()  # confirmed by the server: $JS.ACK is allowed
    return seen


async def test_crm_with_documented_permissions_drives_an_authenticated_service(
    tmp_path: Path, make_service: MakeService
) -> None:
    """The permissions docs/api.md gives a CRM service are enough for its job, and no more.

    It drives campaigns, finds the service, and catches up on the events it missed
    while down through its durable consumer; it cannot forge events, reach mailer's
    internal subjects, or call an admin-only subject it was not given.
    """
    prefix = "authz.mailer"
    stream = stream_name(prefix)
    config = (
        f'listen: "127.0.0.1:-1"\njetstream {{ store_dir: "{tmp_path / "js"}" }}\n'
        + documented_permissions(prefix)
    )
    passwords = {"MAILER_NATS_PASSWORD": "mailer-secret", "CRM_DEALS_NATS_PASSWORD": "crm-secret"}
    async with nats_server(config, tmp_path, env=passwords) as url:
        # The service logs in with its own (unrestricted) user and serves the prefix.
        service = await make_service(
            nats_url=url, nats_user="mailer", nats_password="mailer-secret", subject_prefix=prefix
        )
        violations: list[str] = []
        violated = asyncio.Event()

        async def on_error(exc: Exception) -> None:
            violations.append(str(exc))
            violated.set()

        crm_nc: Client = await nats.connect(
            url, user="crm-deals", password="crm-secret", error_cb=on_error
        )
        # Watches with mailer's own user what reaches the event and internal subjects.
        observer: Client = await nats.connect(url, user="mailer", password="mailer-secret")
        try:
            crm = Crm(crm_nc, prefix)
            live = Events()
            await live.subscribe(observer, prefix)
            forged_seen: list[str] = []

            async def on_forged(msg: Msg) -> None:
                if b"forged" in msg.data:
                    forged_seen.append(msg.subject)

            await observer.subscribe(f"{prefix}.>", cb=on_forged)

            # Discovery.
            ping = await crm_nc.request("$SRV.PING.mailer", b"", timeout=5)
            assert msgspec.json.decode(ping.data)["name"] == "mailer"

            # The CRM's durable consumer on the events stream, then a campaign.
            js = crm_nc.jetstream()
            sub = await js.pull_subscribe(
                f"{prefix}.events.campaign.>", durable="crm-deals", stream=stream
            )
            first = await crm.campaign(people(2))
            await crm.start(first)
            seen = await fetch_until(sub, first, "sent")
            assert [e for c, e in seen if c == first][:2] == ["queued", "started"]
            assert (await crm.get(first))["status"] == "sent"
            info = await js.consumer_info(stream, "crm-deals")
            assert info.num_ack_pending == 0 and info.num_pending == 0

            # The CRM stops consuming (as if down) while a second campaign runs.
            await sub.unsubscribe()
            second = await crm.campaign(people(3))
            await crm.start(second)
            await live.wait(second, ("sent",))

            # Back up: its durable consumer hands over exactly what it missed.
            sub = await js.pull_subscribe(
                f"{prefix}.events.campaign.>", durable="crm-deals", stream=stream
            )
            missed = await fetch_until(sub, second, "sent")
            assert {c for c, _ in missed} == {second}, missed
            assert [e for _, e in missed][:2] == ["queued", "started"]
            assert violations == []

            # Refused: forged events, internal subjects, an admin-only subject.
            last_seq = (await js.stream_info(stream)).state.last_seq
            refused = [
                f"{prefix}.events.campaign.sent",
                f"{prefix}.events.unsubscribe",
                f"{prefix}.internal.governor.tokens",
                f"{prefix}.internal.scheduler.wake",
                f"{prefix}.quota.sync",
            ]
            for subject in refused:
                await crm_nc.publish(subject, b'{"forged": true}')
            await crm_nc.flush()
            async with asyncio.timeout(5):
                while len(violations) < len(refused):
                    await violated.wait()
                    violated.clear()
            for subject, violation in zip(refused, violations, strict=True):
                assert re.search(
                    rf'permissions violation for publish to "{re.escape(subject)}"',
                    violation,
                    re.IGNORECASE,
                ), violation
            await observer.flush()
            assert forged_seen == []
            assert (await js.stream_info(stream)).state.last_seq == last_seq
        finally:
            await crm_nc.close()
            await observer.close()
            await service.stop()  # while its server still runs


# --- JWT (operator mode) and creds files ------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class Identity:
    """An NKey pair of one kind (operator, account, user) made for the test."""

    def __init__(self, prefix_byte: int) -> None:
        nkeys = pytest.importorskip("nkeys", reason="JWT auth needs the nkeys package")
        self.seed: bytes = nkeys.encode_seed(os.urandom(32), prefix_byte)
        self._kp = nkeys.from_seed(bytearray(self.seed))
        self.public: str = self._kp.public_key.decode()

    def issue(self, subject: str, name: str, claims: dict[str, Any], **extra: Any) -> str:
        """A JWT signed by this key: base64url header, claims, and ed25519 signature."""
        body: dict[str, Any] = {
            "iat": int(time.time()),
            "iss": self.public,
            "name": name,
            "sub": subject,
            "nats": {**claims, "version": 2},
            **extra,
        }
        # The JWT library names a JWT by the hash of its claims without the id.
        digest = hashlib.sha512(json.dumps(body, sort_keys=True).encode()).digest()[:32]
        body["jti"] = base64.b32encode(digest).decode().rstrip("=")
        header = _b64url(json.dumps({"typ": "JWT", "alg": "ed25519-nkey"}).encode())
        payload = _b64url(json.dumps(body).encode())
        signature = self._kp.sign(f"{header}.{payload}".encode())
        return f"{header}.{payload}.{_b64url(signature)}"


def _nkeys_prefix(kind: str) -> int:
    nkeys = pytest.importorskip("nkeys", reason="JWT auth needs the nkeys package")
    return int(getattr(nkeys, f"PREFIX_BYTE_{kind}"))


_UNLIMITED_ACCOUNT = {
    "limits": {
        "subs": -1,
        "data": -1,
        "payload": -1,
        "imports": -1,
        "exports": -1,
        "wildcards": True,
        "conn": -1,
        "leaf": -1,
        # JetStream: mailer keeps its events stream and leader-election KV here.
        "mem_storage": -1,
        "disk_storage": -1,
        "streams": -1,
        "consumer": -1,
    },
    "type": "account",
}


class Operator:
    """A trust chain: operator -> (system account, one application account) -> users."""

    def __init__(self) -> None:
        self.operator = Identity(_nkeys_prefix("OPERATOR"))
        self.system = Identity(_nkeys_prefix("ACCOUNT"))
        self.account = Identity(_nkeys_prefix("ACCOUNT"))

    def server_config(self, folder: Path) -> str:
        op = self.operator
        op_jwt = op.issue(
            op.public, "test-operator", {"type": "operator", "system_account": self.system.public}
        )
        system_jwt = op.issue(self.system.public, "SYS", {"type": "account"})
        account_jwt = op.issue(self.account.public, "CRM", _UNLIMITED_ACCOUNT)
        (folder / "operator.jwt").write_text(op_jwt, encoding="utf-8")
        # JetStream in operator mode needs the system account; MEMORY resolver with the
        # account JWTs preloaded: no account server.
        return f"""
listen: "127.0.0.1:-1"
jetstream {{ store_dir: "{folder / "js"}" }}
operator: "{folder / "operator.jwt"}"
system_account: {self.system.public}
resolver: MEMORY
resolver_preload: {{
  {self.system.public}: "{system_jwt}"
  {self.account.public}: "{account_jwt}"
}}
"""

    def user_creds(
        self,
        path: Path,
        name: str,
        *,
        account: Identity | None = None,
        seed_of: Identity | None = None,
        **extra: Any,
    ) -> Path:
        """A creds file of a new user of ``account`` (default: the trusted one).

        ``seed_of`` puts another user's seed next to the JWT (a mismatched file);
        ``extra`` adds claims such as ``exp``.
        """
        user = Identity(_nkeys_prefix("USER"))
        issuer = account or self.account
        user_jwt = issuer.issue(
            user.public,
            name,
            {"type": "user", "pub": {}, "sub": {}, "subs": -1, "data": -1, "payload": -1},
            **extra,
        )
        seed = (seed_of or user).seed.decode()
        path.write_text(
            "-----BEGIN NATS USER JWT-----\n"
            f"{user_jwt}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{seed}\n"
            "------END USER NKEY SEED------\n",
            encoding="utf-8",
        )
        path.chmod(0o600)
        return path


async def test_bus_authenticates_with_a_creds_file_and_refuses_wrong_ones(tmp_path: Path) -> None:
    op = Operator()
    good = op.user_creds(tmp_path / "mailer.creds", "mailer")
    stranger_account = Identity(_nkeys_prefix("ACCOUNT"))
    wrong = {
        # signed by an account the operator never issued
        "untrusted account": op.user_creds(
            tmp_path / "untrusted.creds", "x", account=stranger_account
        ),
        # a good JWT with someone else's seed: the nonce signature does not match
        "mismatched seed": op.user_creds(
            tmp_path / "mismatch.creds", "x", seed_of=Identity(_nkeys_prefix("USER"))
        ),
        # expired an hour ago
        "expired": op.user_creds(tmp_path / "expired.creds", "x", exp=int(time.time()) - 3600),
    }
    async with nats_server(op.server_config(tmp_path), tmp_path) as url:
        bus = Bus(url, prefix="jwt.mailer", name="t", creds_file=str(good))
        try:
            async with asyncio.timeout(10):
                await bus.connect()
            assert await round_trip(bus) == b"pong:ping"
            # Its own account's JetStream, as the service uses it.
            info = await bus.nc.jetstream().account_info()
            assert info.limits.max_streams == -1
        finally:
            await bus.close()

        for why, creds in wrong.items():
            bus = Bus(url, prefix="jwt.mailer", name="t", creds_file=str(creds))
            # Refused at once, not retried forever behind a pod that never gets ready.
            with pytest.raises(NatsAuthError):
                async with asyncio.timeout(10):
                    await bus.connect()
            assert not bus.connected, why


def test_an_unusable_creds_file_is_refused_before_connecting(tmp_path: Path) -> None:
    """nats-py would loop forever on a file without its JWT line: Bus refuses it first."""
    op = Operator()
    good = op.user_creds(tmp_path / "good.creds", "u").read_text(encoding="utf-8")
    cases = {
        "missing.creds": None,
        "seed-only.creds": good[good.index("-----BEGIN USER NKEY SEED") :],
        "jwt-only.creds": good[: good.index("-----BEGIN USER NKEY SEED")],
        "empty-jwt-line.creds": good.replace("JWT-----\n", "JWT-----\n\n", 1),
    }
    for name, text in cases.items():
        path = tmp_path / name
        if text is not None:
            path.write_text(text, encoding="utf-8")
        with pytest.raises(ValueError, match="NATS creds file"):
            Bus("nats://127.0.0.1:1", prefix="p", name="t", creds_file=str(path))
    Bus("nats://127.0.0.1:1", prefix="p", name="t", creds_file=str(tmp_path / "good.creds"))


async def test_service_runs_on_creds_files(tmp_path: Path, make_service: MakeService) -> None:
    """The whole service (API, JetStream events, KV leader election) on JWT auth."""
    op = Operator()
    prefix = "jwt.mailer"
    mailer_creds = op.user_creds(tmp_path / "mailer.creds", "mailer")
    crm_creds = op.user_creds(tmp_path / "crm.creds", "crm-deals")
    async with nats_server(op.server_config(tmp_path), tmp_path) as url:
        service = await make_service(
            nats_url=url, nats_creds_file=str(mailer_creds), subject_prefix=prefix
        )
        crm_nc: Client = await nats.connect(url, user_credentials=str(crm_creds))
        try:
            events = Events()
            await events.subscribe(crm_nc, prefix)
            crm = Crm(crm_nc, prefix)
            cid = await crm.campaign(people(2))
            await crm.start(cid)
            await events.wait(cid, ("sent",))
            assert (await crm.get(cid))["status"] == "sent"
            stream = await crm_nc.jetstream().stream_info(stream_name(prefix))
            assert stream.state.messages > 0  # the events were stored in the account's stream
        finally:
            await crm_nc.close()
            await service.stop()  # while its server still runs
