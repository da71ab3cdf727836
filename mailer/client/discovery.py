"""Which mailer instances answer: the NATS micro service's ``$SRV.INFO`` (ADR-32)."""

from __future__ import annotations

import asyncio
import time

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg

__all__ = ["SERVICE_NAME", "Instance", "ping"]

SERVICE_NAME = "mailer"


class _Endpoint(msgspec.Struct, kw_only=True):
    name: str
    subject: str


class _Info(msgspec.Struct, kw_only=True):
    name: str
    id: str
    version: str
    metadata: dict[str, str] | None = None
    endpoints: list[_Endpoint] | None = None


class Instance(msgspec.Struct, frozen=True, kw_only=True):
    """One running mailer process, as its micro service describes itself."""

    id: str
    version: str
    subject_prefix: str
    endpoints: int
    # From the question to this instance's answer.
    rtt_ms: float


async def ping(nc: Client, *, wait: float = 0.5) -> list[Instance]:
    """Asks every ``mailer`` micro service instance for its INFO; collects the
    answers that arrive within ``wait`` seconds (each instance answers once)."""
    found: list[Instance] = []
    began = time.perf_counter()

    async def on_reply(msg: Msg) -> None:
        try:
            info = msgspec.json.decode(msg.data, type=_Info)
        except msgspec.DecodeError:
            return  # not a micro service's answer: nothing to list
        found.append(
            Instance(
                id=info.id,
                version=info.version,
                subject_prefix=(info.metadata or {}).get("subject_prefix", ""),
                endpoints=len(info.endpoints or []),
                rtt_ms=round((time.perf_counter() - began) * 1000, 1),
            )
        )

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=on_reply)
    try:
        await nc.publish(f"$SRV.INFO.{SERVICE_NAME}", b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)  # replies come from any number of instances: wait them out
    finally:
        await sub.unsubscribe()
    return sorted(found, key=lambda i: (i.subject_prefix, i.id))
