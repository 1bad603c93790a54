"""`import_csv`: load a CSV file into a database table.

A spreadsheet export almost always has a few broken rows. Failing the whole import for one of
them, or silently dropping it, are both wrong: this job imports every good row, in batches of
one transaction each, and returns the line and reason of each bad one so it can be fixed and
imported again.
"""

from __future__ import annotations

import csv
import io
import os
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

from sqlalchemy import Column, Engine, MetaData, Table, Text, create_engine
from sqlalchemy.exc import ArgumentError, DataError, IntegrityError, NoSuchTableError

import engine
from engine import PermanentError

#: Letters, digits and underscores, not starting with a digit; 63 is PostgreSQL's limit.
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")

#: The result lists this many bad rows at most, so that a wholly broken file cannot make it
#: exceed ENGINE_RESULT_MAX_BYTES; `bad_rows` still counts them all.
MAX_ERRORS = 100

#: A row ready to insert: its line in the file (for error reports) and its values by column.
Row = tuple[int, dict[str, str]]


@dataclass
class _Outcome:
    inserted: int = 0
    bad_rows: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)

    def reject(self, line: int, error: str) -> None:
        self.bad_rows += 1
        if len(self.errors) < MAX_ERRORS:
            self.errors.append({"line": line, "error": error})


@engine.actor(max_retries=0, time_limit=60 * 60_000)
def import_csv(path: str, table: str, database_url: Optional[str] = None, batch_size: int = 500) -> dict[str, Any]:
    """Insert the rows of a UTF-8 CSV file into `table`.

    The header row names the columns. A missing table is created with a TEXT column per
    header field; an existing one must have every header column. Values are inserted as text
    and left to the database to convert. The job is not retried: batches committed before a
    failure would be inserted twice.

    Parameters:
      path(str): the CSV file, readable by the worker.
      table(str): the table to insert into.
      database_url(str): a SQLAlchemy URL; by default the engine's own store database.
      batch_size(int): rows per transaction.

    Returns:
      dict: ``{"table", "inserted", "bad_rows", "errors"}``; `errors` holds up to 100
      ``{"line", "error"}`` entries for rows with the wrong number of fields, text that is not
      UTF-8, or values the database rejected.

    Raises:
      PermanentError: the file is missing or has no valid header, the table or a column name
        is not a plain identifier, the table lacks header columns, or an argument is invalid.
    """
    if batch_size < 1:
        raise PermanentError(f"batch_size must be at least 1, got {batch_size}")
    _check_identifier(table, "table name")
    database = _connect(database_url)
    try:
        with _open(path) as raw:
            return _import(raw, table, database, batch_size)
    finally:
        if database_url is not None:  # the store's engine is shared: only close one made here
            database.dispose()


def _connect(database_url: Optional[str]) -> Engine:
    if database_url is None:
        return engine.get_store().engine
    try:
        return create_engine(database_url)
    except ArgumentError as error:
        raise PermanentError(f"invalid database_url: {error}") from None


def _open(path: str) -> io.BufferedReader:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise PermanentError(f"no such file: {path}") from None


def _import(raw: io.BufferedReader, table: str, database: Engine, batch_size: int) -> dict[str, Any]:
    size = os.fstat(raw.fileno()).st_size
    # Undecodable bytes become lone surrogates instead of aborting the read, so that only the
    # rows holding them are rejected; utf-8-sig drops the byte-order mark Excel writes.
    reader = csv.reader(io.TextIOWrapper(raw, encoding="utf-8-sig", errors="surrogateescape", newline=""))
    header = _read_header(reader)
    target = _target_table(database, table, header)
    outcome = _Outcome()
    batch: list[Row] = []
    for row in _rows(reader, header, outcome):
        batch.append(row)
        if len(batch) == batch_size:
            _insert(database, target, batch, outcome)
            batch.clear()
            # The text reader reads ahead in blocks: the position is a close enough estimate.
            engine.progress(min(100.0, 100 * raw.tell() / size), f"{outcome.inserted} rows imported")
    _insert(database, target, batch, outcome)
    engine.progress(100, f"{outcome.inserted} rows imported")
    return {"table": table, "inserted": outcome.inserted, "bad_rows": outcome.bad_rows, "errors": outcome.errors}


def _check_identifier(name: str, what: str) -> None:
    if not _IDENTIFIER.fullmatch(name):
        raise PermanentError(
            f"invalid {what} {name!r}: use letters, digits and underscores, not starting with a digit, "
            "at most 63 characters"
        )


def _read_header(reader: Any) -> list[str]:
    header = next(reader, None)
    if not header:
        raise PermanentError("the file is empty: expected a header row naming the columns")
    header = [name.strip() for name in header]
    for name in header:
        _check_identifier(name, "column name in the header")
    duplicates = sorted({name for name in header if header.count(name) > 1})
    if duplicates:
        raise PermanentError(f"duplicate column names in the header: {', '.join(duplicates)}")
    return header


def _target_table(database: Engine, name: str, header: list[str]) -> Table:
    try:
        existing = Table(name, MetaData(), autoload_with=database)
    except NoSuchTableError:
        created = Table(name, MetaData(), *(Column(column, Text) for column in header))
        created.create(database, checkfirst=True)  # another import may have just created it
        return created
    missing = [column for column in header if column not in existing.c]
    if missing:
        raise PermanentError(f"table {name!r} has no column(s) {', '.join(missing)} named in the header")
    return existing


def _rows(reader: Any, header: list[str], outcome: _Outcome) -> Iterator[Row]:
    """The good rows, with the line each starts on; bad ones are recorded in `outcome`."""
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as error:
            outcome.reject(line, f"malformed CSV: {error}")
            continue
        if not fields:
            continue  # a blank line is no row
        error = _row_error(fields, len(header))
        if error:
            outcome.reject(line, error)
        else:
            yield line, dict(zip(header, fields))


def _row_error(fields: list[str], expected: int) -> Optional[str]:
    if len(fields) != expected:
        return f"expected {expected} fields, got {len(fields)}"
    for text in fields:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as error:
            byte = ord(text[error.start]) - 0xDC00  # surrogateescape maps byte 0xNN to U+DCNN
            return f"not valid UTF-8 text: byte 0x{byte:02x} in {text!r}"
    return None


def _insert(database: Engine, target: Table, batch: list[Row], outcome: _Outcome) -> None:
    if not batch:
        return
    try:
        with database.begin() as connection:
            connection.execute(target.insert(), [values for _, values in batch])
        outcome.inserted += len(batch)
    except (IntegrityError, DataError):
        # Some row broke a constraint or a type: insert one at a time to name it and keep the rest.
        for line, values in batch:
            try:
                with database.begin() as connection:
                    connection.execute(target.insert(), values)
                outcome.inserted += 1
            except (IntegrityError, DataError) as error:
                outcome.reject(line, str(error.orig))
