"""Every route of the API over a real socket, embedded and distributed."""

from __future__ import annotations

import time

from engine.job import JobState
from tests.support.processes import wait_for, wait_for_state


def test_a_submitted_job_is_answered_202_with_its_location_and_runs(client, worker):
    # given a running worker, when a job is submitted
    answer = client.post("/api/jobs", {"actor": "counted", "args": [5]})
    # then it is accepted, and its URL says where to follow it
    assert answer.status == 202
    job = answer.json
    assert answer.headers["Location"] == f"/api/jobs/{job['id']}"
    assert job["actor"] == "counted" and job["state"] in ("queued", "running", "succeeded")
    wait_for_state(job["id"], {JobState.SUCCEEDED})
    done = client.get(f"/api/jobs/{job['id']}").json
    assert done["state"] == "succeeded" and done["progress"]["percent"] == 100
    assert done["attempts"] == 1 and done["finished_at"] is not None
    assert client.get(f"/api/jobs/{job['id']}/result").json == {"job_id": job["id"], "result": {"steps": 5}}
    trail = client.get(f"/api/jobs/{job['id']}/attempts").json["attempts"]
    assert [(a["number"], a["outcome"]) for a in trail] == [(1, "succeeded")]
    assert trail[0]["worker_pid"] > 0 and trail[0]["worker_host"]


def test_the_same_idempotency_key_again_answers_200_and_the_first_job(client):
    first = client.post("/api/jobs", {"actor": "echo", "args": ["a"], "idempotency_key": "order-7"})
    again = client.post("/api/jobs", {"actor": "echo", "args": ["a"], "idempotency_key": "order-7"})
    assert (first.status, again.status) == (202, 200)
    assert again.json["id"] == first.json["id"]
    assert len(client.get("/api/jobs").json["jobs"]) == 1


def test_delay_and_priority_are_taken(client):
    job = client.post("/api/jobs", {"actor": "echo", "args": [1], "delay_ms": 60_000, "priority": 7}).json
    assert job["state"] == "scheduled" and job["priority"] == 7 and job["scheduled_for"] is not None


def test_jobs_are_listed_newest_first_and_filtered(client):
    ids = [client.post("/api/jobs", {"actor": actor, "args": [1]}).json["id"] for actor in ("echo", "sleepy", "echo")]
    listed = client.get("/api/jobs").json
    assert [job["id"] for job in listed["jobs"]] == ids[::-1] and listed["next_cursor"] is None
    assert [job["id"] for job in client.get("/api/jobs?actor=echo").json["jobs"]] == [ids[2], ids[0]]
    assert [job["id"] for job in client.get("/api/jobs?status=queued&queue=default").json["jobs"]] == ids[::-1]
    assert client.get("/api/jobs?status=failed").json["jobs"] == []
    assert client.get("/api/jobs?queue=elsewhere").json["jobs"] == []
    assert client.get("/api/jobs?created_after=2999-01-01T00:00:00Z").json["jobs"] == []
    assert len(client.get("/api/jobs?created_before=2999-01-01T00:00:00").json["jobs"]) == 3


def test_a_queued_job_is_canceled_and_a_canceled_job_retried(client):
    job = client.post("/api/jobs", {"actor": "echo", "args": [1], "delay_ms": 60_000}).json
    canceled = client.post(f"/api/jobs/{job['id']}/cancel")
    assert canceled.status == 200
    assert canceled.json["outcome"] == "canceled" and canceled.json["job"]["state"] == "canceled"
    again = client.post(f"/api/jobs/{job['id']}/cancel").json
    assert again["outcome"] == "canceled"
    retried = client.post(f"/api/jobs/{job['id']}/retry")
    assert retried.status == 202 and retried.json["state"] == "queued"


def test_a_running_job_is_asked_to_stop(client, worker):
    job = client.post("/api/jobs", {"actor": "cooperative", "args": [2000]}).json
    wait_for_state(job["id"], {JobState.RUNNING})
    assert client.post(f"/api/jobs/{job['id']}/cancel").json["outcome"] == "cancel-requested"
    wait_for_state(job["id"], {JobState.CANCELED})


def test_bulk_retry_requeues_the_failed_jobs_that_match(client, worker):
    failed = [client.post("/api/jobs", {"actor": "hopeless"}).json["id"] for _ in range(3)]
    other = client.post("/api/jobs", {"actor": "echo", "args": [1]}).json["id"]
    for job_id in failed:
        wait_for_state(job_id, {JobState.FAILED})
    done = client.post("/api/jobs/bulk-retry", {"actor": "hopeless", "limit": 2}).json
    assert len(done["retried"]) == 2 and done["more"] is True and done["failures"] == []
    rest = client.post("/api/jobs/bulk-retry", {"actor": "hopeless"}).json
    assert set(done["retried"]) | set(rest["retried"]) >= {failed[0]}
    wait_for_state(other, {JobState.SUCCEEDED})
    for job_id in failed:
        wait_for(lambda: client.get(f"/api/jobs/{job_id}").json["attempts"] >= 2, 30, f"{job_id} to run again")


def test_actors_queues_workers_and_overview(client, worker):
    actors = {actor["name"]: actor for actor in client.get("/api/actors").json["actors"]}
    assert actors["flaky"]["max_retries"] == 3 and actors["flaky"]["min_backoff_ms"] == 200
    assert actors["busy_loop"]["time_limit_ms"] == 300 and actors["echo"]["queue"] == "default"
    # Longer than ENGINE_DELAY_HOLD_MS: RabbitMQ counts it in the hold queue, not held by the worker.
    client.post("/api/jobs", {"actor": "echo", "args": [1], "delay_ms": 20 * 60_000})
    queues = {queue["name"]: queue for queue in client.get("/api/queues").json["queues"]}
    assert queues["default"]["delayed"] == 1
    job = client.post("/api/jobs", {"actor": "sleepy", "args": [3]}).json
    wait_for_state(job["id"], {JobState.RUNNING})
    workers = client.get("/api/workers").json["workers"]
    assert any(w["alive"] and job["id"] in w["running_jobs"] for w in workers), workers
    overview = client.get("/api/overview").json
    assert overview["jobs"]["running"] == 1 and overview["jobs"]["scheduled"] == 1
    assert overview["last_hour"]["running"] == 1 and overview["workers_alive"] >= 1
    assert overview["queues"][0]["name"] == "default"


def test_health_readiness_description_and_page(client):
    assert client.get("/healthz").json == {"status": "ok"}
    assert client.get("/readyz").json == {"status": "ready", "store": "ok", "broker": "ok"}
    description = client.get("/openapi.json").json
    assert description["openapi"] == "3.1.0"
    assert {"get", "post"} <= set(description["paths"]["/api/jobs"])
    page = client.get("/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    assert b"<title>engine status</title>" in page.body
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]


def test_every_answer_carries_the_security_headers_and_a_request_id(client):
    for answer in (client.get("/api/jobs"), client.get("/nowhere"), client.get("/")):
        assert answer.headers["X-Content-Type-Options"] == "nosniff"
        assert answer.headers["X-Frame-Options"] == "DENY"
        assert "frame-ancestors 'none'" in answer.headers["Content-Security-Policy"]
        assert len(answer.headers["X-Request-Id"]) >= 8
    assert client.get("/healthz", headers={"X-Request-Id": "trace-42"}).headers["X-Request-Id"] == "trace-42"


def test_head_answers_without_a_body(client):
    answer = client.request("HEAD", "/healthz")
    assert answer.status == 200 and answer.body == b"" and int(answer.headers["Content-Length"]) > 0


def test_a_connection_is_kept_alive_between_requests(client):
    import http.client

    connection = http.client.HTTPConnection(client.host, client.port, timeout=10)
    started = time.monotonic()
    for _ in range(3):
        connection.request("GET", "/healthz")
        assert connection.getresponse().read() == b'{"status":"ok"}'
    connection.close()
    assert time.monotonic() - started < 10
