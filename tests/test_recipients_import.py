"""recipients.import: a file uploaded to the Object Store, checked like recipients.add, all or
nothing, with progress events and a summary (mailer/api/imports.py, MailerClient)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from nats.js.errors import NotFoundError

from mailer.api import imports
from mailer.client import MailerClient
from mailer.client.errors import ImportNotFound, ImportUnreadable, InvalidState, RecipientsLimit
from mailer.messages import ImportProgress, imports_bucket


async def _campaign(client: MailerClient) -> int:
    view = await client.create_campaign("Импорт", "Тема", body_text="Здравствуйте, {{name}}!")
    return view.id


async def _rows(db, cid: int) -> list[tuple[str, str | None, dict[str, str]]]:
    rows = await db.fetch(
        "SELECT email, name, variables FROM recipient WHERE campaign_id = $1 ORDER BY id", cid
    )
    return [(r["email"], r["name"], json.loads(r["variables"])) for r in rows]


async def test_a_csv_file_is_checked_like_an_add_and_added_whole(
    make_service, client: MailerClient, db, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 2 lines: progress after each, and the read-ahead path runs.
    monkeypatch.setattr(imports, "BATCH_LINES", 2)
    await make_service()
    cid = await _campaign(client)
    await client.add_recipients(cid, [{"email": "old@example.org"}])
    path = tmp_path / "list.csv"
    path.write_text(
        "\ufeffEmail,Name,city\n"
        "anna@example.org,Анна,Казань\n"
        "ANNA@example.org,Другая,Москва\n"  # the same address: the first line wins
        "\n"
        "no-at-sign,,\n"
        "bad\x01@example.org,,\n"
        "vera@example.org,Вера,Пермь,extra\n"
        ",Никто,\n"
        "OLD@example.org,,\n"  # already in the campaign
        '"борис@пример.рф","Борис, младший",\n',
        encoding="utf-8",
    )
    seen: list[ImportProgress] = []
    result = await client.import_recipients(cid, path, on_progress=seen.append)

    assert (result.lines, result.added, result.duplicates) == (8, 2, 2)
    assert result.invalid_count == 4
    assert [(i.line, i.email, i.reason) for i in result.invalid] == [
        (5, "no-at-sign", "must contain exactly one @"),
        (6, "bad\x01@example.org", "control characters"),
        (7, "vera@example.org", "more fields than the header"),
        (8, "", "no address"),
    ]
    assert await _rows(db, cid) == [
        ("old@example.org", None, {}),
        ("anna@example.org", "Анна", {"city": "Казань"}),
        ("борис@пример.рф", "Борис, младший", {}),
    ]
    details = await db.fetchval("SELECT details FROM audit_log WHERE action = 'recipients.import'")
    assert json.loads(details) == {"count": 2, "duplicates": 2, "invalid": 4}
    # Progress as it read (several batches), then done; the upload is gone.
    stages = [e.stage for e in seen]
    assert stages.count("reading") >= 3 and stages[-2:] == ["writing", "done"]
    assert seen[-1].added == 2
    store = await client.nc.jetstream().object_store(imports_bucket(client.prefix))
    names = [o.name for o in await _objects(store)]
    assert names == []


async def _objects(store) -> list:
    try:
        return [o for o in await store.list() if not o.deleted]
    except NotFoundError:  # nats-py's answer for an empty bucket
        return []


async def test_json_lines_are_imported(make_service, client: MailerClient, db, tmp_path) -> None:
    await make_service()
    cid = await _campaign(client)
    path = tmp_path / "list.jsonl"
    path.write_text(
        '{"email": "a@example.org", "name": "A", "variables": {"plan": "pro"}}\n'
        "not json\n"
        '{"email": "b@example.org", "unknown": 1}\n'
        '{"email": "c@example.org"}\n',
        encoding="utf-8",
    )
    result = await client.import_recipients(cid, path)
    assert (result.lines, result.added, result.duplicates, result.invalid_count) == (4, 2, 0, 2)
    assert [i.line for i in result.invalid] == [2, 3]
    assert await _rows(db, cid) == [
        ("a@example.org", "A", {"plan": "pro"}),
        ("c@example.org", None, {}),
    ]


async def test_an_import_over_the_campaign_cap_adds_nothing(
    make_service, client: MailerClient, db, tmp_path
) -> None:
    await make_service(max_campaign_recipients=3)
    cid = await _campaign(client)
    path = tmp_path / "list.csv"
    path.write_text("email\n" + "".join(f"u{i}@example.org\n" for i in range(4)))
    with pytest.raises(RecipientsLimit) as err:
        await client.import_recipients(cid, path)
    assert err.value.details["count"] == "4" and err.value.details["limit"] == "3"
    assert await _rows(db, cid) == []
    assert await db.fetchval("SELECT count(*) FROM campaign_counts WHERE sent + pending > 0") == 0


async def test_an_unreadable_or_missing_file_is_refused(
    make_service, client: MailerClient, db, tmp_path
) -> None:
    await make_service()
    cid = await _campaign(client)
    no_column = tmp_path / "list.csv"
    no_column.write_text("mail,name\na@example.org,A\n")
    with pytest.raises(ImportUnreadable) as err:
        await client.import_recipients(cid, no_column)
    assert "email column" in err.value.details["reason"]
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("email,name\nb@example.org,Jos\xe9\n".encode("latin-1"))
    with pytest.raises(ImportUnreadable):
        await client.import_recipients(cid, latin1)
    with pytest.raises(ImportNotFound):
        await client.call("recipients.import", {"campaign_id": cid, "object": "never-uploaded"})
    assert await _rows(db, cid) == []


async def test_a_sending_campaign_takes_no_import(
    make_service, client: MailerClient, db, tmp_path
) -> None:
    await make_service()
    cid = await _campaign(client)
    await db.execute("UPDATE campaign SET status = 'sending' WHERE id = $1", cid)
    path = tmp_path / "list.csv"
    path.write_text("email\na@example.org\n")
    with pytest.raises(InvalidState):
        await client.import_recipients(cid, path)
    assert await _rows(db, cid) == []


async def test_an_import_may_outlast_the_send_paths_statement_timeout(
    make_service, client: MailerClient, db, tmp_path
) -> None:
    # MAILER_DATABASE_STATEMENT_TIMEOUT_SECONDS is made for the send path's small
    # statements; an import's INSERT of a large list takes longer and has its own bound.
    await make_service(database_statement_timeout_seconds=1)
    cid = await _campaign(client)
    await db.execute(
        """
        CREATE FUNCTION slow_insert() RETURNS trigger AS $$
        BEGIN PERFORM pg_sleep(1.5); RETURN NULL; END $$ LANGUAGE plpgsql;
        CREATE TRIGGER slow_insert AFTER INSERT ON recipient
        FOR EACH STATEMENT EXECUTE FUNCTION slow_insert();
        """
    )
    path = tmp_path / "list.csv"
    path.write_text("email\na@example.org\nb@example.org\n")
    result = await client.import_recipients(cid, path)
    assert result.added == 2
    assert len(await _rows(db, cid)) == 2


async def test_an_ascii_file_drops_its_repeats_while_reading_and_keeps_the_first_line(
    make_service, client: MailerClient, db, tmp_path
) -> None:
    # All ASCII: the reader drops the repeats, and the INSERT needs no line order.
    await make_service()
    cid = await _campaign(client)
    await client.add_recipients(cid, [{"email": "Old@Example.org", "name": "Old"}])
    path = tmp_path / "list.csv"
    path.write_text(
        "email,name\n"
        "b@example.org,First\n"
        "a@example.org,A\n"
        "B@EXAMPLE.ORG,Second\n"  # a repeat of line 2
        "old@example.org,New\n"  # already in the campaign
        '"b@example.org","Third"\n',  # quoted: the csv module's path, a repeat too
        encoding="utf-8",
    )
    result = await client.import_recipients(cid, path)
    assert (result.lines, result.added, result.duplicates, result.invalid_count) == (5, 2, 3, 0)
    assert await _rows(db, cid) == [
        ("Old@Example.org", "Old", {}),
        ("b@example.org", "First", {}),
        ("a@example.org", "A", {}),
    ]


def test_the_fast_path_reads_what_the_full_checks_read(tmp_path) -> None:
    # Every kind of line: plain and valid (the fast path), and all that must fall back.
    lines = [
        "email,name,city,city",
        "plain@example.org,Anna,Kazan,",
        "  spaced@example.org  , Bob ,,x",
        "UPPER@EXAMPLE.ORG,,,",
        "dots.in.local@sub.example.co.uk,,,",
        ".lead@example.org,,,",
        "a..b@example.org,,,",
        "num@example.123,,,",
        "hy@-bad.org,,,",
        "long" + "x" * 70 + "@example.org,,,",
        "ü@example.org,,,",
        "two@@example.org,,,",
        "short@example.org,,",
        "extra@example.org,,,,",
        '"quoted@example.org","Multi',
        'line",,',
        "nul\x00@example.org,,,",
        "name@example.org," + "n" * 201 + ",,",
        "var@example.org,,," + "v" * 2001,
        "",
        " , , , ",
        "last@example.org,Last,Omsk,Tver",
    ]
    path = tmp_path / "mixed.csv"
    path.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")

    def read(fast: bool) -> list[object]:
        reader = imports._Lines(str(path), "csv")
        reader._fast = fast
        out: list[object] = []
        while True:
            batch = reader.batch(3)
            out.append((batch.data, batch.rows, batch.invalid, batch.lines, batch.repeats))
            if batch.done:
                reader.close()
                return out

    fast, full = read(True), read(False)
    assert fast == full
    rows = b"".join(b[0] for b in fast).decode().splitlines()  # type: ignore[index]
    assert rows[0] == '2\tplain@example.org\tAnna\t{"city":"Kazan"}'
    assert rows[1] == '3\tspaced@example.org\tBob\t{"city":"x"}'
    assert rows[-1] == '22\tlast@example.org\tLast\t{"city":"Tver"}'
