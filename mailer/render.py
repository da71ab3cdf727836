"""MIME rendering built for throughput: render a campaign once, personalize cheaply.

Building every message with the standard library's ``email`` package costs about
1.5 ms, which would cap one process at ~500 messages/s. Here the stdlib is used
only at template build time (folding and RFC 2047-encoding the static headers,
encoding attachments); per recipient, ``MessageTemplate.render`` only fills
pre-split body segments, base64-encodes the two bodies with ``binascii`` and
joins pre-built byte strings: tens of microseconds per message.
``MessageTemplate.render_payload`` does not even join: it returns the message
as chunks (``mailer.payload.Payload``) in which the attachments, encoded once
per template, are the same objects for every recipient.

Template language: ``{{name}}``, ``{{email}}``, ``{{unsubscribe_url}}`` and any
``{{var}}`` from the recipient's variables (whitespace inside the braces is
allowed). Unknown variables render as "". Values are HTML-escaped in the HTML
part and inserted raw in the text part. There is no escape syntax for a literal
``{{word}}``.

Personalization of the Subject is NOT supported: the subject is RFC 2047-encoded
once per template, and a subject containing a ``{{var}}`` placeholder is refused
with ``ValueError`` rather than being sent with the placeholder verbatim.

Internationalized addresses: the domain part is IDNA-encoded (stdlib ``idna``
codec, i.e. IDNA 2003); a non-ASCII local part is kept as raw UTF-8 in the To
header (RFC 6532), so such a message needs a server that offers SMTPUTF8 -- the
transport negotiates that, and ``{{email}}`` in the bodies shows the address as
given.
"""

from __future__ import annotations

import binascii
import email.policy
import functools
import html
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from email.header import Header
from email.message import MIMEPart
from email.utils import format_datetime, parseaddr

from mailer.dkim import BoundSigner, DkimSigner
from mailer.payload import Payload, data_safe
from mailer.texts import text

__all__ = [
    "Attachment",
    "MessageTemplate",
    "check_attachment",
    "idna_address",
    "make_message_id",
]

# (filename, content type such as "application/pdf", raw bytes)
Attachment = tuple[str, str, bytes]

_PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*\}\}")
_HEADER_NAME = re.compile(r"[!-9;-~]+")  # RFC 5322 ftext: printable ASCII but ':'
# Characters that force a display name into a quoted-string; quoting always is
# legal, but leaving plain names bare keeps headers looking like a human wrote them.
_PLAIN_NAME = re.compile(r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~\- ]+")
# Whitespace, controls and brackets would break out of "<addr>" or the SMTP command.
_BAD_ADDRESS_CHAR = re.compile(r"[\s<>\x00-\x1f\x7f]")
# Tab and the characters str.splitlines() treats as line breaks besides CR/LF.
# Not an injection risk once RFC 2047-encoded, but folding and the stdlib parser
# (and others) split a header on them, so in names and the subject they become
# plain spaces.
_SPACE_LIKE = dict.fromkeys(map(ord, "\t\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), " ")
# Longer ASCII names go through Header so they are folded under the 998-octet limit.
_MAX_QUOTED_NAME = 150

# Headers the template writes itself: an extra header of the same name would
# produce a duplicate that receivers resolve inconsistently.
_RESERVED_HEADERS = frozenset(
    {
        "from",
        "to",
        "cc",
        "bcc",
        "subject",
        "date",
        "message-id",
        "mime-version",
        "reply-to",
        "sender",
        "return-path",
        "list-unsubscribe",
        "list-unsubscribe-post",
    }
)

# The footer wording is user-facing text: it lives with every other one.
_TEXT_FOOTER = "\n\n--\n" + text("unsubscribe_footer") + ": {{unsubscribe_url}}"
_HTML_FOOTER = (
    '<p style="font-size:12px;color:#888888">'
    '<a href="{{unsubscribe_url}}">' + text("unsubscribe_footer") + "</a></p>"
)

_POLICY = email.policy.SMTP  # CRLF line endings; used for attachment parts only


def _check_header_value(what: str, value: str) -> None:
    if "\r" in value or "\n" in value:
        raise ValueError(f"{what} must not contain CR or LF (header injection)")


def _crlf(text: str) -> str:
    """Canonical form of text/* before base64 (RFC 2046 4.1.1): CRLF line breaks."""
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text.replace("\n", "\r\n")


def _b64_lines(data: bytes | memoryview) -> bytes:
    """Base64 in 76-character CRLF-terminated lines (RFC 2045 6.8).

    One C-level b2a_base64 call over the whole body plus slicing is faster than
    base64.encodebytes, which loops in Python over 57-byte chunks.
    """
    encoded = binascii.b2a_base64(data, newline=False)
    if not encoded:
        return b""
    return b"\r\n".join([encoded[i : i + 76] for i in range(0, len(encoded), 76)]) + b"\r\n"


@functools.lru_cache(maxsize=4096)
def _idna_domain(domain: str) -> str:
    # Recipient lists repeat a few domains endlessly; the cache makes IDNA free.
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError as exc:
        raise ValueError(f"invalid internationalized domain {domain!r}: {exc}") from None


def idna_address(address: str) -> str:
    """The address with its domain IDNA-encoded; a non-ASCII local part stays UTF-8.

    Raises ValueError for something that cannot be put inside ``<...>`` safely.
    """
    local, _, domain = address.rpartition("@")
    if not local or not domain or len(address) > 254 or _BAD_ADDRESS_CHAR.search(address):
        raise ValueError(f"invalid email address {address!r}")
    if domain.isascii():
        return address
    return f"{local}@{_idna_domain(domain)}"


def _display_name(name: str, header_name: str) -> str:
    """RFC 5322 display-name: bare, quoted, or RFC 2047 encoded-words (already folded).

    ``name`` is whitespace-normalized already (single spaces, stripped).
    """
    if name.isascii() and name.isprintable() and len(name) <= _MAX_QUOTED_NAME:
        if _PLAIN_NAME.fullmatch(name):
            return name
        return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'
    # Non-ASCII, control characters or very long: encoded-words carry any octets
    # and Header folds them into <= 75-character words split anywhere, as RFC
    # 2047 allows (receivers drop the whitespace between adjacent encoded-words).
    # header_name lets Header keep the first line, "To: " included, within 78.
    return Header(name, "utf-8", header_name=header_name).encode(linesep="\r\n")


def _encode_unstructured(header_name: str, value: str) -> str:
    """A folded unstructured header value, RFC 2047-encoded when needed.

    Not email.policy's fold(): in Python 3.11 it drops the space between two
    encoded-words of a long Cyrillic subject ("Очень длинная" -> "Оченьдлинная").
    """
    value = value.strip().translate(_SPACE_LIKE)
    # A run without spaces longer than this could not be folded under the
    # 998-octet line limit as plain text; encoded-words can be split anywhere.
    foldable = max(map(len, value.split(" ")), default=0) <= 900
    if value.isascii() and value.isprintable() and "=?" not in value and foldable:
        # "=?" would be taken for an encoded-word by the receiver: encode those.
        return Header(value, "us-ascii", header_name=header_name).encode(linesep="\r\n")
    return Header(value, "utf-8", header_name=header_name).encode(linesep="\r\n")


def _format_address(header_name: str, name: str | None, address: str) -> str:
    addr = idna_address(address)
    # Whitespace runs (tabs, NBSP, Unicode line breaks...) are not significant in
    # a display name and parsers collapse or split on them inconsistently, so a
    # name is sent with single spaces and no surrounding whitespace.
    name = " ".join(name.split()) if name else name
    if not name:
        return f"<{addr}>"
    display = _display_name(name, header_name)
    last_line = display.rpartition("\n")[2] if "\n" in display else f"{header_name}: {display}"
    if len(last_line) + len(addr) + 3 > 78:
        # Keep lines under the recommended 78 octets: fold before the address.
        return f"{display}\r\n <{addr}>"
    return f"{display} <{addr}>"


@dataclass(frozen=True, slots=True)
class _Body:
    """A body split once into literals and placeholder slots (no regex per message)."""

    parts: tuple[str, ...]
    slots: tuple[tuple[int, str], ...]  # (index into parts, variable name)

    @classmethod
    def compile(cls, source: str) -> _Body:
        # Line breaks of the template are canonicalized here, once, as a whole;
        # those inside values are canonicalized per value in fill().
        source = _crlf(source)
        parts: list[str] = []
        slots: list[tuple[int, str]] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(source):
            parts.append(source[pos : match.start()])
            slots.append((len(parts), match.group(1)))
            parts.append("")
            pos = match.end()
        parts.append(source[pos:])
        return cls(tuple(parts), tuple(slots))

    def uses(self, name: str) -> bool:
        return any(slot_name == name for _, slot_name in self.slots)

    def fill(
        self,
        builtins: Mapping[str, str],
        variables: Mapping[str, str],
        escape: bool,
    ) -> bytes:
        parts = list(self.parts)
        for index, name in self.slots:
            value = builtins.get(name)
            if value is None:
                value = variables.get(name, "")
            if escape:
                value = html.escape(value)
            if "\n" in value or "\r" in value:
                value = _crlf(value)
            parts[index] = value
        return _b64_lines("".join(parts).encode("utf-8"))


def _with_html_footer(source: str) -> str:
    """Puts the unsubscribe paragraph before the last </body>, else at the end."""
    at = source.lower().rfind("</body>")
    if at < 0:
        return source + _HTML_FOOTER
    return source[:at] + _HTML_FOOTER + source[at:]


def _new_boundary(avoid: Sequence[bytes]) -> str:
    # "=_" cannot occur in base64 output, so a collision with an encoded part is
    # impossible; the loop also guards against the raw bodies, cheaply, once.
    while True:
        boundary = "=_" + secrets.token_hex(16)
        raw = boundary.encode("ascii")
        if not any(raw in blob for blob in avoid):
            return boundary


# Input bytes per encoded chunk of an attachment: a multiple of 57 (one 76-character
# base64 line), ~76 KiB of output. Encoding block by block keeps the transient
# memory of a 10 MiB attachment at one block instead of several whole copies.
_ATTACHMENT_BLOCK = 57 * 1024


def _attachment_head(filename: str, content_type: str) -> bytes:
    """An attachment part's headers and blank line, built by the stdlib.

    Done once per template, so the stdlib's care with RFC 2231 filenames is worth
    it; the body is encoded apart (``_attachment_chunks``) because the stdlib
    would make several whole copies of a large one.
    """
    _check_header_value("attachment filename", filename)
    _check_header_value("attachment content type", content_type)
    maintype, slash, subtype = content_type.partition("/")
    if not slash or not maintype or not subtype or ";" in content_type:
        raise ValueError(f"invalid attachment content type {content_type!r}")
    part = MIMEPart(policy=_POLICY)
    part.set_content(
        b"",
        maintype=maintype.strip().lower(),
        subtype=subtype.strip().lower(),
        disposition="attachment",
        filename=filename,
        cte="base64",
    )
    raw = part.as_bytes(policy=_POLICY)
    head, sep, _ = raw.partition(b"\r\n\r\n")
    assert sep, "a MIME part always has a blank line after its headers"
    return head + b"\r\n\r\n"


def _attachment_chunks(filename: str, content_type: str, data: bytes) -> list[bytes]:
    """One attachment as a complete MIME part: its headers, then base64 blocks.

    Every chunk is whole CRLF lines, none starting with "." (base64 has no "."),
    so the chunks are DATA-safe as they are and shared by every message.
    """
    head = _attachment_head(filename, content_type)
    view = memoryview(data)
    body = (
        _b64_lines(view[i : i + _ATTACHMENT_BLOCK]) for i in range(0, len(data), _ATTACHMENT_BLOCK)
    )
    return [head, *body]


def check_attachment(filename: str, content_type: str) -> None:
    """Raises ValueError for an attachment the template would refuse.

    The very code ``MessageTemplate`` builds an attachment's part with (the
    content plays no part in what is refused), so the API that checks with it
    can never accept a file the engine cannot send.
    """
    _attachment_head(filename, content_type)


class MessageTemplate:
    """One campaign's message, rendered once; ``render`` personalizes per recipient.

    Thread-compatible and immutable after construction apart from a one-entry
    Date cache, so one template can serve every send of a campaign.
    """

    def __init__(
        self,
        *,
        from_email: str,
        from_name: str | None,
        subject: str,
        text: str | None = None,
        html: str | None = None,
        reply_to: str | None = None,
        message_id_domain: str,
        headers: Mapping[str, str] | None = None,
        attachments: Sequence[Attachment] = (),
        dkim: DkimSigner | None = None,
    ) -> None:
        if text is None and html is None:
            raise ValueError("a message needs a text body, an HTML body, or both")
        _check_header_value("subject", subject)
        _check_header_value("from_email", from_email)
        _check_header_value("message_id_domain", message_id_domain)
        if from_name is not None:
            _check_header_value("from_name", from_name)
        if reply_to is not None:
            _check_header_value("reply_to", reply_to)
        if _PLACEHOLDER.search(subject):
            raise ValueError(
                "personalization of the subject is not supported; remove {{...}} from it"
            )
        self.message_id_domain = message_id_domain

        lines: list[str] = []
        # Same encoder as To (not formataddr): formataddr emits one unfolded
        # encoded-word, several hundred octets long for a long Cyrillic name.
        from_value = _format_address("From", from_name, from_email)
        lines.append(f"From: {from_value}\r\n")
        # Parsers strip whitespace around an unstructured value anyway.
        subject_value = _encode_unstructured("Subject", subject)
        lines.append(f"Subject: {subject_value}\r\n")
        if reply_to:
            rt_name, rt_addr = parseaddr(reply_to)
            reply_header = _format_address("Reply-To", rt_name or None, rt_addr or reply_to)
            lines.append(f"Reply-To: {reply_header}\r\n")
        for name, value in (headers or {}).items():
            if not _HEADER_NAME.fullmatch(name):
                raise ValueError(f"invalid header name {name!r}")
            if name.lower() in _RESERVED_HEADERS or name.lower().startswith("content-"):
                raise ValueError(f"header {name!r} is set by the template itself")
            _check_header_value(f"header {name}", value)
            lines.append(f"{name}: {_encode_unstructured(name, value)}\r\n")
        lines.append("MIME-Version: 1.0\r\n")
        static_headers = "".join(lines).encode("utf-8")

        self._text = self._compile_text(text) if text is not None else None
        self._html = self._compile_html(html) if html is not None else None

        # Encoded here, once per campaign: every message shares these chunks.
        attachment_parts = [_attachment_chunks(*a) for a in attachments]
        avoid = [
            (text or "").encode("utf-8"),
            (html or "").encode("utf-8"),
            # "=_" cannot occur in base64: the parts' headers are all there is to check.
            *(part[0] for part in attachment_parts),
        ]
        alt_boundary = _new_boundary(avoid)
        mixed_boundary = _new_boundary([*avoid, alt_boundary.encode("ascii")])

        text_head = b'Content-Type: text/plain; charset="utf-8"\r\n'
        html_head = b'Content-Type: text/html; charset="utf-8"\r\n'
        cte = b"Content-Transfer-Encoding: base64\r\n\r\n"

        # The message is: head + [per-recipient headers] + mid + text + between +
        # html + tail. Everything static is bytes already; render() only joins.
        if self._text is not None and self._html is not None:
            alt = alt_boundary.encode("ascii")
            body_head = b'Content-Type: multipart/alternative;\r\n boundary="' + alt + b'"\r\n\r\n'
            body_mid = b"--" + alt + b"\r\n" + text_head + cte
            body_between = b"--" + alt + b"\r\n" + html_head + cte
            body_tail = b"--" + alt + b"--\r\n"
        elif self._text is not None:
            body_head, body_mid = text_head + cte, b""
            body_between = body_tail = b""
        else:
            body_head, body_mid = html_head + cte, b""
            body_between = body_tail = b""

        if attachment_parts:
            mixed = mixed_boundary.encode("ascii")
            sep = b"--" + mixed + b"\r\n"
            self._mid = (
                b'Content-Type: multipart/mixed;\r\n boundary="'
                + mixed
                + b'"\r\n\r\n'
                + sep
                + body_head
                + body_mid
            )
            pieces: list[bytes | Payload] = [body_tail]
            for head, *body in attachment_parts:
                pieces += [sep + head, Payload.trusted(body)]
            pieces.append(b"--" + mixed + b"--\r\n")
            # Boundaries, part headers and base64: no line starts with ".", so the
            # DATA form of the tail is also its plain form (render() joins it).
            self._tail = Payload.of(*pieces)
        else:
            self._mid = body_head + body_mid
            self._tail = Payload.of(body_tail)
        self._between = body_between
        self._static_headers = static_headers
        # The static pieces in DATA form, made once (data_safe returns the same
        # object when nothing needs stuffing, which is the rule).
        self._safe_static_headers = data_safe(static_headers)
        self._safe_mid = data_safe(self._mid)
        self._safe_between = data_safe(body_between)
        self._date_key: tuple[datetime, object] | None = None
        self._date_value = ""
        # DKIM: the static headers canonicalized once; the body begins after
        # the blank line, which is inside _mid.
        self._dkim: BoundSigner | None = None
        self._body_prefix = self._mid[self._mid.index(b"\r\n\r\n") + 4 :]
        if dkim is not None:
            self._dkim = dkim.bind(
                from_header=from_value.encode("utf-8"),
                subject_header=subject_value.encode("utf-8"),
            )

    @staticmethod
    def _compile_text(source: str) -> _Body:
        body = _Body.compile(source)
        if not body.uses("unsubscribe_url"):
            body = _Body.compile(source + _TEXT_FOOTER)
        return body

    @staticmethod
    def _compile_html(source: str) -> _Body:
        body = _Body.compile(source)
        if not body.uses("unsubscribe_url"):
            body = _Body.compile(_with_html_footer(source))
        return body

    def _date(self, date: datetime) -> str:
        # format_datetime costs ~3 µs; consecutive sends share the same second.
        key = (date.replace(microsecond=0), date.utcoffset())
        if key != self._date_key:
            self._date_value = format_datetime(date)
            self._date_key = key
        return self._date_value

    def render(
        self,
        *,
        to_email: str,
        to_name: str | None,
        variables: Mapping[str, str],
        message_id: str,
        date: datetime,
        unsubscribe_url: str,
    ) -> bytes:
        """The complete RFC 5322 message for one recipient, CRLF line endings.

        Raises ValueError on CR/LF in any per-recipient header input (to_email,
        to_name, message_id, unsubscribe_url), a non-ASCII message_id or
        unsubscribe_url, an invalid address, or a value that is not encodable
        as UTF-8 (lone surrogates): the caller should fail that recipient.
        """
        head, text, html_ = self._personal(
            to_email=to_email,
            to_name=to_name,
            variables=variables,
            message_id=message_id,
            date=date,
            unsubscribe_url=unsubscribe_url,
        )
        return b"".join(
            (
                self._signature(head, text, html_, date),
                self._static_headers,
                head,
                self._mid,
                text,
                self._between,
                html_,
                *self._tail.chunks,
            )
        )

    def render_payload(
        self,
        *,
        to_email: str,
        to_name: str | None,
        variables: Mapping[str, str],
        message_id: str,
        date: datetime,
        unsubscribe_url: str,
    ) -> Payload:
        """The same message as ``render``, in DATA form: only the per-recipient
        parts are new bytes, the rest (attachments above all) is shared by every
        message of the template. Raises ValueError like ``render``.
        """
        head, text, html_ = self._personal(
            to_email=to_email,
            to_name=to_name,
            variables=variables,
            message_id=message_id,
            date=date,
            unsubscribe_url=unsubscribe_url,
        )
        # Base64 bodies are DATA-safe as they are; the headers are checked.
        # A DKIM-Signature's lines start with "DKIM" or a space: DATA-safe.
        signature = self._signature(head, text, html_, date)
        own = Payload.trusted(
            (signature, self._safe_static_headers, data_safe(head), self._safe_mid, text)
        )
        return Payload.of(own, Payload.trusted((self._safe_between, html_)), self._tail)

    def _signature(self, head: bytes, text: bytes, html_: bytes, date: datetime) -> bytes:
        """The DKIM-Signature header of one message, or b"" when not signing."""
        if self._dkim is None:
            return b""
        body = [self._body_prefix, text, self._between, html_, *self._tail.chunks]
        return self._dkim.signature(head, body, timestamp=int(date.timestamp()))

    def _personal(
        self,
        *,
        to_email: str,
        to_name: str | None,
        variables: Mapping[str, str],
        message_id: str,
        date: datetime,
        unsubscribe_url: str,
    ) -> tuple[bytes, bytes, bytes]:
        """The per-recipient pieces: headers, text body, HTML body (bytes, base64)."""
        if to_name is not None:
            _check_header_value("to_name", to_name)
        _check_header_value("message_id", message_id)
        _check_header_value("unsubscribe_url", unsubscribe_url)
        if not (message_id.isascii() and unsubscribe_url.isascii()):
            raise ValueError("message_id and unsubscribe_url must be ASCII (percent-encode)")
        if len(unsubscribe_url) > 900 or len(message_id) > 900:
            # Neither can be folded; a header line may not exceed 998 octets.
            raise ValueError("message_id or unsubscribe_url too long for one header line")
        if any(c in unsubscribe_url for c in " <>"):
            raise ValueError("unsubscribe_url must not contain spaces or angle brackets")
        to_header = _format_address("To", to_name, to_email)
        head = (
            f"To: {to_header}\r\n"
            f"Date: {self._date(date)}\r\n"
            f"Message-ID: {message_id}\r\n"
            f"List-Unsubscribe: <{unsubscribe_url}>\r\n"
            "List-Unsubscribe-Post: List-Unsubscribe=One-Click\r\n"
        ).encode()

        builtins = {
            "name": to_name if to_name is not None else variables.get("name", ""),
            "email": to_email,
            "unsubscribe_url": unsubscribe_url,
        }
        text = self._text.fill(builtins, variables, escape=False) if self._text else b""
        html_ = self._html.fill(builtins, variables, escape=True) if self._html else b""
        return head, text, html_


def make_message_id(campaign_id: int, recipient_id: int, domain: str) -> str:
    """``<c{campaign}.r{recipient}.{8 random hex}@{domain}>``.

    The ids let a bounce or complaint be mapped back without a lookup table; the
    random part keeps a re-send (new attempt) from reusing an id.
    """
    _check_header_value("message id domain", domain)
    return f"<c{campaign_id}.r{recipient_id}.{secrets.token_hex(4)}@{domain}>"
