"""import_csv as a job: tables created or checked, rows inserted in batches, bad rows reported."""

from __future__ import annotations

import pytest
from sqlalchemy import create_engine, text

import engine
from engine import JobState, Outcome


@pytest.fixture(autouse=True)
def import_csv(declare):
    return declare("actors.import_csv").import_csv


def rows(database, query):
    with database.connect() as connection:
        return [tuple(row) for row in connection.execute(text(query))]


def test_a_new_table_gets_the_good_rows_and_the_bad_ones_are_reported(tmp_path, store, wait_done):
    # given a CSV file with a short row, a multi-line field, bytes that are not UTF-8 and a blank line
    csv_file = tmp_path / "people.csv"
    csv_file.write_bytes(
        b"name,email,age\n"  # line 1
        b"Ada,ada@example.com,36\n"
        b"Bob,bob@example.com\n"  # line 3: a field short
        b'"Eve\nSmith",eve@example.com,29\n'  # lines 4-5: one row
        b"Zo\xc3\xab\xff,zoe@example.com,40\n"  # line 6: \xff is no UTF-8
        b"\n"
        b"Max,max@example.com,51\n"
    )

    # when it is imported in batches of 2 into the engine's own database
    job = engine.submit("import_csv", str(csv_file), "people", batch_size=2)
    wait_done()

    # then the good rows are in a new table of TEXT columns and the bad ones are in the result
    assert engine.get(job.id).state == JobState.SUCCEEDED
    assert engine.result(job.id) == {
        "table": "people",
        "inserted": 3,
        "bad_rows": 2,
        "errors": [
            {"line": 3, "error": "expected 3 fields, got 2"},
            {"line": 6, "error": "not valid UTF-8 text: byte 0xff in 'Zoë\\udcff'"},
        ],
    }
    assert rows(store.engine, "SELECT name, email, age FROM people ORDER BY rowid") == [
        ("Ada", "ada@example.com", "36"),
        ("Eve\nSmith", "eve@example.com", "29"),
        ("Max", "max@example.com", "51"),
    ]
    assert {row[2] for row in rows(store.engine, "PRAGMA table_info(people)")} == {"TEXT"}
    done = engine.get(job.id)
    assert (done.progress_percent, done.progress_message) == (100.0, "3 rows imported")
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.SUCCEEDED]


def test_a_row_the_database_rejects_is_reported_and_the_rest_of_its_batch_kept(tmp_path, wait_done):
    # given an existing table with a unique column in another database, and a CSV repeating a value
    database_url = f"sqlite:///{tmp_path}/crm.db"
    database = create_engine(database_url)
    with database.begin() as connection:
        connection.execute(
            text("CREATE TABLE contacts (id INTEGER PRIMARY KEY, email TEXT NOT NULL UNIQUE, name TEXT)")
        )
    csv_file = tmp_path / "contacts.csv"
    csv_file.write_text("email,name\na@example.com,A\nb@example.com,B\na@example.com,again\nc@example.com,C\n")

    # when it is imported in one batch
    job = engine.submit("import_csv", str(csv_file), "contacts", database_url=database_url)
    wait_done()

    # then the batch is retried row by row: only the duplicate is left out
    result = engine.result(job.id)
    assert (result["inserted"], result["bad_rows"]) == (3, 1)
    assert result["errors"] == [{"line": 4, "error": "UNIQUE constraint failed: contacts.email"}]
    assert rows(database, "SELECT email, name FROM contacts ORDER BY id") == [
        ("a@example.com", "A"),
        ("b@example.com", "B"),
        ("c@example.com", "C"),
    ]
    database.dispose()


def test_the_errors_listed_are_capped_but_all_are_counted(tmp_path, wait_done):
    csv_file = tmp_path / "broken.csv"
    csv_file.write_text("a,b\n" + "only-one\n" * 150 + "1,2\n")

    job = engine.submit("import_csv", str(csv_file), "broken")
    wait_done()

    result = engine.result(job.id)
    assert (result["inserted"], result["bad_rows"], len(result["errors"])) == (1, 150, 100)
    assert result["errors"][-1] == {"line": 101, "error": "expected 2 fields, got 1"}


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (None, "no such file"),
        ("", "the file is empty"),
        ("name,e-mail\nAda,ada@example.com\n", "invalid column name in the header 'e-mail'"),
        ("name,name\nAda,Ada\n", "duplicate column names in the header: name"),
        ("name,phone\nAda,123\n", "table 'people' has no column(s) phone"),
    ],
    ids=["missing-file", "empty-file", "bad-header", "duplicate-header", "missing-column"],
)
def test_input_that_can_never_import_fails_at_once(tmp_path, store, wait_done, content, error):
    # given a table "people" with only a name column, and a file that cannot go into it
    with store.engine.begin() as connection:
        connection.execute(text("CREATE TABLE people (name TEXT)"))
    csv_file = tmp_path / "people.csv"
    if content is not None:
        csv_file.write_text(content)

    job = engine.submit("import_csv", str(csv_file), "people")
    wait_done()

    failed = engine.get(job.id)
    assert failed.state == JobState.FAILED and error in failed.last_error
    assert failed.last_error.startswith("PermanentError")
    assert [a.outcome for a in engine.attempts(job.id)] == [Outcome.FAILED]
    assert rows(store.engine, "SELECT count(*) FROM people") == [(0,)]


def test_a_table_name_that_is_no_identifier_fails_at_once(tmp_path, wait_done):
    csv_file = tmp_path / "x.csv"
    csv_file.write_text("a\n1\n")

    job = engine.submit("import_csv", str(csv_file), "people; DROP TABLE jobs")
    wait_done()

    failed = engine.get(job.id)
    assert failed.state == JobState.FAILED and "invalid table name" in failed.last_error
    assert len(engine.attempts(job.id)) == 1
