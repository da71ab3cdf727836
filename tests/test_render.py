"""MIME rendering: what a standard parser reads back from MessageTemplate.render."""

# Russian test content is intended: Cyrillic letters are not look-alikes here.

from __future__ import annotations

import email
import email.policy
import html
import re
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.message import EmailMessage
from typing import Any, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailer.render import MessageTemplate, idna_address, make_message_id

DATE = datetime(2025, 3, 14, 9, 26, 53, tzinfo=UTC)
UNSUB = "https://mail.example/u/abc123?sig=x&y=1"


def parse(data: bytes) -> EmailMessage:
    return cast(EmailMessage, email.message_from_bytes(data, policy=email.policy.default))


def make_template(**overrides: Any) -> MessageTemplate:
    kwargs: dict[str, Any] = {
        "from_email": "news@shop.example",
        "from_name": "Магазин «Пример»",
        "subject": "Скидки недели для вас",
        "text": "Привет, {{name}}! Ваш код: {{code}}.\nАдрес: {{email}}\n",
        "html": "<html><body><p>Привет, {{ name }}! Код: <b>{{code}}</b></p></body></html>",
        "reply_to": "Поддержка <support@shop.example>",
        "message_id_domain": "shop.example",
        "headers": {"X-Campaign-Id": "42"},
    }
    kwargs.update(overrides)
    return MessageTemplate(**kwargs)


def render(template: MessageTemplate, **overrides: Any) -> bytes:
    kwargs: dict[str, Any] = {
        "to_email": "ivan@example.com",
        "to_name": "Иван Петров",
        "variables": {"code": "SALE-1"},
        "message_id": "<c1.r2.deadbeef@shop.example>",
        "date": DATE,
        "unsubscribe_url": UNSUB,
    }
    kwargs.update(overrides)
    return template.render(**kwargs)


def raw_header(data: bytes, name: str) -> str:
    """The unfolded raw value of a header, before any decoding."""
    head = data.split(b"\r\n\r\n", 1)[0].decode("utf-8").replace("\r\n ", " ")
    for line in head.split("\r\n"):
        key, _, value = line.partition(": ")
        if key.lower() == name.lower():
            return value
    raise AssertionError(f"no {name} header")


def assert_display_name(data: bytes, msg: EmailMessage, header: str, expected: str) -> None:
    """The display name of a one-address header, decoded as RFC 2047 says.

    policy.default's address parser inserts a space between adjacent
    encoded-words (CPython gh-128110, open for 3.11), so a long name that spans
    several encoded-words would read back as "Фамил ия". Exact comparison is done
    with the legacy decoder, which drops that whitespace as RFC 2047 6.2 requires;
    the modern parser is still checked with whitespace removed.
    """
    parsed = msg[header].addresses[0].display_name
    raw = raw_header(data, header)
    if "=?" in raw:
        decoded = str(make_header(decode_header(raw)))
        assert decoded.rpartition(" <")[0] == expected
        assert "".join(parsed.split()) == "".join(expected.split())
    else:
        assert parsed == expected


def body_of(msg: EmailMessage, subtype: str) -> str:
    part = msg.get_body(preferencelist=(subtype,))
    assert part is not None, f"no text/{subtype} part"
    assert part.get_content_type() == f"text/{subtype}"
    return cast(str, part.get_content()).replace("\r\n", "\n")


# --- headers -------------------------------------------------------------------


def test_headers_decode_to_the_given_values() -> None:
    msg = parse(render(make_template()))
    assert msg["Subject"] == "Скидки недели для вас"
    assert msg["From"].addresses[0].display_name == "Магазин «Пример»"
    assert msg["From"].addresses[0].addr_spec == "news@shop.example"
    assert msg["To"].addresses[0].display_name == "Иван Петров"
    assert msg["To"].addresses[0].addr_spec == "ivan@example.com"
    assert msg["Reply-To"].addresses[0].display_name == "Поддержка"
    assert msg["Reply-To"].addresses[0].addr_spec == "support@shop.example"
    assert msg["Message-ID"] == "<c1.r2.deadbeef@shop.example>"
    assert msg["MIME-Version"] == "1.0"
    assert msg["X-Campaign-Id"] == "42"
    assert msg["Date"].datetime == DATE


def test_non_ascii_headers_are_rfc2047_encoded_on_the_wire() -> None:
    data = render(make_template())
    head = data.split(b"\r\n\r\n", 1)[0]
    assert head.isascii(), head
    assert b"=?utf-8?" in head


def test_ascii_names_stay_readable_and_specials_are_quoted() -> None:
    template = make_template()
    plain = render(template, to_name="John Smith")
    assert b"To: John Smith <ivan@example.com>\r\n" in plain
    quoted = parse(render(template, to_name='O\'Brien, "Jr." (QA) \\ x'))
    assert quoted["To"].addresses[0].display_name == 'O\'Brien, "Jr." (QA) \\ x'
    no_name = parse(render(template, to_name=None))
    assert no_name["To"].addresses[0].addr_spec == "ivan@example.com"
    assert no_name["To"].addresses[0].display_name == ""


def test_list_unsubscribe_headers() -> None:
    msg = parse(render(make_template()))
    assert msg["List-Unsubscribe"] == f"<{UNSUB}>"
    assert msg["List-Unsubscribe-Post"] == "List-Unsubscribe=One-Click"


def test_date_cache_follows_the_given_moment_and_zone() -> None:
    template = make_template()
    msk = timezone(timedelta(hours=3))
    first = parse(render(template, date=DATE))["Date"]
    later = parse(render(template, date=DATE + timedelta(seconds=1)))["Date"]
    zoned = parse(render(template, date=DATE.astimezone(msk)))["Date"]
    assert first.datetime == DATE
    assert later.datetime == DATE + timedelta(seconds=1)
    assert zoned.datetime == DATE and zoned.datetime.utcoffset() == timedelta(hours=3)


def test_crlf_line_endings_everywhere() -> None:
    data = render(make_template(attachments=[("a.txt", "text/plain", b"one\ntwo\n")]))
    assert data.endswith(b"\r\n")
    assert b"\n" not in data.replace(b"\r\n", b"")
    assert b"\r" not in data.replace(b"\r\n", b"")
    assert max(len(line) for line in data.split(b"\r\n")) <= 998


def test_long_subject_and_names_are_folded() -> None:
    template = make_template(subject="Очень длинная тема " * 20, from_name="Имя " * 40)
    data = render(template, to_name="Фамилия " * 40)
    assert max(len(line) for line in data.split(b"\r\n")) <= 78
    msg = parse(data)
    assert msg["Subject"] == ("Очень длинная тема " * 20).strip()
    assert_display_name(data, msg, "To", ("Фамилия " * 40).strip())
    assert_display_name(data, msg, "From", ("Имя " * 40).strip())


# --- bodies --------------------------------------------------------------------


def test_bodies_are_personalized_and_base64() -> None:
    data = render(make_template())
    msg = parse(data)
    assert msg.get_content_type() == "multipart/alternative"
    text = body_of(msg, "plain")
    assert text.startswith("Привет, Иван Петров! Ваш код: SALE-1.\nАдрес: ivan@example.com\n")
    assert "Привет, Иван Петров! Код: <b>SALE-1</b>" in body_of(msg, "html")
    for part in msg.walk():
        if part.get_content_maintype() == "text":
            assert part["Content-Transfer-Encoding"] == "base64"
            assert part.get_content_charset() == "utf-8"
    lines = [line for line in data.split(b"\r\n") if re.fullmatch(rb"[A-Za-z0-9+/=]{20,}", line)]
    assert lines and max(len(line) for line in lines) == 76


def test_unknown_variables_render_empty() -> None:
    msg = parse(render(make_template(text="a{{nope}}b {{code}}"), variables={}))
    assert body_of(msg, "plain").startswith("ab \n")


def test_html_escapes_values_and_text_keeps_them_raw() -> None:
    evil = '<script>alert("x")</script> & co'
    msg = parse(render(make_template(), to_name=evil, variables={"code": "<b>1</b>"}))
    page = body_of(msg, "html")
    assert "<script>" not in page
    assert html.escape(evil) in page
    assert "&lt;b&gt;1&lt;/b&gt;" in page
    text = body_of(msg, "plain")
    assert evil in text and "<b>1</b>" in text
    assert msg["To"].addresses[0].display_name == evil


def test_unsubscribe_footer_added_when_the_body_lacks_it() -> None:
    msg = parse(render(make_template()))
    text = body_of(msg, "plain")
    assert text.endswith(f"\n\n--\nОтписаться от рассылки: {UNSUB}")
    page = body_of(msg, "html")
    link = f'<a href="{html.escape(UNSUB)}">'
    assert link in page
    assert page.index(link) < page.index("</body>")


def test_unsubscribe_placeholder_used_where_present() -> None:
    template = make_template(
        text="Bye: {{unsubscribe_url}}",
        html='<p><a href="{{unsubscribe_url}}">off</a></p>',
    )
    msg = parse(render(template))
    assert body_of(msg, "plain") == f"Bye: {UNSUB}"
    assert body_of(msg, "html") == f'<p><a href="{html.escape(UNSUB)}">off</a></p>'


def test_html_without_body_tag_gets_footer_at_the_end() -> None:
    msg = parse(render(make_template(text=None, html="<p>hi {{name}}</p>")))
    assert msg.get_content_type() == "text/html"
    page = body_of(msg, "html")
    assert page.startswith("<p>hi Иван Петров</p><p")
    assert page.endswith("Отписаться от рассылки</a></p>")


def test_text_only_message_is_single_part() -> None:
    msg = parse(render(make_template(html=None)))
    assert not msg.is_multipart()
    assert msg.get_content_type() == "text/plain"
    assert UNSUB in body_of(msg, "plain")


def test_multiline_values_are_canonicalized() -> None:
    data = render(make_template(text="x {{code}} y"), variables={"code": "1\n2\r3"})
    assert body_of(parse(data), "plain").startswith("x 1\n2\n3 y")


def test_a_body_is_required() -> None:
    with pytest.raises(ValueError, match="body"):
        make_template(text=None, html=None)


# --- attachments ---------------------------------------------------------------


def test_attachments_round_trip() -> None:
    pdf = bytes(range(256)) * 10
    template = make_template(
        attachments=[("отчёт за март.pdf", "application/pdf", pdf), ("a.csv", "text/csv", b"a,b\n")]
    )
    msg = parse(render(template))
    assert msg.get_content_type() == "multipart/mixed"
    assert "Привет, Иван Петров" in body_of(msg, "plain")
    assert "Привет, Иван Петров" in body_of(msg, "html")
    files = list(msg.iter_attachments())
    assert [(p.get_filename(), p.get_content_type()) for p in files] == [
        ("отчёт за март.pdf", "application/pdf"),
        ("a.csv", "text/csv"),
    ]
    assert files[0].get_content() == pdf
    assert files[1].get_payload(decode=True) == b"a,b\n"


def test_boundaries_differ_per_template() -> None:
    def boundary(data: bytes) -> bytes:
        found = re.search(rb'boundary="([^"]+)"', data)
        assert found is not None
        return found.group(1)

    assert boundary(render(make_template())) != boundary(render(make_template()))


# --- safety --------------------------------------------------------------------


@pytest.mark.parametrize(
    "field", ["subject", "from_name", "reply_to", "from_email", "message_id_domain"]
)
@pytest.mark.parametrize("bad", ["x\r\nBcc: victim@evil.example", "x\nX: y", "x\ry"])
def test_header_injection_in_template_raises(field: str, bad: str) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        make_template(**{field: bad})


def test_header_injection_in_extra_headers_raises() -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        make_template(headers={"X-Tag": "a\r\nBcc: x@evil.example"})
    with pytest.raises(ValueError, match="header name"):
        make_template(headers={"X Bad:": "1"})
    with pytest.raises(ValueError, match="set by the template"):
        make_template(headers={"to": "x@evil.example"})
    with pytest.raises(ValueError, match="set by the template"):
        make_template(headers={"Content-Type": "text/plain"})


@pytest.mark.parametrize("field", ["to_name", "to_email", "message_id", "unsubscribe_url"])
def test_header_injection_in_render_raises(field: str) -> None:
    with pytest.raises(ValueError):
        render(make_template(), **{field: "a@b.c\r\nBcc: victim@evil.example"})


def test_subject_personalization_is_refused() -> None:
    with pytest.raises(ValueError, match="subject is not supported"):
        make_template(subject="Привет, {{name}}")


def test_idn_domain_recipient() -> None:
    data = render(make_template(), to_email="ivan@пример.рф", to_name="Иван")
    msg = parse(data)
    assert msg["To"].addresses[0].addr_spec == "ivan@xn--e1afmkfd.xn--p1ai"
    # The body shows the address as the person knows it.
    assert "Адрес: ivan@пример.рф" in body_of(msg, "plain")


def test_non_ascii_local_part_is_kept_as_utf8() -> None:
    data = render(make_template(), to_email="пользователь@пример.рф", to_name="Иван")
    assert "<пользователь@xn--e1afmkfd.xn--p1ai>".encode() in data
    assert idna_address("пользователь@пример.рф") == "пользователь@xn--e1afmkfd.xn--p1ai"


def test_overlong_header_inputs_are_refused_or_folded() -> None:
    with pytest.raises(ValueError, match="too long"):
        render(make_template(), unsubscribe_url="https://x.example/" + "a" * 1000)
    with pytest.raises(ValueError):
        render(make_template(), to_email="a" * 250 + "@example.com")
    data = render(make_template(headers={"X-Token": "t" * 2000}))
    assert max(len(line) for line in data.split(b"\r\n")) <= 998
    assert parse(data)["X-Token"] == "t" * 2000


@pytest.mark.parametrize("bad", ["no-at-sign", "a b@c.d", "<a@b.c>", "a@", "x@\u0000.рф"])
def test_invalid_addresses_raise(bad: str) -> None:
    with pytest.raises(ValueError):
        idna_address(bad)


def test_make_message_id() -> None:
    one = make_message_id(7, 123, "shop.example")
    assert re.fullmatch(r"<c7\.r123\.[0-9a-f]{8}@shop\.example>", one)
    assert one != make_message_id(7, 123, "shop.example")


# --- property ------------------------------------------------------------------

# Text without "{" so that literal chunks can never form a placeholder themselves.
literal = st.text(st.characters(exclude_characters="{", exclude_categories=("Cs",)), max_size=40)
var_name = st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True).filter(
    lambda n: n not in ("name", "email", "unsubscribe_url")
)
value = st.text(st.characters(exclude_categories=("Cs",)), max_size=30)
person = st.text(st.characters(exclude_characters="\r\n", exclude_categories=("Cs",)), max_size=60)


def _normalize(text: str) -> str:
    return text.replace("\r\n", "\n").replace("\r", "\n")


@settings(max_examples=150, deadline=None)
@given(
    chunks=st.lists(
        st.tuples(literal, st.one_of(st.none(), var_name, st.just("name"))), max_size=6
    ),
    variables=st.dictionaries(var_name, value, max_size=4),
    to_name=person,
    subject=st.text(
        st.characters(exclude_characters="\r\n{", exclude_categories=("Cs",)), max_size=80
    ),
)
def test_render_round_trips_through_the_stdlib_parser(
    chunks: list[tuple[str, str | None]],
    variables: dict[str, str],
    to_name: str,
    subject: str,
) -> None:
    source = "".join(text + (f"{{{{{name}}}}}" if name else "") for text, name in chunks)
    html_source = "".join(
        html.escape(text) + (f"{{{{{name}}}}}" if name else "") for text, name in chunks
    )
    footer = f"\n\n--\nОтписаться от рассылки: {UNSUB}"

    def expect(template_source: str, escape: bool) -> str:
        # The spec: the template's line breaks are canonicalized as a whole, then
        # each value (canonicalized on its own) replaces its placeholder.
        def value_of(match: re.Match[str]) -> str:
            name = match.group(1)
            found = to_name if name == "name" else variables.get(name, "")
            return _normalize(html.escape(found) if escape else found)

        return re.sub(r"\{\{([a-z_0-9]+)\}\}", value_of, _normalize(template_source))

    template = make_template(subject=subject, text=source, html=html_source)
    data = template.render(
        to_email="user@example.com",
        to_name=to_name,
        variables=variables,
        message_id="<m@x>",
        date=DATE,
        unsubscribe_url=UNSUB,
    )
    msg = parse(data)
    assert body_of(msg, "plain") == expect(source + footer, escape=False)
    assert body_of(msg, "html").startswith(expect(html_source, escape=True))
    # Display names are sent whitespace-normalized (single spaces, stripped).
    name = " ".join(to_name.split())
    assert_display_name(data, msg, "To", name)
    assert msg["To"].addresses[0].addr_spec == "user@example.com"
    # Surrounding whitespace of the subject is not significant; tabs and Unicode
    # line breaks (U+2028, NEL, FF...) inside it are sent as spaces.
    breaks = dict.fromkeys(map(ord, "\t\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), " ")
    assert msg["Subject"] == subject.strip().translate(breaks)


def test_payload_is_the_message_in_data_form_sharing_the_attachment_chunks() -> None:
    content = bytes(range(256)) * 2000  # 512 KB: several encoded chunks
    template = make_template(
        attachments=[("a.bin", "application/octet-stream", content)],
        headers={".Dotted": "starts a line with a dot"},
    )
    kwargs: dict[str, Any] = {
        "to_name": "Иван",
        "variables": {"code": "1"},
        "message_id": "<m@shop.example>",
        "date": DATE,
        "unsubscribe_url": UNSUB,
    }
    one = template.render_payload(to_email="a@example.com", **kwargs)
    two = template.render_payload(to_email="b@example.com", **kwargs)
    # Only the per-recipient pieces differ; the attachment's chunks are the same objects.
    shared = [c for c in one.chunks if any(c is d for d in two.chunks)]
    assert sum(len(c) for c in shared) > len(content)
    # On the wire the dotted header line is doubled; everything else is render() as is.
    plain = template.render(to_email="a@example.com", **kwargs)
    assert one.wire() == plain.replace(b"\r\n.Dotted", b"\r\n..Dotted")
    (part,) = parse(plain).iter_attachments()
    assert part.get_content() == content
