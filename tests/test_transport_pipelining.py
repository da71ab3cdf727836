"""SMTP PIPELINING (RFC 2920) in the transport: MAIL, RCPT and DATA in one write.

The scripted server here buffers its replies until the DATA command, as a
pipelining server may: a client that waited for each reply would hang on MAIL
and time out, so a message that is sent proves the envelope went in one round
trip. Refusals, a lost connection and a server that answers 354 to a refused
envelope keep the one-command path's verdicts (permanent, transient, never in
doubt before the payload).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mailer.transport import SmtpTransport
from tests.test_transport import transport as plain_transport

HOST = "127.0.0.1"


def message(n: int) -> bytes:
    return (
        f"From: <news@shop.example>\r\nTo: <user{n}@example.com>\r\n"
        f"Subject: test {n}\r\n\r\nBody {n}.\r\n.leading dot line\r\n"
    ).encode()


@dataclass
class Pipelining:
    # "": a good server; "354_anyway": answers DATA with 354 even when no recipient
    # was accepted; "close_after_envelope": reads the envelope, hangs up unanswered;
    # "close_at_second_mail": one transaction per connection, then hangs up at MAIL.
    mode: str = ""
    offer: bool = True
    # The commands each flush of replies answered, in order.
    rounds: list[list[str]] = field(default_factory=list)
    payloads: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        mails = 0
        pending: list[bytes] = []
        verbs: list[str] = []
        accepted = 0

        async def flush() -> None:
            self.rounds.append(list(verbs))
            verbs.clear()
            writer.write(b"".join(pending))
            pending.clear()
            await writer.drain()

        try:
            writer.write(b"220 scripted ESMTP\r\n")
            while line := await reader.readline():
                verb = line[:4].upper().decode()
                verbs.append(verb)
                if verb in ("EHLO", "HELO"):
                    offered = b"250-PIPELINING\r\n" if self.offer else b""
                    pending.append(b"250-scripted\r\n" + offered + b"250 8BITMIME\r\n")
                elif verb == "MAIL":
                    mails += 1
                    accepted = 0
                    if self.mode == "close_at_second_mail" and mails > 1:
                        break
                    pending.append(b"250 2.1.0 Ok\r\n")
                elif verb == "RCPT":
                    if b"<reject" in line:
                        pending.append(b"550 5.1.1 No such user\r\n")
                    else:
                        accepted += 1
                        pending.append(b"250 2.1.5 Ok\r\n")
                elif verb == "DATA":
                    if self.mode == "close_after_envelope":
                        break
                    if accepted == 0 and self.mode != "354_anyway":
                        pending.append(b"554 5.5.1 Error: no valid recipients\r\n")
                        await flush()
                        continue
                    pending.append(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    await flush()
                    body = await reader.readuntil(b".\r\n")
                    if body == b".\r\n" or accepted == 0:
                        pending.append(b"554 5.5.1 Error: no valid recipients\r\n")
                    else:
                        if not body.endswith(b"\r\n.\r\n"):
                            body += await reader.readuntil(b"\r\n.\r\n")
                        self.payloads.append(body)
                        pending.append(f"250 Ok: queued as P{len(self.payloads)}\r\n".encode())
                elif verb == "QUIT":
                    pending.append(b"221 Bye\r\n")
                    await flush()
                    break
                else:  # RSET, NOOP
                    pending.append(b"250 Ok\r\n")
                # A pipelining server answers the group at its end (DATA, or a command
                # that must wait for its reply); one that does not offer it, at once.
                if not self.offer or verb in ("EHLO", "HELO", "RSET", "NOOP", "DATA"):
                    await flush()
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def serving(script: Pipelining) -> AsyncIterator[int]:
    server = await asyncio.start_server(script.handle, HOST, 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0.05)


def transport(port: int, **overrides: Any) -> contextlib.AbstractAsyncContextManager[SmtpTransport]:
    # A short timeout: a client that waited for MAIL's reply fails, not hangs the test.
    return plain_transport(port, **{"timeout": 1.0, "connections": 1, **overrides})


def _envelopes(script: Pipelining) -> list[list[str]]:
    return [r for r in script.rounds if r and r[0] == "MAIL"]


async def test_the_envelope_goes_in_one_round_trip_when_the_server_offers_it() -> None:
    script = Pipelining()
    async with serving(script) as port, transport(port) as smtp:
        results = [
            await smtp.send("news@shop.example", f"user{n}@example.com", message(n))
            for n in range(3)
        ]
    assert [r.outcome for r in results] == ["sent"] * 3, results
    assert [r.provider_answer for r in results] == [f"250 Ok: queued as P{n}" for n in (1, 2, 3)]
    # Each reply flush answered the whole envelope: MAIL, RCPT and DATA arrived together.
    assert _envelopes(script) == [["MAIL", "RCPT", "DATA"]] * 3
    assert script.connections == 1
    # The payload went after the 354, dot-stuffed, as the one-command path sends it.
    assert script.payloads[0].endswith(b"Body 0.\r\n..leading dot line\r\n.\r\n")


async def test_without_the_extension_commands_go_one_at_a_time() -> None:
    script = Pipelining(offer=False)
    async with serving(script) as port, transport(port) as smtp:
        result = await smtp.send("news@shop.example", "user1@example.com", message(1))
    assert result.outcome == "sent", result
    assert _envelopes(script) == [["MAIL"]]
    assert ["RCPT"] in script.rounds and ["DATA"] in script.rounds


async def test_a_refused_recipient_is_permanent_and_the_session_goes_on() -> None:
    script = Pipelining()
    async with serving(script) as port, transport(port) as smtp:
        refused = await smtp.send("news@shop.example", "reject@example.com", message(1))
        after = await smtp.send("news@shop.example", "user2@example.com", message(2))
    assert refused.outcome == "permanent" and not refused.in_doubt, refused
    assert refused.smtp_code == 550
    assert refused.error is not None and refused.error.startswith("RCPT"), refused.error
    assert after.outcome == "sent", after
    assert script.connections == 1  # reset (RSET) and reused
    assert len(script.payloads) == 1


async def test_a_354_after_a_refused_envelope_gets_an_empty_end_of_data() -> None:
    script = Pipelining(mode="354_anyway")
    async with serving(script) as port, transport(port) as smtp:
        refused = await smtp.send("news@shop.example", "reject@example.com", message(1))
        after = await smtp.send("news@shop.example", "user2@example.com", message(2))
    assert refused.outcome == "permanent" and refused.smtp_code == 550, refused
    assert after.outcome == "sent", after
    # Nothing of the refused message went out: the server saw only the empty end.
    assert len(script.payloads) == 1 and b"Body 2." in script.payloads[0]
    assert script.connections == 1


async def test_a_connection_lost_before_the_replies_is_transient_not_in_doubt() -> None:
    script = Pipelining(mode="close_after_envelope")
    async with serving(script) as port, transport(port) as smtp:
        result = await smtp.send("news@shop.example", "user1@example.com", message(1))
    assert result.outcome == "transient", result
    assert not result.in_doubt
    assert result.error is not None and result.error.startswith("MAIL"), result.error
    assert script.payloads == []


async def test_a_pooled_session_closed_under_the_envelope_is_retried_once() -> None:
    script = Pipelining(mode="close_at_second_mail")
    async with serving(script) as port, transport(port) as smtp:
        first = await smtp.send("news@shop.example", "a@example.com", message(1))
        second = await smtp.send("news@shop.example", "b@example.com", message(2))
    assert (first.outcome, second.outcome) == ("sent", "sent"), second
    assert len(script.payloads) == 2 and script.connections == 2


async def test_concurrent_sends_over_pipelined_connections_each_arrive_once() -> None:
    script = Pipelining()
    async with serving(script) as port, transport(port, connections=4) as smtp:
        results = await asyncio.gather(
            *(smtp.send("news@shop.example", f"user{n}@example.com", message(n)) for n in range(40))
        )
    assert all(r.outcome == "sent" for r in results)
    assert sorted(p.split(b"Body ")[1].split(b".")[0] for p in script.payloads) == sorted(
        str(n).encode() for n in range(40)
    )
