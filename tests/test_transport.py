"""SmtpTransport against real SMTP servers on loopback.

Most tests run aiosmtpd (its own thread and loop) with a small recording handler;
the failure modes aiosmtpd cannot produce (dropping the line at the DATA command,
never answering after the payload) use a scripted asyncio server instead.
"""

# Russian test content is intended: Cyrillic letters are not look-alikes here.

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword
from aiosmtplib import (
    SMTPAuthenticationError,
    SMTPConnectError,
    SMTPDataError,
    SMTPReadTimeoutError,
    SMTPRecipientRefused,
    SMTPResponseException,
    SMTPSenderRefused,
    SMTPServerDisconnected,
    SMTPTimeoutError,
)

from mailer.transport import (
    ConnectionSetupError,
    InDoubtError,
    SendResult,
    SmtpTransport,
    UnsendableError,
    classify,
)

HOST = "127.0.0.1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def message(n: int) -> bytes:
    return (
        f"From: <news@shop.example>\r\nTo: <user{n}@example.com>\r\n"
        f"Subject: test {n}\r\nMessage-ID: <m{n}@shop.example>\r\n\r\n"
        f"Body of message {n}.\r\n.leading dot line\r\n"
    ).encode()


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    content: bytes
    mail_options: list[str]
    peer: Any


@dataclass
class Recorder:
    """aiosmtpd handler: records what arrives; some addresses get refused."""

    data_delay: float = 0.0
    drop_after_data: bool = False
    close_after_reply: bool = False
    messages: list[Received] = field(default_factory=list)
    # Set from the server's thread when a payload arrived.
    arrived: threading.Event = field(default_factory=threading.Event)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, rcpt_options: list[str]
    ) -> str:
        if address.startswith("bad"):
            return f"550 5.1.1 <{address}>: Recipient address rejected: User unknown"
        if address.startswith("later"):
            return "451 4.3.0 Temporary failure, try again later"
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 Ok"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                bytes(envelope.original_content),
                list(envelope.mail_options),
                session.peer,
            )
        )
        self.arrived.set()
        if self.data_delay:
            await asyncio.sleep(self.data_delay)
        if self.drop_after_data:
            # The message is stored, but the client never hears the 250.
            server.transport.abort()
        elif self.close_after_reply:
            # Like a server's idle timeout: the session dies between transactions.
            asyncio.get_running_loop().call_later(0.05, server.transport.close)
        return f"250 2.0.0 Ok: queued as Q{len(self.messages)}"

    @property
    def connections(self) -> int:
        return len({m.peer for m in self.messages})


ServerFactory = Callable[..., tuple[Recorder, int]]


@pytest.fixture
def smtp_server() -> Iterator[ServerFactory]:
    """Starts aiosmtpd servers on free loopback ports; stops them afterwards."""
    controllers: list[Controller] = []

    def start(recorder: Recorder | None = None, **kwargs: Any) -> tuple[Recorder, int]:
        handler = recorder or Recorder()
        port = free_port()
        controller = Controller(handler, hostname=HOST, port=port, **kwargs)
        controller.start()
        controllers.append(controller)
        return handler, port

    yield start
    for controller in controllers:
        controller.stop()


@contextlib.asynccontextmanager
async def transport(port: int, **overrides: Any) -> AsyncIterator[SmtpTransport]:
    kwargs: dict[str, Any] = {
        "security": "none",
        "username": None,
        "password": None,
        "timeout": 5.0,
        "connections": 4,
        "local_hostname": "client.test",
    }
    kwargs.update(overrides)
    smtp = SmtpTransport(HOST, port, **kwargs)
    await smtp.start()
    try:
        yield smtp
    finally:
        await smtp.close()


# --- sending ---------------------------------------------------------------------


async def test_concurrent_sends_arrive_exactly_once_over_reused_connections(
    smtp_server: ServerFactory,
) -> None:
    recorder, port = smtp_server()
    count = 200
    async with transport(port, connections=4) as smtp:
        results = await asyncio.gather(
            *(
                smtp.send("news@shop.example", f"user{n}@example.com", message(n))
                for n in range(count)
            )
        )
    assert [r.outcome for r in results] == ["sent"] * count
    assert all(
        r.smtp_code == 250 and r.provider_answer.startswith("250 2.0.0 Ok: queued as Q")
        for r in results
    )
    assert all(r.error is None and not r.in_doubt and r.took_ms > 0 for r in results)
    got = sorted(m.rcpt_tos[0] for m in recorder.messages)
    assert got == sorted(f"user{n}@example.com" for n in range(count))
    # Dot-stuffing round-trips: the server un-stuffs the leading dot.
    assert b"\r\n.leading dot line\r\n" in recorder.messages[0].content
    assert 1 <= recorder.connections <= 4 < count


async def test_sequential_sends_reuse_one_connection(smtp_server: ServerFactory) -> None:
    recorder, port = smtp_server()
    async with transport(port, connections=2) as smtp:
        for n in range(10):
            assert (
                await smtp.send("news@shop.example", f"u{n}@example.com", message(n))
            ).outcome == "sent"
    assert len(recorder.messages) == 10
    assert recorder.connections == 1


async def test_550_at_rcpt_is_permanent_and_the_connection_survives(
    smtp_server: ServerFactory,
) -> None:
    recorder, port = smtp_server()
    async with transport(port, connections=1) as smtp:
        refused = await smtp.send("news@shop.example", "bad@example.com", message(1))
        after = await smtp.send("news@shop.example", "good@example.com", message(2))
    assert refused.outcome == "permanent"
    assert refused.smtp_code == 550
    assert refused.provider_answer == (
        "550 5.1.1 <bad@example.com>: Recipient address rejected: User unknown"
    )
    assert refused.error is not None and refused.error.startswith("RCPT")
    assert not refused.in_doubt
    assert after.outcome == "sent"
    assert [m.rcpt_tos for m in recorder.messages] == [["good@example.com"]]
    assert recorder.connections == 1  # RSET, not a new connection


async def test_451_is_transient(smtp_server: ServerFactory) -> None:
    _, port = smtp_server()
    async with transport(port) as smtp:
        result = await smtp.send("news@shop.example", "later@example.com", message(1))
    assert result.outcome == "transient"
    assert result.smtp_code == 451
    assert result.provider_answer == "451 4.3.0 Temporary failure, try again later"
    assert not result.in_doubt


async def test_server_not_listening_is_transient() -> None:
    async with transport(free_port(), timeout=2.0) as smtp:
        result = await smtp.send("news@shop.example", "user@example.com", message(1))
    assert result.outcome == "transient"
    assert result.smtp_code is None and result.provider_answer == ""
    assert result.error is not None and result.error.startswith("connect")
    assert "SMTPConnectError" in result.error
    assert not result.in_doubt


async def test_drop_after_data_payload_is_in_doubt(smtp_server: ServerFactory) -> None:
    recorder, port = smtp_server(Recorder(drop_after_data=True))
    async with transport(port) as smtp:
        result = await smtp.send("news@shop.example", "user@example.com", message(1))
    assert result.outcome == "transient"
    assert result.in_doubt
    assert result.error is not None and "in doubt" in result.error
    # ...and rightly so: the server did take the message.
    assert len(recorder.messages) == 1


async def test_reconnects_after_the_server_closed_an_idle_connection(
    smtp_server: ServerFactory,
) -> None:
    recorder, port = smtp_server(Recorder(close_after_reply=True))
    async with transport(port, connections=1) as smtp:
        first = await smtp.send("news@shop.example", "a@example.com", message(1))
        await asyncio.sleep(0.3)  # the server hangs up meanwhile
        second = await smtp.send("news@shop.example", "b@example.com", message(2))
    assert (first.outcome, second.outcome) == ("sent", "sent")
    assert recorder.connections == 2


# --- scripted server for what aiosmtpd cannot do ---------------------------------


@dataclass
class Script:
    # "close_at_data": hang up at the DATA command, before the 354;
    # "silent_after_payload": take the payload, never answer;
    # "close_at_second_mail": serve one transaction per connection, then hang up
    #   when the next MAIL arrives (a server's idle timeout racing our reuse).
    mode: str
    payloads: list[bytes] = field(default_factory=list)
    connections: int = 0
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mails = 0
        try:
            writer.write(b"220 scripted ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper()
                if verb in (b"EHLO", b"HELO"):
                    writer.write(b"250-scripted\r\n250 8BITMIME\r\n")
                elif verb == b"MAIL":
                    mails += 1
                    if self.mode == "close_at_second_mail" and mails > 1:
                        break
                    writer.write(b"250 Ok\r\n")
                elif verb in (b"RCPT", b"RSET", b"NOOP"):
                    writer.write(b"250 Ok\r\n")
                elif verb == b"QUIT":
                    writer.write(b"221 Bye\r\n")
                    break
                elif verb == b"DATA":
                    if self.mode == "close_at_data":
                        break
                    writer.write(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    self.payloads.append(await reader.readuntil(b"\r\n.\r\n"))
                    if self.mode == "silent_after_payload":
                        await self.release.wait()  # never answers
                        break
                    writer.write(f"250 Ok: queued as S{len(self.payloads)}\r\n".encode())
                await writer.drain()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def scripted(mode: str) -> AsyncIterator[tuple[Script, int]]:
    script = Script(mode)
    server = await asyncio.start_server(script.handle, HOST, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield script, port
    finally:
        script.release.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)  # let the handlers finish closing


async def test_drop_at_the_data_command_is_not_in_doubt() -> None:
    async with scripted("close_at_data") as (_, port), transport(port) as smtp:
        result = await smtp.send("news@shop.example", "user@example.com", message(1))
    assert result.outcome == "transient"
    assert not result.in_doubt
    assert result.error is not None and result.error.startswith("DATA")


async def test_no_reply_after_the_payload_is_in_doubt() -> None:
    async with scripted("silent_after_payload") as (script, port):
        async with transport(port, timeout=0.5) as smtp:
            result = await smtp.send("news@shop.example", "user@example.com", message(1))
        assert len(script.payloads) == 1
    assert result.outcome == "transient"
    assert result.in_doubt
    assert result.error is not None and "in doubt" in result.error
    assert "SMTPReadTimeoutError" in result.error


async def test_a_pooled_connection_closed_under_our_mail_is_retried_once() -> None:
    async with scripted("close_at_second_mail") as (script, port):
        async with transport(port, connections=1) as smtp:
            first = await smtp.send("news@shop.example", "a@example.com", message(1))
            second = await smtp.send("news@shop.example", "b@example.com", message(2))
        assert (first.outcome, second.outcome) == ("sent", "sent"), second
        assert second.provider_answer == "250 Ok: queued as S2"
        assert len(script.payloads) == 2
        assert script.connections == 2


# --- SMTPUTF8 ---------------------------------------------------------------------


async def test_smtputf8_recipient_when_the_server_offers_it(smtp_server: ServerFactory) -> None:
    recorder, port = smtp_server(enable_SMTPUTF8=True)
    data = "To: <пользователь@xn--e1afmkfd.xn--p1ai>\r\nSubject: x\r\n\r\nПривет\r\n".encode()
    async with transport(port) as smtp:
        result = await smtp.send("news@shop.example", "пользователь@пример.рф", data)
    assert result.outcome == "sent", result
    (got,) = recorder.messages
    assert got.rcpt_tos == ["пользователь@xn--e1afmkfd.xn--p1ai"]
    assert "SMTPUTF8" in got.mail_options
    assert got.content.replace(b"\r\n", b"\n") == data.replace(b"\r\n", b"\n")


async def test_idn_domain_alone_needs_no_smtputf8(smtp_server: ServerFactory) -> None:
    recorder, port = smtp_server(enable_SMTPUTF8=False)
    async with transport(port) as smtp:
        result = await smtp.send("news@shop.example", "ivan@пример.рф", message(1))
    assert result.outcome == "sent", result
    assert recorder.messages[0].rcpt_tos == ["ivan@xn--e1afmkfd.xn--p1ai"]


async def test_non_ascii_local_part_without_smtputf8_is_permanent(
    smtp_server: ServerFactory,
) -> None:
    recorder, port = smtp_server(enable_SMTPUTF8=False)
    async with transport(port, connections=1) as smtp:
        result = await smtp.send("news@shop.example", "пользователь@пример.рф", message(1))
        after = await smtp.send("news@shop.example", "ok@example.com", message(2))
    assert result.outcome == "permanent"
    assert result.error is not None and "SMTPUTF8" in result.error
    assert after.outcome == "sent"
    assert recorder.connections == 1


async def test_invalid_address_is_permanent_without_touching_the_network() -> None:
    async with transport(free_port()) as smtp:
        result = await smtp.send("news@shop.example", "a b@example.com\r\nRCPT TO:<x@y>", b"x")
    assert result.outcome == "permanent"
    assert result.error is not None and result.error.startswith("address")


# --- auth ------------------------------------------------------------------------


def authenticator(
    server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and auth_data == (b"mailer", b"s3cret")
    # handled=False: aiosmtpd itself then answers 235 or 535.
    return AuthResult(success=ok, handled=False)


NO_TLS_WARNING = pytest.mark.filterwarnings("ignore:Requiring AUTH while not requiring TLS")


@NO_TLS_WARNING
async def test_auth_with_username_and_password(smtp_server: ServerFactory) -> None:
    recorder, port = smtp_server(
        authenticator=authenticator, auth_required=True, auth_require_tls=False
    )
    async with transport(port, username="mailer", password="s3cret") as smtp:
        result = await smtp.send("news@shop.example", "user@example.com", message(1))
    assert result.outcome == "sent", result
    assert len(recorder.messages) == 1


@NO_TLS_WARNING
async def test_wrong_password_is_transient_not_a_dead_address(smtp_server: ServerFactory) -> None:
    recorder, port = smtp_server(
        authenticator=authenticator, auth_required=True, auth_require_tls=False
    )
    async with transport(port, username="mailer", password="wrong") as smtp:
        result = await smtp.send("news@shop.example", "user@example.com", message(1))
    assert result.outcome == "transient"
    assert result.smtp_code == 535
    assert result.error is not None and result.error.startswith("connect")
    assert recorder.messages == []


# --- TLS --------------------------------------------------------------------------


def make_certificate(directory: Path) -> tuple[Path, Path, Path]:
    """A certificate for 127.0.0.1/localhost: (chain.pem, key.pem, ca.pem to trust).

    Uses the `cryptography` package if installed, else `trustme`, else the
    `openssl` command if on PATH (nothing is installed for it); skips otherwise.
    """
    chain, key = directory / "chain.pem", directory / "key.pem"
    with contextlib.suppress(ImportError):
        _cert_with_cryptography(chain, key)
        return chain, key, chain  # self-signed: it is its own CA
    try:
        import trustme  # type: ignore[import-not-found]
    except ImportError:
        pass
    else:
        ca = trustme.CA()
        issued = ca.issue_cert(HOST, "localhost")
        issued.private_key_pem.write_to_path(str(key))
        for n, blob in enumerate(issued.cert_chain_pems):
            blob.write_to_path(str(chain), append=n > 0)
        ca.cert_pem.write_to_path(str(directory / "ca.pem"))
        return chain, key, directory / "ca.pem"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip(
            "TLS tests need the `cryptography` or `trustme` package or the openssl "
            "command to make a test certificate; none is available"
        )
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-nodes", "-days", "2", "-subj", "/CN=localhost"),
            *("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-keyout", str(key), "-out", str(chain)),
            *("-addext", f"subjectAltName=IP:{HOST},DNS:localhost"),
        ],
        check=True,
        capture_output=True,
    )
    return chain, key, chain


def _cert_with_cryptography(cert: Path, key: Path) -> None:
    import datetime as dt
    import ipaddress

    from cryptography import x509  # type: ignore[import-not-found]
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    private = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address(HOST))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(private, hashes.SHA256())
    )
    cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(
        private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context, client context trusting the server's certificate)."""
    chain, key, ca = make_certificate(tmp_path)
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(chain, key)
    client = ssl.create_default_context(cafile=str(ca))
    return server, client


async def test_starttls_with_a_verified_certificate(
    smtp_server: ServerFactory, tls_files: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, client_ctx = tls_files
    recorder, port = smtp_server(tls_context=server_ctx, require_starttls=True)
    async with transport(port, security="starttls", tls_context=client_ctx) as smtp:
        results = [
            await smtp.send("news@shop.example", f"u{n}@example.com", message(n)) for n in range(3)
        ]
    assert [r.outcome for r in results] == ["sent"] * 3, results
    assert recorder.connections == 1


async def test_implicit_tls_without_verification(
    smtp_server: ServerFactory, tls_files: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, _ = tls_files
    recorder, port = smtp_server(ssl_context=server_ctx)
    async with transport(port, security="tls", tls_verify=False) as smtp:
        result = await smtp.send("news@shop.example", "user@example.com", message(1))
    assert result.outcome == "sent", result
    assert len(recorder.messages) == 1


async def test_untrusted_certificate_is_transient(
    smtp_server: ServerFactory, tls_files: tuple[ssl.SSLContext, ssl.SSLContext]
) -> None:
    server_ctx, _ = tls_files
    recorder, port = smtp_server(tls_context=server_ctx, require_starttls=True)
    async with transport(port, security="starttls", tls_verify=True) as smtp:
        result = await smtp.send("news@shop.example", "user@example.com", message(1))
    assert result.outcome == "transient"
    assert result.error is not None and "CERTIFICATE_VERIFY_FAILED" in result.error
    assert recorder.messages == []


# --- close ----------------------------------------------------------------------


async def test_close_is_idempotent_and_waits_for_a_send_in_flight(
    smtp_server: ServerFactory,
) -> None:
    recorder, port = smtp_server(Recorder(data_delay=0.5))
    smtp = SmtpTransport(
        HOST,
        port,
        security="none",
        username=None,
        password=None,
        timeout=5.0,
        connections=2,
        local_hostname="client.test",
    )
    await smtp.start()
    in_flight = asyncio.create_task(smtp.send("news@shop.example", "user@example.com", message(1)))
    # Wait until the payload is at the server and its 250 is pending.
    assert await asyncio.to_thread(recorder.arrived.wait, 5)
    started = time.monotonic()
    await asyncio.gather(smtp.close(), smtp.close())
    assert time.monotonic() - started >= 0.3
    assert in_flight.done()
    assert in_flight.result().outcome == "sent"
    await smtp.close()  # again, after the fact
    late = await smtp.send("news@shop.example", "user@example.com", message(2))
    assert (late.outcome, late.error) == ("transient", "transport closed")
    assert len(recorder.messages) == 1


async def test_close_cuts_a_send_that_outlives_the_grace_period(
    smtp_server: ServerFactory,
) -> None:
    recorder, port = smtp_server(Recorder(data_delay=2.0))
    smtp = SmtpTransport(
        HOST,
        port,
        security="none",
        username=None,
        password=None,
        timeout=5.0,
        connections=1,
        local_hostname="client.test",
    )
    in_flight = asyncio.create_task(smtp.send("news@shop.example", "user@example.com", message(1)))
    assert await asyncio.to_thread(recorder.arrived.wait, 5)
    await smtp.close(grace=0.1)
    result = await in_flight
    assert result.outcome == "transient" and result.in_doubt


# --- classification ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (SMTPRecipientRefused(550, "5.1.1 User unknown", "a@b.c"), "permanent"),
        (SMTPRecipientRefused(450, "4.2.0 Mailbox busy", "a@b.c"), "transient"),
        (SMTPSenderRefused(553, "5.7.1 Sender rejected", "a@b.c"), "permanent"),
        (SMTPSenderRefused(451, "4.7.1 Greylisted", "a@b.c"), "transient"),
        (SMTPDataError(554, "5.7.1 Spam"), "permanent"),
        (SMTPDataError(452, "4.3.1 Insufficient storage"), "transient"),
        (SMTPResponseException(521, "no mail here"), "permanent"),
        (SMTPResponseException(421, "closing"), "transient"),
        (SMTPResponseException(-1, "Malformed SMTP response line"), "transient"),
        (SMTPAuthenticationError(535, "5.7.8 bad credentials"), "transient"),
        (SMTPReadTimeoutError("timed out"), "transient"),
        (SMTPTimeoutError("timed out"), "transient"),
        (TimeoutError(), "transient"),
        (ConnectionRefusedError(111, "refused"), "transient"),
        (ConnectionResetError(104, "reset"), "transient"),
        (SMTPConnectError("cannot connect"), "transient"),
        (SMTPServerDisconnected("lost"), "transient"),
        (ssl.SSLError(1, "handshake failure"), "transient"),
        (ConnectionSetupError("x"), "transient"),
        (InDoubtError("x"), "transient"),
        (UnsendableError("bad address"), "permanent"),
        (RuntimeError("who knows"), "transient"),
    ],
)
def test_classify(exc: BaseException, expected: str) -> None:
    assert classify(exc) == expected


def test_send_result_is_a_frozen_struct() -> None:
    result = SendResult(
        outcome="sent", smtp_code=250, provider_answer="250 ok", error=None, took_ms=1.0
    )
    assert result.in_doubt is False
    with pytest.raises(AttributeError):
        result.outcome = "permanent"  # type: ignore[misc]
