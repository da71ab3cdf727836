"""Quota sync (mailer.quota): providers, what a sync records, and the restore that
resumes campaigns deferred with ``quota_exhausted``.

The http provider talks to a real aiohttp server on a free loopback port;
PostgreSQL is the session's embedded one.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import msgspec
import pytest
from aiohttp import web

from mailer.actors.runtime import ActorRef, start_actor
from mailer.actors.scheduler import wake_subject
from mailer.clock import FakeClock
from mailer.config import Settings
from mailer.db import connect_pool
from mailer.quota import (
    HttpQuotaProvider,
    LocalQuotaProvider,
    PgQuota,
    QuotaProvider,
    QuotaState,
    QuotaSyncActor,
    SyncNow,
    dig,
    lift_deferrals,
    provider_from_settings,
)
from mailer.rules import MSK if False else None  # noqa: F401  (placeholder removed below)
from tests.helpers import Crm, Events, people
