"""``recipients.import``: a large list, uploaded to a JetStream Object Store, added at once.

The client uploads a CSV (header: ``email``, optional ``name``, any other column a
variable -- the CLI's format) or JSON-lines file (one ``RecipientIn`` object a line) to the
bucket ``imports_bucket(prefix)`` -- no 1 MB message limit there -- and names it in the
request. The service then:

1. copies the object into a temporary file (its digest checked by nats-py), so memory stays
   bounded whatever the file's size;
2. reads it in batches in a worker thread (the event loop keeps serving), checks each line
   exactly as ``recipients.add`` checks an address (``check_address``) and the fields as
   ``RecipientIn`` does -- a plain CSV line whose address surely passes takes a fast path
   with the same result (``_Lines``) --, drops a repeat of an address already read (while
   every address is ASCII, where Python's lower() is PostgreSQL's), and COPYs the valid
   lines, in COPY's text format, into a temporary table while the next batch is read,
   publishing ``ImportProgress`` on ``<prefix>.import.progress.<campaign_id>`` (core NATS,
   outside the stored events stream) as it goes;
3. under the campaign's locks (a start or pause waits only for this step), inserts them:
   the first line of an address wins, as in ``recipients.add`` (with the repeats dropped, one
   INSERT with an anti-join on the campaign's addresses; else ``INSERT ... ON CONFLICT DO
   NOTHING`` in line order), checks ``MAILER_MAX_CAMPAIGN_RECIPIENTS`` on the result and
   writes one audit entry. All or nothing: any error rolls the whole file back.

The reply counts the lines read, added, duplicates (in the file or already in the campaign)
and invalid lines, listing the first ``MAX_INVALID_LISTED`` with their line number and
reason. The uploaded object is deleted once the request is answered, whatever the outcome
(the bucket's one-day max age removes what a crash leaves).
"""

from __future__ import annotations

import asyncio
import csv
import logging
import re
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

import msgspec
from nats.js.errors import NotFoundError, ObjectNotFoundError

from mailer.api.context import ApiContext, Caller, check_address
from mailer.api.recipients import _editable
from mailer.apistore import Locked
from mailer.db import Q
from mailer.errors import ApiError, NotFound, ValidationFailed
from mailer.messages import (
    MAX_INVALID_LISTED,
    ImportProgress,
    InvalidLine,
    RecipientIn,
    RecipientsImport,
    RecipientsImported,
    imports_bucket,
)

__all__ = ["BATCH_LINES", "import_recipients"]

log = logging.getLogger("mailer.api")

#: Lines read, checked and COPYed at a time (a progress event after each batch).
BATCH_LINES = 50_000
#: An import's statements may take longer than MAILER_DATABASE_STATEMENT_TIMEOUT_SECONDS
#: (made for the send path's small ones): a million rows' INSERT takes tens of seconds on a
#: small server. Still bounded, so a stuck import does not hold the campaign's lock forever.
IMPORT_STATEMENT_TIMEOUT_SECONDS = 600.0


class Batch(msgspec.Struct):
    # The valid lines in COPY's text format (line, email, name, variables as JSON): PostgreSQL
    # parses it, in its own process, instead of the client encoding every value.
    data: bytes
    rows: int
    invalid: list[InvalidLine]
    lines: int
    done: bool
    # Valid lines not COPYed: a repeat of an earlier line's address in this file.
    repeats: int = 0


# What COPY's text format escapes; the fast path's addresses never hold any of it.
_COPY_SPECIAL = re.compile(r"[\\\t\n\r]")


def _copy_field(value: str) -> str:
    if _COPY_SPECIAL.search(value) is None:
        return value
    return (
        value.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )


def _copy_line(line: int, email: str, name: str | None, variables: str) -> str:
    """One row of import_rows in COPY's text format (``\\N``: NULL)."""
    shown = "\\N" if name is None else _copy_field(name)
    return f"{line}\t{_copy_field(email)}\t{shown}\t{_copy_field(variables)}\n"


# An address that ``check_address`` surely accepts: a dot-atom local part of at most 64
# characters (no character _LOCAL refuses, no leading, trailing or double dot) and an ASCII
# domain of two or more labels of 1-63 letters, digits and inner hyphens, the last one not
# all digits. A subset: whatever it does not match goes through the full check.
_SURELY_VALID = re.compile(
    r"(?=[^@]{1,64}@)"
    r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+"
    r"(?=[A-Za-z0-9-]*[A-Za-z-])[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
)
# RecipientIn's limits, for the fast path: longer lines take the full check.
_NAME_MAX = 200
_VARIABLE_NAME_MAX = 64
_FAST_LINE_MAX = 2000
# Past this many addresses the file's repeats are left to PostgreSQL (memory stays bounded).
_SEEN_MAX = 2_000_000


# (line, the recipient or None, its address, the problem): one record after the full checks.
_Parsed = tuple[int, RecipientIn | None, str, str | None]


async def _chunks(data: bytes) -> AsyncIterator[bytes]:
    # copy_to_table reads bytes from an async iterable (a bytes object would be a path).
    yield data


class _Source:
    """The file's physical lines, counted (the csv module's line numbers); the csv reader
    reads from it too, so one line can be handed back for it to parse."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self._back: str | None = None
        self.line = 0

    def __iter__(self) -> _Source:
        return self

    def __next__(self) -> str:
        raw = self._back
        if raw is None:
            raw = next(self._file)
        else:
            self._back = None
        self.line += 1
        return raw

    def push_back(self, raw: str) -> None:
        self._back = raw
        self.line -= 1


class _Lines:
    """Reads one file in batches; each call runs in a worker thread, one at a time.

    A CSV line with no quote and no NUL is split on commas (what the csv module would do
    with it), and one whose fields are surely valid (``_SURELY_VALID``, short fields) is
    taken with no more checks; every other line gets the full checks of ``_check``, the
    quoted ones parsed by the csv module. The same result either way, several times faster
    on the lists CRMs export.
    """

    def __init__(self, path: str, fmt: str) -> None:
        self._fmt = fmt
        # Opened here (a deadlock retry reads the file again from its start), closed by close().
        self._file = open(path, encoding="utf-8-sig", newline="")  # noqa: SIM115
        self._line = 0
        self._decoder = msgspec.json.Decoder(RecipientIn)
        # The lowercased addresses so far, while they are all ASCII: then Python's lower()
        # is PostgreSQL's, a repeat is dropped here, and the rows left have no repeat
        # (``unique``): the INSERT needs neither the line order nor ON CONFLICT.
        self._seen: set[str] | None = set()
        if fmt != "csv":
            return
        self._src = _Source(self._file)
        self._csv = csv.reader(self._src)
        try:
            header = next(self._csv, None)
        except (UnicodeDecodeError, csv.Error) as exc:
            self.close()
            raise ValidationFailed("import_unreadable", reason=f"header: {exc}") from None
        names = [h.strip() for h in header or []]
        lowered = [n.lower() for n in names]
        if "email" not in lowered:
            self.close()
            raise ValidationFailed("import_unreadable", reason="no email column in the header")
        self._names = names
        self._at_email = lowered.index("email")
        self._at_name = lowered.index("name") if "name" in lowered else None
        self._variables_at = [
            i for i in range(len(names)) if i not in (self._at_email, self._at_name)
        ]
        self._fast = all(len(names[i]) <= _VARIABLE_NAME_MAX for i in self._variables_at)

    def close(self) -> None:
        self._file.close()

    @property
    def unique(self) -> bool:
        """No two rows COPYed so far share an address (any case)."""
        return self._seen is not None

    def _repeat(self, email: str) -> bool:
        """Whether an earlier line of the file had this address (when that is known)."""
        seen = self._seen
        if seen is None:
            return False
        if not email.isascii() or len(seen) >= _SEEN_MAX:
            self._seen = None
            return False
        key = email.lower()
        if key in seen:
            return True
        seen.add(key)
        return False

    def batch(self, size: int) -> Batch:
        rows: list[str] = []
        invalid: list[InvalidLine] = []
        lines = repeats = 0
        try:
            while lines < size:
                if self._fmt == "csv":
                    row, parsed = self._next_csv()
                    if row is not None:
                        lines += 1
                        if self._repeat(row[1]):
                            repeats += 1
                        else:
                            rows.append(_copy_line(*row))
                        continue
                else:
                    parsed = self._next_jsonl()
                if parsed is None:
                    return self._batch(rows, invalid, lines, done=True, repeats=repeats)
                line, item, email, problem = parsed
                if item is None and problem is None:
                    continue  # a blank line
                lines += 1
                if problem is None and item is not None:
                    problem = check_address(item.email)
                if problem is not None or item is None:
                    invalid.append(InvalidLine(line=line, email=email, reason=problem or ""))
                    continue
                if self._repeat(item.email):
                    repeats += 1
                    continue
                variables = msgspec.json.encode(item.variables).decode()
                rows.append(_copy_line(line, item.email, item.name, variables))
        except UnicodeDecodeError as exc:
            raise ValidationFailed("import_unreadable", reason=f"not UTF-8: {exc}") from None
        except csv.Error as exc:
            raise ValidationFailed(
                "import_unreadable", reason=f"line {self._line}: {exc}"
            ) from None
        return self._batch(rows, invalid, lines, done=False, repeats=repeats)

    @staticmethod
    def _batch(
        rows: list[str], invalid: list[InvalidLine], lines: int, *, done: bool, repeats: int
    ) -> Batch:
        data = "".join(rows).encode()
        return Batch(data, len(rows), invalid, lines, done=done, repeats=repeats)

    def _next_csv(
        self,
    ) -> tuple[
        tuple[int, str, str | None, str] | None,
        tuple[int, RecipientIn | None, str, str | None] | None,
    ]:
        """The next record: a valid row at once (fast path), else what ``_check`` says."""
        src = self._src
        raw = next(src, None)
        if raw is None:
            return None, None
        if self._fast and '"' not in raw and "\x00" not in raw and len(raw) <= _FAST_LINE_MAX:
            self._line = src.line
            fields = raw.rstrip("\r\n").split(",")
            if len(fields) == len(self._names):
                email = fields[self._at_email].strip()
                name = fields[self._at_name].strip() if self._at_name is not None else ""
                if len(name) <= _NAME_MAX and len(email) <= 254 and _SURELY_VALID.fullmatch(email):
                    variables = {
                        self._names[i]: fields[i] for i in self._variables_at if fields[i] != ""
                    }
                    row = (src.line, email, name or None, msgspec.json.encode(variables).decode())
                    return row, None
            return None, self._check(src.line, fields)
        src.push_back(raw)  # quoted (maybe over several lines): the csv module parses it
        try:
            fields = next(self._csv)
        except StopIteration:
            return None, None
        self._line = src.line
        return None, self._check(src.line, fields)

    def _check(
        self, line: int, fields: list[str]
    ) -> tuple[int, RecipientIn | None, str, str | None]:
        """One record's full checks: (line, the recipient or None, its address, the problem)."""
        if not any(f.strip() for f in fields):
            return line, None, "", None
        email = fields[self._at_email].strip() if self._at_email < len(fields) else ""
        if len(fields) > len(self._names):
            return line, None, email, "more fields than the header"
        if not email:
            return line, None, email, "no address"
        at_name = self._at_name
        name = fields[at_name].strip() if at_name is not None and at_name < len(fields) else ""
        variables = {
            self._names[i]: value
            for i, value in enumerate(fields)
            if i not in (self._at_email, at_name) and value != ""
        }
        try:
            item = msgspec.convert(
                {"email": email, "name": name or None, "variables": variables}, RecipientIn
            )
        except msgspec.ValidationError as exc:
            return line, None, email, str(exc)
        return line, item, email, None

    def _next_jsonl(self) -> tuple[int, RecipientIn | None, str, str | None] | None:
        raw = self._file.readline()
        if not raw:
            return None
        self._line += 1
        line = self._line
        if not raw.strip():
            return line, None, "", None
        try:
            item = self._decoder.decode(raw)
        except msgspec.DecodeError as exc:
            return line, None, "", str(exc)
        return line, item, item.email, None


async def import_recipients(
    ctx: ApiContext, caller: Caller, req: RecipientsImport
) -> RecipientsImported:
    # Who may: checked before the file is read (and again under the lock, with the status).
    await ctx.own(caller, req.campaign_id)
    js = ctx.bus.nc.jetstream()
    try:
        store = await js.object_store(imports_bucket(ctx.bus.prefix))
    except NotFoundError:
        raise NotFound("import_not_found", object=req.object) from None
    progress_subject = ctx.bus.subject("import", "progress", str(req.campaign_id))
    timings: dict[str, float] = {}
    began = time.perf_counter()
    try:
        with tempfile.NamedTemporaryFile(prefix="mailer-import-") as file:
            try:
                await store.get(req.object, writeinto=file)  # type: ignore[arg-type]
            except (ObjectNotFoundError, NotFoundError):
                raise NotFound("import_not_found", object=req.object) from None
            file.flush()
            timings["download"] = time.perf_counter() - began
            result = await _import(ctx, caller, req, file.name, progress_subject, timings=timings)
    except ApiError:
        await _publish(ctx, progress_subject, req, "failed", lines=0, invalid=0)
        raise
    finally:
        try:
            await store.delete(req.object)
        except Exception:  # gone already, or NATS away: the bucket's max age removes it
            log.debug("import object not deleted", extra={"campaign_id": req.campaign_id})
    timings["total"] = time.perf_counter() - began
    log.info(
        "recipients imported",
        extra={
            "campaign_id": req.campaign_id,
            "count": result.added,
            **{f"{k}_seconds": round(v, 3) for k, v in timings.items()},
        },
    )
    await _publish(
        ctx,
        progress_subject,
        req,
        "done",
        lines=result.lines,
        invalid=result.invalid_count,
        added=result.added,
    )
    return result


async def _import(
    ctx: ApiContext,
    caller: Caller,
    req: RecipientsImport,
    path: str,
    subject: str,
    *,
    timings: dict[str, float],
) -> RecipientsImported:
    state: dict[str, Any] = {}

    async def fill(conn: Any) -> None:
        # Re-runnable (a deadlock retry runs it again): from the file's start each time.
        began = time.perf_counter()
        lines_of = await asyncio.to_thread(_Lines, path, req.format)
        reading: asyncio.Future[Batch] | None = None
        try:
            # For this transaction only (its last statement, the INSERT, included).
            await conn.execute(
                f"SET LOCAL statement_timeout = {int(IMPORT_STATEMENT_TIMEOUT_SECONDS * 1000)}"
            )
            # The INSERT sorts the file's lines (first line of an address wins): in memory,
            # not in a temporary file (64 MB hold about a million lines' sort keys).
            await conn.execute("SET LOCAL work_mem = '64MB'")
            await conn.execute(Q["recipients-import-table"])
            lines = valid = invalid_count = 0
            invalid: list[InvalidLine] = []
            next_batch = asyncio.ensure_future(asyncio.to_thread(lines_of.batch, BATCH_LINES))
            reading = next_batch
            while True:
                batch = await next_batch
                reading = None
                if not batch.done:
                    # The next batch is read while this one is COPYed.
                    next_batch = asyncio.ensure_future(
                        asyncio.to_thread(lines_of.batch, BATCH_LINES)
                    )
                    reading = next_batch
                if batch.rows:
                    await conn.copy_to_table(
                        "import_rows",
                        source=_chunks(batch.data),
                        columns=["line", "email", "name", "variables"],
                        format="text",
                        timeout=IMPORT_STATEMENT_TIMEOUT_SECONDS,
                    )
                lines += batch.lines
                valid += batch.rows + batch.repeats
                invalid_count += len(batch.invalid)
                invalid.extend(batch.invalid[: MAX_INVALID_LISTED - len(invalid)])
                await _publish(ctx, subject, req, "reading", lines=lines, invalid=invalid_count)
                if batch.done:
                    break
            state.update(
                lines=lines,
                valid=valid,
                invalid=invalid,
                invalid_count=invalid_count,
                unique=lines_of.unique,
            )
            timings["read_and_copy"] = time.perf_counter() - began
        finally:
            if reading is not None:
                # The worker thread still reads: let it finish before its file is closed.
                await asyncio.wait([reading])
            lines_of.close()

    async def change(tx: Locked) -> int:
        _editable(tx, caller, req.campaign_id)
        await _publish(
            ctx, subject, req, "writing", lines=state["lines"], invalid=state["invalid_count"]
        )
        now = ctx.clock.now()
        began = time.perf_counter()
        added = await tx.add_imported(
            now, unique=state["unique"], timeout=IMPORT_STATEMENT_TIMEOUT_SECONDS
        )
        timings["insert"] = time.perf_counter() - began
        total = await tx.recipients_count() if added else 0
        if total > ctx.settings.max_campaign_recipients:
            raise ValidationFailed(
                "recipients_limit",
                count=total,
                added=added,
                limit=ctx.settings.max_campaign_recipients,
            )
        if added:
            await tx.audit(
                caller.user,
                "recipients.import",
                {
                    "count": added,
                    "duplicates": state["valid"] - added,
                    "invalid": state["invalid_count"],
                },
                now,
            )
        return added

    added = await ctx.db.locked(req.campaign_id, change, prepare=fill)
    return RecipientsImported(
        lines=state["lines"],
        added=added,
        duplicates=state["valid"] - added,
        invalid_count=state["invalid_count"],
        invalid=state["invalid"],
    )


async def _publish(
    ctx: ApiContext,
    subject: str,
    req: RecipientsImport,
    stage: str,
    *,
    lines: int,
    invalid: int,
    added: int = 0,
) -> None:
    event = ImportProgress(
        campaign_id=req.campaign_id,
        object=req.object,
        stage=stage,  # type: ignore[arg-type]
        lines=lines,
        invalid=invalid,
        added=added,
    )
    try:
        await ctx.bus.nc.publish(subject, msgspec.json.encode(event))
    except Exception:  # progress is best effort: the reply carries the outcome
        log.debug("import progress not published", extra={"campaign_id": req.campaign_id})
