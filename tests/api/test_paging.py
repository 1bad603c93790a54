"""Keyset pagination: paging through 2,500 jobs, many created in the same instant, yields each
exactly once, newest first, while new jobs keep arriving."""

from __future__ import annotations

import json
from urllib.parse import quote

import engine
from engine.store.schema import jobs


def _insert_jobs(count: int) -> list[tuple[float, str]]:
    """`count` jobs, ten to each creation time, written straight into the store."""
    rows = [
        {"id": f"job-{n:05d}", "actor": "echo" if n % 3 else "sleepy", "queue": "default",
         "state": "failed" if n % 2 else "succeeded", "args": "[]", "kwargs": "{}", "options": "{}", "priority": 0,
         "attempts": 1, "created_at": 1_700_000_000 + n // 10, "updated_at": 1_700_000_000}  # fmt: skip
        for n in range(count)
    ]
    with engine.get_store().transaction() as connection:
        connection.execute(jobs.insert(), rows)
    return [(row["created_at"], row["id"]) for row in rows]


def _page_through(client, query: str, limit: int) -> list[str]:
    seen, cursor = [], None
    while True:
        path = f"/api/jobs?limit={limit}{query}" + (f"&cursor={quote(cursor)}" if cursor else "")
        page = client.get(path).json
        seen += [job["id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            return seen
        if len(seen) == 1:  # a job created while paging is newer than the cursor: not seen, nothing shifts
            client.post("/api/jobs", {"actor": "echo", "args": [1]})


def test_paging_through_2500_jobs_has_no_duplicate_and_no_gap(client):
    created = _insert_jobs(2500)
    newest_first = [job_id for _, job_id in sorted(created, reverse=True)]
    seen = _page_through(client, "", 97)
    assert len(seen) == len(set(seen)) == 2500
    assert seen == newest_first


def test_paging_a_filter(client):
    created = _insert_jobs(2500)
    wanted = [job_id for _, job_id in sorted(created, reverse=True) if int(job_id[4:]) % 2 and int(job_id[4:]) % 3]
    seen = _page_through(client, "&status=failed&actor=echo", 100)
    assert seen == wanted and len(set(seen)) == len(wanted)
    # the cursor is opaque, and a made-up one is refused, not misread
    forged = json.dumps([1, 2, 3])
    assert client.get(f"/api/jobs?cursor={quote(forged)}").status == 422
