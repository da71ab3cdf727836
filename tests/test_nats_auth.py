"""NATS authentication of the service's Bus, and the permissions a CRM caller needs.

Each test starts its own nats-server (the binary the tests' stack uses) with a
config file that requires credentials, on a port the server picks itself; the
port is read from the server's own log line, and the server is killed after.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import api

from mailer.bus import Bus, NatsAuthError
from mailer.events import stream_name
from mailer.messages import CampaignEvent
from tests.conftest import MakeService
from tests.helpers import Crm, people

NATS_SERVER = Path(sys.executable).parent / "nats-server"
_LISTENING = re.compile(rb"Listening for client connections on ([\d.]+):(\d+)")


@contextlib.asynccontextmanager
async def nats_server(config: str, folder: Path) -> AsyncIterator[str]:
    """A nats-server running ``config``; yields its URL."""
    conf = folder / "nats.conf"
    conf.write_text(config, encoding="utf-8")
    proc = await asyncio.create_subprocess_exec(
        str(NATS_SERVER),
        "-c",
        str(conf),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
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


def users_config(folder: Path, prefix: str, nkey_public: str | None = None) -> str:
    stream = stream_name(prefix)
    # The CRM caller: requests to the API, JetStream reads of the event stream;
    # neither internal subjects (rate tokens, scheduler wake-ups) nor forged events.
    crm_permissions = f"""{{
        publish: {{
          allow: ["{prefix}.>",
                  "$JS.API.STREAM.INFO.{stream}",
                  "$JS.API.CONSUMER.CREATE.{stream}.>",
                  "$JS.API.CONSUMER.INFO.{stream}.>",
                  "$JS.API.CONSUMER.MSG.NEXT.{stream}.>",
                  "$JS.ACK.{stream}.>"]
          deny: ["{prefix}.internal.>", "{prefix}.events.>"]
        }}
        subscribe: {{ allow: ["_INBOX.>", "{prefix}.events.>"] }}
      }}"""
    nkey_user = f'{{ nkey: "{nkey_public}" }}' if nkey_public else ""
    return f"""
listen: "127.0.0.1:-1"
jetstream {{ store_dir: "{folder / "js"}" }}
authorization {{
  users = [
    {{ user: "mailer", password: "mailer-secret" }}
    {nkey_user}
    {{ user: "crm", password: "crm-secret", permissions: {crm_permissions} }}
  ]
}}
"""


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
    async with nats_server(users_config(tmp_path, "auth.mailer"), tmp_path) as url:
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
    async with nats_server(users_config(tmp_path, "auth.mailer", public), tmp_path) as url:
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


async def test_crm_with_documented_permissions_drives_an_authenticated_service(
    tmp_path: Path, make_service: MakeService
) -> None:
    """The permissions of users_config's "crm" user are enough for the CRM's job."""
    prefix = "authz.mailer"
    async with nats_server(users_config(tmp_path, prefix), tmp_path) as url:
        # The service logs in with its own (unrestricted) user and serves the prefix.
        service = await make_service(
            nats_url=url, nats_user="mailer", nats_password="mailer-secret", subject_prefix=prefix
        )
        crm_nc: Client = await nats.connect(url, user="crm", password="crm-secret")
        try:
            crm = Crm(crm_nc, prefix)
            cid = await crm.campaign(people(2))
            await crm.start(cid)

            # Events from the stream with a durable consumer of the CRM's own.
            js = crm_nc.jetstream()
            sub = await js.pull_subscribe(
                f"{prefix}.events.campaign.>",
                durable="crm-campaigns",
                stream=stream_name(prefix),
                config=api.ConsumerConfig(deliver_policy=api.DeliverPolicy.ALL),
            )
            seen: list[str] = []
            async with asyncio.timeout(30):
                while "sent" not in seen:
                    for msg in await sub.fetch(10, timeout=30):
                        seen.append(msgspec.json.decode(msg.data, type=CampaignEvent).event)
                        await msg.ack()
            assert "started" in seen
            assert (await crm.get(cid))["status"] == "sent"

            # A CRM caller cannot ask the rate governor for tokens (internal subject).
            with pytest.raises(nats.errors.Error):
                await crm_nc.request(f"{prefix}.internal.governor.tokens", b"{}", timeout=1)
        finally:
            await crm_nc.close()
            await service.stop()  # while its server still runs
