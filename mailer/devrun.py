"""``mailer dev``: the real service on the embedded stack.

Any of MAILER_NATS_URL, MAILER_DATABASE_URL, MAILER_REDIS_URL or
MAILER_SMTP_HOST(+PORT) that is set points at that real server instead of
starting an embedded one. Ctrl-C stops the service, then every server.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import msgspec

from mailer.config import Settings
from mailer.db import migrate
from mailer.devstack import EmbeddedStack, StackEndpoints, StackOverrides

__all__ = ["dev_stack", "run_dev", "with_endpoints"]


def with_endpoints(settings: Settings, e: StackEndpoints) -> Settings:
    return msgspec.structs.replace(
        settings,
        nats_url=e.nats_url,
        database_url=e.database_url,
        redis_url=e.redis_url,
        smtp_host=e.smtp_host,
        smtp_port=e.smtp_port,
    )


@contextlib.asynccontextmanager
async def dev_stack(
    settings: Settings, *, fresh_outbox: bool = False
) -> AsyncIterator[tuple[EmbeddedStack, Settings]]:
    stack = EmbeddedStack(settings.var_dir, StackOverrides.from_settings(settings))
    async with stack:
        if fresh_outbox and stack.sink is not None and stack.endpoints.outbox_dir is not None:
            for old in stack.endpoints.outbox_dir.glob("*.eml"):
                old.unlink()
        resolved = with_endpoints(settings, stack.endpoints)
        await migrate(resolved.database_url)
        yield stack, resolved


async def run_dev(settings: Settings) -> int:
    from mailer.cli import serve
    from mailer.service import Service

    async with dev_stack(settings) as (stack, resolved):
        service = Service(resolved)
        await service.start()
        e = stack.endpoints
        print(
            "mailer dev is running (Ctrl-C stops everything)\n"
            f"  NATS        {e.nats_url}   subjects {resolved.subject_prefix}.>\n"
            f"  PostgreSQL  {e.database_url}\n"
            f"  Redis       {e.redis_url}\n"
            f"  SMTP        {e.smtp_host}:{e.smtp_port}   outbox {e.outbox_dir or '-'}\n"
            f"  HTTP        http://{resolved.http_host}:{service.http_port}/metrics"
            f"   unsubscribe pages on :{service.public_http_port}",
            flush=True,
        )
        return await serve(service)
