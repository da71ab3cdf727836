"""A message in SMTP DATA form, as byte chunks that messages may share.

A campaign's attachments are the same for every recipient: encoded once, their
base64 lines are one set of chunks that every message of the campaign points
to, instead of each message carrying its own copy (20 MiB of attachments for
a batch of 100 would otherwise be ~2.8 GB). The transport writes the chunks
one after the other, so a message is never joined into one bytes object.

Every chunk holds whole CRLF-terminated lines and is already dot-stuffed
(RFC 5321 4.5.2): chunks are made DATA-safe one by one, when they are built,
which is correct because each one starts at a line start. Only the final
``.\\r\\n`` is left to the transport.
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

__all__ = ["Payload", "data_safe"]


def data_safe(data: bytes) -> bytes:
    """``data`` as whole CRLF lines with every line that starts with "." doubled.

    Returns ``data`` itself when it already is (the common case: base64 and
    header lines never start with "."), so a large shared chunk is not copied.
    """
    crlf = data.count(b"\r\n")
    if data.count(b"\n") != crlf or data.count(b"\r") != crlf:
        data = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").replace(b"\n", b"\r\n")
    if data.startswith(b"."):
        data = b"." + data
    data = data.replace(b"\r\n.", b"\r\n..")
    if data and not data.endswith(b"\r\n"):
        data += b"\r\n"
    return data


class Payload(msgspec.Struct, frozen=True):
    """A message as DATA-safe chunks (see the module docstring); build it with ``of``."""

    chunks: tuple[bytes, ...]

    @classmethod
    def of(cls, *parts: bytes | Payload) -> Payload:
        """Joins raw bytes (made DATA-safe here) and payloads (taken as they are)."""
        chunks: list[bytes] = []
        for part in parts:
            if isinstance(part, Payload):
                chunks.extend(part.chunks)
            elif part:
                chunks.append(data_safe(part))
        return cls(tuple(chunks))

    @classmethod
    def trusted(cls, chunks: Iterable[bytes]) -> Payload:
        """Chunks the caller built DATA-safe itself (e.g. base64 lines): not scanned again."""
        return cls(tuple(c for c in chunks if c))

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.chunks)

    def isascii(self) -> bool:
        return all(c.isascii() for c in self.chunks)

    def wire(self) -> bytes:
        """The chunks in one object, dot-stuffed as on the wire (tests, small messages)."""
        return b"".join(self.chunks)
