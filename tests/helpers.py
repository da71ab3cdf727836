"""Test helpers: a CRM-side client of the public NATS API, and event waits."""

from __future__ import annotations

import asyncio
import os
from typing import Any

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

from mailer.bus import ERROR_CODE_HEADER, LANG_HEADER, ROLES_HEADER, USER_HEADER
from mailer.config import Settings, env_name

FINAL = ("sent", "completed_with_errors", "cancelled")


class ApiFailed(Exception):
    def __init__(
        self, status: int, body: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self.status = status
        self.body = body
        self.code = body.get("error", {}).get("code")
        self.message: str = body.get("error", {}).get("message", "")
        self.details: dict[str, str] = body.get("error", {}).get("details") or {}
        self.headers = headers or {}
        super().__init__(f"{status} {body}")


class Crm:
    """What another CRM service does: raw JSON requests on mailer's subjects."""

    def __init__(self, nc: Client, prefix: str, user: str = "manager-1") -> None:
        self.nc = nc
        self.prefix = prefix
        self.user = user

    async def raw(
        self,
        subject: str,
        payload: bytes,
        *,
        user: str | None = None,
        roles: str = "",
        lang: str | None = None,
        timeout: float = 10.0,
    ) -> Msg:
        headers = {USER_HEADER: user if user is not None else self.user}
        if roles:
            headers[ROLES_HEADER] = roles
        if lang:
            headers[LANG_HEADER] = lang
        return await self.nc.request(
            f"{self.prefix}.{subject}", payload, timeout=timeout, headers=headers
        )

    async def call(self, subject: str, body: dict[str, Any], **kw: Any) -> dict[str, Any]:
        reply = await self.raw(subject, msgspec.json.encode(body), **kw)
        data: dict[str, Any] = msgspec.json.decode(reply.data)
        if reply.headers and ERROR_CODE_HEADER in reply.headers:
            raise ApiFailed(int(reply.headers[ERROR_CODE_HEADER]), data, dict(reply.headers))
        return data

    async def fails(self, subject: str, body: dict[str, Any], **kw: Any) -> ApiFailed:
        """The error of a request expected to be refused (fails the test if it succeeds)."""
        try:
            reply = await self.call(subject, body, **kw)
        except ApiFailed as exc:
            return exc
        raise AssertionError(f"{subject} {body} succeeded: {reply}")

    async def campaign(
        self, recipients: list[dict[str, Any]], *, user: str | None = None, **fields: Any
    ) -> int:
        body = {
            "name": "Осенняя рассылка",
            "subject": "Привет, это тест",
            "body_text": "Здравствуйте, {{name}}!\nЭто письмо для {{email}}.",
            "body_html": "<p>Здравствуйте, <b>{{name}}</b>!</p>",
        }
        body.update(fields)
        created = await self.call("campaign.create", body, user=user)
        cid = int(created["id"])
        for i in range(0, len(recipients), 5000):
            await self.call(
                "recipients.add",
                {"campaign_id": cid, "recipients": recipients[i : i + 5000]},
                user=user,
            )
        return cid

    async def start(self, campaign_id: int) -> dict[str, Any]:
        return await self.call("campaign.start", {"campaign_id": campaign_id})

    async def get(self, campaign_id: int) -> dict[str, Any]:
        return await self.call("campaign.get", {"campaign_id": campaign_id})


class Events:
    """Collects campaign events; waits on them without polling."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self._changed = asyncio.Condition()

    async def subscribe(self, nc: Client, prefix: str) -> None:
        async def on_msg(msg: Msg) -> None:
            async with self._changed:
                self.seen.append(msgspec.json.decode(msg.data))
                self._changed.notify_all()

        await nc.subscribe(f"{prefix}.events.campaign.>", cb=on_msg)

    async def wait(
        self, campaign_id: int, events: tuple[str, ...], timeout: float = 30.0
    ) -> dict[str, Any]:
        def found() -> dict[str, Any] | None:
            for e in self.seen:
                if e["campaign_id"] == campaign_id and e["event"] in events:
                    return e
            return None

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: found() is not None)
        result = found()
        assert result is not None
        return result

    async def wait_count(
        self, campaign_id: int, event: str, n: int, *, stop_on: str = "", timeout: float = 15.0
    ) -> None:
        """Waits until ``event`` was seen n times (or ``stop_on`` was seen once)."""

        def enough() -> bool:
            return len(self.of(campaign_id, event)) >= n or bool(
                stop_on and self.of(campaign_id, stop_on)
            )

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(enough)

    def of(self, campaign_id: int, event: str) -> list[dict[str, Any]]:
        return [e for e in self.seen if e["campaign_id"] == campaign_id and e["event"] == event]


def people(n: int, domain: str = "example.org", start: int = 0) -> list[dict[str, Any]]:
    return [
        {"email": f"user{i}@{domain}", "name": f"Пользователь {i}"} for i in range(start, start + n)
    ]


class LeaderWatch:
    """Follows the leader lease in NATS KV: who leads, as it changes."""

    def __init__(self) -> None:
        self.holder: str | None = None
        self._changed = asyncio.Condition()

    async def start(self, nc: Client, prefix: str) -> None:
        from mailer.actors.leader import KEY, bucket_name

        kv = await nc.jetstream().create_key_value(bucket=bucket_name(prefix), ttl=3.0, history=1)
        watcher = await kv.watch(KEY)

        async def follow() -> None:
            async for entry in watcher:
                if entry is None:
                    continue
                async with self._changed:
                    deleted = entry.operation is not None
                    self.holder = None if deleted else entry.value.decode()
                    self._changed.notify_all()

        self._task = asyncio.get_running_loop().create_task(follow())

    async def wait(self, *, other_than: str | None = None, timeout: float = 15.0) -> str:
        def found() -> bool:
            return self.holder is not None and self.holder != other_than

        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(found)
        assert self.holder is not None
        return self.holder

    def stop(self) -> None:
        self._task.cancel()


def worker_env(settings: Settings, instance: str, **extra: str) -> dict[str, str]:
    """The environment of a ``mailer run`` OS process on this test's servers and prefixes.

    Nothing of the caller's own ``MAILER_*`` leaks in; ``extra`` overrides (by setting name).
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAILER_")}
    values = {
        "nats_url": settings.nats_url,
        "database_url": settings.database_url,
        "redis_url": settings.redis_url,
        "smtp_host": settings.smtp_host,
        "smtp_port": str(settings.smtp_port),
        "subject_prefix": settings.subject_prefix,
        "redis_key_prefix": settings.redis_key_prefix,
        "instance_id": instance,
        "http_port": "0",
        "public_http_port": "0",
        "working_hours_start": "00:00",
        "working_hours_end": "24:00",
        "leader_ttl_seconds": "3",
        "batch_size": "10",
        "smtp_connections": "2",
        "rate_per_hour": "100000",
        # JetStream reserves the stream's cap on disk: keep the test streams small.
        "events_max_bytes": str(8 * 1024 * 1024),
        "log_level": "WARNING",
    }
    values.update(extra)
    env.update({env_name(k): v for k, v in values.items()})
    return env
