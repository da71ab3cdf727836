"""The HTTP servers: the internal one (``/metrics``, ``/healthz``, ``/readyz``) and the
public one (the unsubscribe pages, mounted with ``add_routes`` before ``start``).

Two listeners on two ports, so the pages a mail client opens from the internet never share
a port with the metrics and probes: an Ingress or a NetworkPolicy can expose one and not
the other. aiohttp runs on the service's own event loop (no thread), so ``/healthz``
answering proves the loop itself is alive, which is exactly what the liveness probe should
test.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Final

from aiohttp import web

from mailer.metrics import render_latest

__all__ = ["DependencyReport", "HttpServer", "ReadinessCheck", "ScrapeHook"]

log = logging.getLogger(__name__)

# What decides readiness: every value must be True for a 200.
ReadinessCheck = Callable[[], Awaitable[dict[str, bool]]]
# What /readyz reports besides, without letting it decide (``reported`` in the body).
DependencyReport = Callable[[], Awaitable[dict[str, bool]]]
# Runs before /metrics is rendered: gauges read at scrape time (mailer.gauges).
ScrapeHook = Callable[[], Awaitable[None]]

# A stuck dependency check must turn into a 503, not a hung probe; keep it below the
# readiness probe's timeoutSeconds in deploy/k8s.
DEFAULT_READINESS_TIMEOUT: Final = 3.0
# How long stop() lets in-flight requests finish; these endpoints answer in milliseconds,
# and a slow shutdown would delay pod termination.
SHUTDOWN_TIMEOUT: Final = 2.0


class HttpServer:
    """One listener. With ``readiness`` it is the internal server (metrics and probes);
    without, a bare one for public pages. ``add_routes`` mounts more before ``start``."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        readiness: ReadinessCheck | None,
        readiness_timeout: float = DEFAULT_READINESS_TIMEOUT,
        name: str = "internal",
        report: DependencyReport | None = None,
        before_scrape: ScrapeHook | None = None,
    ) -> None:
        self.host = host
        self.port = port  # the real port after start() when 0 was asked for
        self.name = name
        self._readiness = readiness
        self._readiness_timeout = readiness_timeout
        self._report = report
        self._before_scrape = before_scrape
        self.app = web.Application()
        if readiness is not None:
            self.app.router.add_get("/metrics", self._metrics)
            self.app.router.add_get("/healthz", self._healthz)
            self.app.router.add_get("/readyz", self._readyz)
        self._runner: web.AppRunner | None = None
        self._started = False

    def add_routes(self, routes: Iterable[web.AbstractRouteDef]) -> None:
        """Mount more routes (e.g. unsubscribe pages); only before start()."""
        if self._started:
            # aiohttp freezes the router on setup; fail with a clear message instead.
            raise RuntimeError("HttpServer.add_routes must be called before start()")
        self.app.add_routes(routes)

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("HttpServer already started")
        self._started = True
        # access_log=None: Prometheus scrapes and kube probes every few seconds would
        # drown the useful lines.
        runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        address = runner.addresses[0]
        self.port = int(address[1])
        log.info(
            "http server listening",
            extra={"server": self.name, "host": self.host, "port": self.port},
        )

    async def stop(self) -> None:
        """Close the listener and finish; safe to call twice or without start()."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    # -- handlers ---------------------------------------------------------------------

    async def _metrics(self, request: web.Request) -> web.Response:
        if self._before_scrape is not None:
            # The hook bounds its own reads; this bound only keeps a scrape from hanging.
            try:
                async with asyncio.timeout(self._readiness_timeout):
                    await self._before_scrape()
            except Exception:
                log.warning("scrape-time gauges not refreshed", exc_info=True)
        body, content_type = render_latest(request.headers.get("Accept"))
        # Content-Type goes in as a raw header: it carries parameters (version, charset)
        # that web.Response's content_type argument refuses.
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def _readyz(self, request: web.Request) -> web.Response:
        """200 when every readiness check passes, else 503. The body lists the checks and,
        under ``reported``, dependencies that are shown but do not decide readiness."""
        assert self._readiness is not None
        reported: dict[str, bool] | None = None
        try:
            async with asyncio.timeout(self._readiness_timeout):
                if self._report is None:
                    checks = await self._readiness()
                else:
                    checks, reported = await asyncio.gather(self._readiness(), self._report())
        except TimeoutError:
            log.warning("readiness check timed out", extra={"timeout_s": self._readiness_timeout})
            return web.json_response({"readiness": False}, status=503)
        except Exception:
            log.exception("readiness check failed")
            return web.json_response({"readiness": False}, status=503)
        ok = all(checks.values())
        body: dict[str, object] = dict(checks)
        if reported is not None:
            body["reported"] = reported
        return web.json_response(body, status=200 if ok else 503)
