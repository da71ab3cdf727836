"""PostgreSQL access: the asyncpg pool, named queries and migrations.

SQL lives in ``mailer/queries/*.sql``; each statement is headed
``-- name: some-name`` and read once at import. Code refers to a query by
name (``Q["recipients-claim"]``), so all data access is in one place to read.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Mapping
from importlib import resources
from typing import Any

import asyncpg

__all__ = ["MIGRATION_LOCK_KEY", "Q", "Queries", "connect_pool", "migrate"]

log = logging.getLogger("mailer.db")

_NAME = re.compile(r"^--\s*name:\s*([a-z0-9-]+)\s*$", re.MULTILINE)
# A constant key for the advisory lock that serializes migrations across pods.
MIGRATION_LOCK_KEY = 0x6D61696C6572  # "mailer"


class Queries(Mapping[str, str]):
    """Named SQL statements read from the package's ``queries`` folder."""

    def __init__(self, package: str = "mailer.queries") -> None:
        self._sql: dict[str, str] = {}
        for entry in sorted(resources.files(package).iterdir(), key=lambda e: e.name):
            if entry.name.endswith(".sql"):
                self._load(entry.name, entry.read_text(encoding="utf-8"))

    def _load(self, filename: str, text: str) -> None:
        parts = _NAME.split(text)
        # parts = [preamble, name1, sql1, name2, sql2, ...]
        for name, sql in zip(parts[1::2], parts[2::2], strict=True):
            if name in self._sql:
                raise ValueError(f"query {name!r} defined twice ({filename})")
            self._sql[name] = sql.strip()

    def __getitem__(self, name: str) -> str:
        return self._sql[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._sql)

    def __len__(self) -> int:
        return len(self._sql)


Q = Queries()


async def _init_connection(conn: asyncpg.Connection) -> None:
    # jsonb columns come and go as Python objects.
    import msgspec

    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: msgspec.json.encode(v).decode(),
        decoder=msgspec.json.decode,
        schema="pg_catalog",
    )


async def _no_session_reset(conn: asyncpg.Connection) -> None:
    """Replaces asyncpg's reset query on every release of a pool connection.

    asyncpg still rolls back a transaction left open and drops listeners before
    calling this. Its default query (advisory unlock, CLOSE ALL, UNLISTEN, RESET
    ALL) undoes session state the pool's users never create -- no session-level
    advisory lock (migrate's is on a connection of its own), no LISTEN, no SET,
    no cursor outside a transaction -- and costs one more round trip after every
    pool call, the campaign's per-wave record included.
    """


class _TimedPool(asyncpg.Pool):
    """A pool whose ``acquire`` waits at most ``acquire_timeout`` unless told otherwise.

    ``pool.fetch()`` and the like acquire without a timeout: with every
    connection stuck, they would wait for ever.
    """

    def __init__(self, *args: Any, acquire_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._acquire_timeout = acquire_timeout

    def acquire(self, *, timeout: float | None = None) -> Any:
        return super().acquire(timeout=self._acquire_timeout if timeout is None else timeout)


async def connect_pool(
    dsn: str, *, size: int = 10, statement_timeout: float = 30.0
) -> asyncpg.Pool:
    """The process's pool, where no call can hang for ever (issue 7).

    Three bounds, one setting: the server cancels a statement that runs (or
    waits for a lock) longer than ``statement_timeout``; the client gives up
    on one that gets no answer a little later (a black-holed connection,
    where the server's own cancel never arrives); and taking a connection
    from the pool waits at most as long. Each raises, so the actor that made
    the call crashes and its supervisor restarts it, as for any database error.
    """
    pool = _TimedPool(
        dsn,
        acquire_timeout=statement_timeout,
        connection_class=asyncpg.Connection,
        record_class=asyncpg.Record,
        min_size=1,
        max_size=size,
        max_queries=50000,
        loop=None,
        connect=None,
        setup=None,
        init=_init_connection,
        reset=_no_session_reset,
        # Connections that PostgreSQL dropped (restart) are replaced on acquire.
        max_inactive_connection_lifetime=60.0,
        # The server's cancel comes first and is the clearer error; the margin
        # is for the network.
        command_timeout=statement_timeout + 2.0,
        server_settings={"statement_timeout": str(max(1, round(statement_timeout * 1000)))},
    )
    await pool
    return pool


def _migrations() -> list[tuple[int, str, str]]:
    found: list[tuple[int, str, str]] = []
    for entry in resources.files("mailer.migrations").iterdir():
        m = re.match(r"^(\d{4})_([a-z0-9_]+)\.sql$", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    found.sort()
    versions = [v for v, _, _ in found]
    if len(set(versions)) != len(versions):
        raise ValueError(f"duplicate migration numbers: {versions}")
    return found


async def migrate(dsn: str) -> list[int]:
    """Applies the migrations not yet recorded; returns the versions applied.

    Idempotent, and safe when several pods start at once: a session-level
    advisory lock serializes them, and each migration runs in a transaction
    together with its record in ``schema_migration``.
    """
    conn: asyncpg.Connection = await asyncpg.connect(dsn)
    applied: list[int] = []
    try:
        await conn.execute(Q["migration-lock"], MIGRATION_LOCK_KEY)
        try:
            await conn.execute(Q["migration-create-table"])
            done = {r["version"] for r in await conn.fetch(Q["migration-versions"])}
            for version, name, sql in _migrations():
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(sql)
                    await conn.execute(Q["migration-record"], version, name)
                applied.append(version)
                log.info("migration applied", extra={"version": version, "migration": name})
        finally:
            await conn.execute(Q["migration-unlock"], MIGRATION_LOCK_KEY)
    finally:
        await conn.close()
    return applied
