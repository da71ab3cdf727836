"""The process's one NATS connection, its codec and request/reply helpers.

Replies of the API have one shape: the reply Struct on success; on failure an
``ErrorReply`` body plus the NATS micro error headers (``Nats-Service-Error``,
``Nats-Service-Error-Code``), so micro-aware clients and plain ones both see
it. ``Bus.request`` turns an error reply back into ``RemoteError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import random
import re
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec
import nats
from nats.aio.client import Client, Server
from nats.aio.msg import Msg

from mailer.config import mask_url
from mailer.messages import ErrorBody, ErrorReply

__all__ = [
    "ERROR_CODE_HEADER",
    "ERROR_HEADER",
    "STREAM_CONFIG_DIFFERS",
    "Bus",
    "NatsAuthError",
    "RemoteError",
    "check_auth",
    "creds_file_problem",
    "decode",
    "encode",
    "reconnect_delay",
    "servers_of",
]

log = logging.getLogger("mailer.bus")

T = TypeVar("T")

ERROR_HEADER = "Nats-Service-Error"
ERROR_CODE_HEADER = "Nats-Service-Error-Code"
# Headers naming who acts, and in which language replies should be.
USER_HEADER = "Mailer-User"
ROLES_HEADER = "Mailer-Roles"
LANG_HEADER = "Mailer-Lang"

_encoder = msgspec.json.Encoder()

# JetStream's error code for "stream name already in use with a different
# configuration": a stream (or KV bucket) mailer owns must then be updated
# in place, or a changed setting would keep every new pod from starting.
STREAM_CONFIG_DIFFERS = 10058

# Reconnect backoff: the first try after half a second, doubling up to five
# seconds between tries, each wait a random half to whole of that (so pods that
# lost the same server do not come back in lockstep). Five seconds at most
# keeps a pod's outage short once NATS is back.
RECONNECT_FIRST_SECONDS = 0.5
RECONNECT_MAX_SECONDS = 5.0


def reconnect_delay(attempt: int) -> float:
    """The wait before reconnect try ``attempt`` (0 for the first) to a server."""
    ceiling = min(RECONNECT_MAX_SECONDS, RECONNECT_FIRST_SECONDS * 2.0 ** min(attempt, 16))
    return ceiling * random.uniform(0.5, 1.0)


def _next_server(servers: list[Server], info: dict[str, Any]) -> tuple[Server | None, float]:
    """nats-py's reconnect hook: the least-failed server, after its backoff."""
    server = min(servers, key=lambda s: s.reconnects)
    wait = reconnect_delay(server.reconnects)
    log.info(
        "nats reconnecting",
        extra={"attempt": server.reconnects + 1, "wait_seconds": round(wait, 2)},
    )
    return server, wait


def servers_of(url: str) -> list[str]:
    """The server URLs of ``MAILER_NATS_URL``: one URL, or several comma-separated."""
    return [u.strip() for u in url.split(",") if u.strip()]


def encode(msg: Any) -> bytes:
    return _encoder.encode(msg)


def decode(data: bytes, typ: type[T]) -> T:
    return msgspec.json.decode(data, type=typ, strict=True)


class RemoteError(Exception):
    """An error reply: ``code`` is the stable error code, ``status`` HTTP-like."""

    def __init__(self, status: int, body: ErrorBody) -> None:
        self.status = status
        self.code = body.code
        self.message = body.message
        self.details = body.details
        super().__init__(f"{status} {body.code}: {body.message}")


class Bus:
    """One NATS connection per process; reconnects forever with backoff (``reconnect_delay``)."""

    def __init__(
        self,
        url: str,
        *,
        prefix: str,
        name: str,
        user: str | None = None,
        password: str | None = None,
        token: str | None = None,
        creds_file: str | None = None,
        nkey_seed_file: str | None = None,
    ) -> None:
        self.url = url
        # For logs: the URL(s) with any password or token masked.
        self.shown_url = mask_url(url)
        self.prefix = prefix
        self.name = name
        self._auth = _auth_options(
            user=user,
            password=password,
            token=token,
            creds_file=creds_file,
            nkey_seed_file=nkey_seed_file,
        )
        self._nc: Client | None = None
        self._closing = False

    @property
    def nc(self) -> Client:
        if self._nc is None:
            raise RuntimeError("bus not connected")
        return self._nc

    @property
    def connected(self) -> bool:
        return self._nc is not None and self._nc.is_connected

    def subject(self, *parts: str) -> str:
        return ".".join((self.prefix, *parts))

    async def connect(
        self, *, on_attempt_failed: Callable[[Exception], None] | None = None
    ) -> None:
        """Connects, trying again and again until connected (a caller bounds it with a
        timeout; see ``mailer.startup``). Refused credentials raise at once.

        ``on_attempt_failed`` hears each failure of the first connection (start-up
        logs it as one line per attempt) instead of the generic error log.
        """
        if self._nc is not None:
            return

        async def on_disconnect() -> None:
            if self._closing:  # our own drain: nothing to warn about
                log.debug("nats disconnected on close", extra={"nats_url": self.shown_url})
            else:
                log.warning("nats disconnected", extra={"nats_url": self.shown_url})

        async def on_reconnect() -> None:
            log.info("nats reconnected", extra={"nats_url": self.shown_url})

        nc = Client()
        # Set when the server refuses our credentials before the first connection
        # is up: retrying forever would hide a configuration error behind a pod
        # that never gets ready, so connect() fails at once instead.
        refused: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

        async def on_error(exc: Exception) -> None:
            if not refused.done() and not nc.is_connected and _is_auth_error(exc):
                refused.set_result(exc)
            if on_attempt_failed is not None and not nc.is_connected and self._nc is None:
                on_attempt_failed(exc)
                return
            log.error("nats error: %s", exc, extra={"nats_url": self.shown_url})

        connecting = asyncio.ensure_future(
            nc.connect(
                # A cluster is given as its URLs, comma-separated: nats-py takes a list and
                # reconnects to any of them (plus those the servers announce).
                servers_of(self.url),
                name=self.name,
                # Reconnect forever: the orchestrator, not this loop, decides when
                # a pod is dead. nats-py waits a constant time between tries;
                # _next_server makes it an exponential backoff with jitter.
                max_reconnect_attempts=-1,
                reconnect_time_wait=1,
                reconnect_to_server_handler=_next_server,
                allow_reconnect=True,
                disconnected_cb=on_disconnect,
                reconnected_cb=on_reconnect,
                error_cb=on_error,
                **self._auth,
            )
        )
        try:
            waiting: list[asyncio.Future[Any]] = [connecting, refused]
            await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not connecting.done():  # refused, or our caller gave up: stop trying
                connecting.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await connecting
                with contextlib.suppress(Exception):
                    await nc.close()
        if refused.done() and not nc.is_connected:
            raise NatsAuthError(f"NATS refused the credentials: {refused.result()}")
        connecting.result()  # raises what the connect raised
        self._nc = nc

    async def publish(self, subject: str, msg: Any, headers: dict[str, str] | None = None) -> None:
        await self.nc.publish(subject, encode(msg), headers=headers)

    async def request(
        self,
        subject: str,
        msg: Any,
        reply_type: type[T],
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> T:
        reply = await self.nc.request(subject, encode(msg), timeout=timeout, headers=headers)
        return parse_reply(reply, reply_type)

    async def close(self) -> None:
        """Drains (flushes what we publish, finishes subscriptions) and closes."""
        nc, self._nc = self._nc, None
        self._closing = True
        if nc is None or nc.is_closed:
            return
        try:
            await nc.drain()
        except Exception as exc:  # a drain on a broken connection: close is what is left
            log.warning("nats drain failed (%r); closing", exc)
            with contextlib.suppress(Exception):
                await nc.close()


class NatsAuthError(Exception):
    """The server refused this process's NATS credentials at connect."""


def _is_auth_error(exc: Exception) -> bool:
    # Before the first connection nats-py reports the server's -ERR as a plain
    # Error with the text; afterwards as AuthorizationError.
    return isinstance(exc, nats.errors.AuthorizationError) or (
        "authorization violation" in str(exc).lower()
    )


def _auth_options(
    *,
    user: str | None,
    password: str | None,
    token: str | None,
    creds_file: str | None,
    nkey_seed_file: str | None,
) -> dict[str, Any]:
    """nats.connect keyword arguments for the one configured way to authenticate.

    Refuses a mix (the server would see only one of them, and which one is up to
    the client library) and a key file that the nkeys package, which nats-py needs
    to sign the server's nonce, could not use: both are configuration errors
    better reported at start than as an authorization violation later.
    """
    methods = [
        name
        for name, configured in (
            ("user/password", bool(user or password)),
            ("token", bool(token)),
            ("creds file", bool(creds_file)),
            ("nkey seed file", bool(nkey_seed_file)),
        )
        if configured
    ]
    if len(methods) > 1:
        raise ValueError(f"configure one NATS auth method, not {' and '.join(methods)}")
    if bool(user) != bool(password):
        raise ValueError("NATS user/password auth needs both a user and a password")
    if (creds_file or nkey_seed_file) and importlib.util.find_spec("nkeys") is None:
        raise ValueError(
            "NATS creds/NKey auth needs the 'nkeys' package (pip install nats-py[nkeys])"
        )
    if creds_file and (problem := creds_file_problem(creds_file)):
        raise ValueError(f"NATS creds file {creds_file}: {problem}")
    if user:
        return {"user": user, "password": password}
    if token:
        return {"token": token}
    if creds_file:
        return {"user_credentials": creds_file}
    if nkey_seed_file:
        return {"nkeys_seed": nkey_seed_file}
    return {}


def check_auth(
    *,
    user: str | None = None,
    password: str | None = None,
    token: str | None = None,
    creds_file: str | None = None,
    nkey_seed_file: str | None = None,
) -> None:
    """Raises ValueError if Bus would refuse these auth settings (for the config check)."""
    _auth_options(
        user=user,
        password=password,
        token=token,
        creds_file=creds_file,
        nkey_seed_file=nkey_seed_file,
    )


# As nats-py reads them: the line right after each marker line.
_CREDS_JWT = re.compile(r"BEGIN NATS USER JWT[^\n]*\n(\S*)")
_CREDS_SEED = re.compile(r"BEGIN USER NKEY SEED[^\n]*\n(\S*)")


def creds_file_problem(path: str) -> str | None:
    """What makes ``path`` unusable as a NATS creds file, or None.

    Checked before connecting because nats-py cannot report it: a file without
    the JWT section makes it loop forever reading past the end (blocking the
    event loop), one without the seed fails with a TypeError.
    """
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read(64 * 1024)
    except (OSError, UnicodeDecodeError) as exc:
        return f"cannot be read ({exc.__class__.__name__}: {exc})"
    jwt = _CREDS_JWT.search(text)
    if jwt is None or jwt[1].count(".") != 2:
        return "no user JWT on the line after 'BEGIN NATS USER JWT'"
    seed = _CREDS_SEED.search(text)
    if seed is None or not seed[1].startswith("SU"):
        return "no user NKey seed (SU...) on the line after 'BEGIN USER NKEY SEED'"
    return None


def parse_reply(reply: Msg, reply_type: type[T]) -> T:
    headers = reply.headers or {}
    if ERROR_CODE_HEADER in headers:
        try:
            body = decode(reply.data, ErrorReply).error
        except msgspec.DecodeError:
            body = ErrorBody(code="internal_error", message=headers.get(ERROR_HEADER, ""))
        try:
            status = int(headers[ERROR_CODE_HEADER])
        except ValueError:
            status = 500
        raise RemoteError(status, body)
    return decode(reply.data, reply_type)
