"""The cluster's metrics at ``GET /metrics``: read from the store and the broker at each scrape,
scraped over HTTP from the API, in both modes; and a scrape that still answers, soon, when the
store cannot be reached or hangs."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any, Optional

from dramatiq.errors import ConnectionClosed
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import update

import engine
import engine.app
from engine.metrics import cluster
from engine.metrics.cluster import ClusterCollector
from engine.metrics.host import MULTIPROC_DIR_VARIABLE
from engine.store import Store
from engine.store.schema import schedule_fires, schedules, workers
from scheduler.ledger import Claim, FireOutcome, Ledger

from tests.api.conftest import Client, serve  # noqa: F401  (fixtures)
from tests.integration.conftest import amqp_vhost, engine_env, mode, pg_url  # noqa: F401  (fixtures)

HOUR_S = 3600.0

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: Client) -> Samples:
    answer = client.get("/metrics")
    assert answer.status == 200
    assert answer.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(answer.body.decode())
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> Optional[float]:
    return samples.get((name, frozenset(labels.items())))


def recorded(store: Store, job_id: str, *, age_s: float, queue: str = "default", due_in_s: Optional[float] = None) -> None:
    """A job's row as its sender recorded it `age_s` seconds ago; delayed by `due_in_s` if given."""
    created = time.time() - age_s
    row = dict(
        id=job_id, actor="echo", queue=queue, args="[]", kwargs="{}", options="{}", priority=0,
        idempotency_key=None, created_at=created, scheduled_for=None if due_in_s is None else created + due_in_s,
    )  # fmt: skip
    store.record_enqueue(row, delayed=due_in_s is not None)


def ended(store: Store, job_id: str, state: str) -> None:
    recorded(store, job_id, age_s=10, queue="done")
    store.start_attempt(job_id, host="h", pid=1, worker_id=None, dead_after_s=30)
    store.finish_attempt(job_id, 1, engine.Outcome(state), state=engine.JobState(state))


def claimed(store: Store, *claims: Claim) -> None:
    with store.transaction() as connection:
        Ledger(store).claim_many(connection, list(claims))


def test_a_scrape_reads_jobs_queues_workers_and_schedules(serve, mode):
    client = serve()
    store = engine.get_store()
    # given jobs sent through the broker: two ready, one delayed
    engine.submit("echo", 1)
    engine.submit("echo", 2)
    engine.submit("echo", 3, delay=HOUR_S)
    # and jobs in the store only: waiting long, due long ago, not due, running, ended
    recorded(store, "waits-2-min", age_s=120, queue="slow")
    recorded(store, "waits-1-min", age_s=60, queue="slow")
    recorded(store, "retry-due-90-s-ago", age_s=100, queue="retries", due_in_s=10)
    recorded(store, "due-in-an-hour", age_s=1, queue="later", due_in_s=HOUR_S)
    recorded(store, "runs", age_s=5, queue="busy")
    store.start_attempt("runs", host="h", pid=1, worker_id=None, dead_after_s=30)
    ended(store, "did-it", "succeeded")
    ended(store, "gave-up", "failed")
    recorded(store, "changed-my-mind", age_s=1, queue="done")
    store.request_cancel("changed-my-mind")
    # workers: one alive, one stopped, one not heard from
    for worker_id in ("alive", "stopped", "silent"):
        store.heartbeat(worker_id, host="h", pid=1)
    store.mark_workers_stopped(worker_id="stopped")
    with store.transaction() as connection:
        connection.execute(update(workers).where(workers.c.id == "silent").values(heartbeat_at=time.time() - 1000))
    # schedules: fired (missed, enqueued, skipped) and now overdue; never fired; paused
    now = time.time()
    hour = now - now % HOUR_S
    engine.set_schedule("hourly", "echo", "0 * * * *")
    with store.transaction() as connection:
        connection.execute(update(schedules).where(schedules.c.name == "hourly").values(active_since=hour - 4 * HOUR_S))
    claimed(
        store,
        Claim("hourly", hour - 3 * HOUR_S, FireOutcome.MISSED),
        Claim("hourly", hour - 2 * HOUR_S, FireOutcome.ENQUEUED, "a-job"),
        Claim("hourly", hour - 1 * HOUR_S, FireOutcome.SKIPPED_OVERLAP),
    )
    engine.set_schedule("every-minute", "echo", "* * * * *")
    engine.set_schedule("paused", "echo", "* * * * *", enabled=False)

    samples = scrape(client)

    assert value(samples, "engine_up", component="store") == 1
    assert value(samples, "engine_up", component="broker") == 1
    states = {state.value: value(samples, "engine_jobs", state=state.value) for state in engine.JobState}
    assert states == {"queued": 4, "scheduled": 3, "running": 1, "succeeded": 1, "failed": 1, "canceled": 1}
    assert value(samples, "engine_queue_messages", queue="default", kind="ready") == 2
    assert value(samples, "engine_queue_messages", queue="default", kind="delayed") == 1
    assert value(samples, "engine_queue_messages", queue="default", kind="dead") == 0
    assert 120 <= value(samples, "engine_queue_oldest_job_age_seconds", queue="slow") < 180
    assert 90 <= value(samples, "engine_queue_oldest_job_age_seconds", queue="retries") < 150
    assert value(samples, "engine_queue_oldest_job_age_seconds", queue="later") is None  # not due: not waiting
    assert value(samples, "engine_workers_alive") == 1
    fires = {
        outcome: value(samples, "engine_schedule_fires_total", schedule="hourly", outcome=outcome)
        for outcome in ("enqueued", "missed", "skipped-duplicate")
    }
    assert fires == {"enqueued": 1, "missed": 1, "skipped-duplicate": 1}
    assert value(samples, "engine_schedule_fires_total", schedule="paused", outcome="enqueued") == 0
    assert value(samples, "engine_schedule_last_fire_timestamp_seconds", schedule="hourly") == hour - HOUR_S
    # due at the hour after its latest fire: past, as no scheduler runs (the alert's case)
    assert value(samples, "engine_schedule_next_fire_timestamp_seconds", schedule="hourly") == hour
    assert value(samples, "engine_schedule_last_fire_timestamp_seconds", schedule="every-minute") is None
    next_minute = value(samples, "engine_schedule_next_fire_timestamp_seconds", schedule="every-minute")
    assert now < next_minute <= now + 61 and next_minute % 60 == 0
    assert value(samples, "engine_schedule_next_fire_timestamp_seconds", schedule="paused") is None


def test_fire_counts_never_go_down_when_the_ledger_is_purged(serve, mode, monkeypatch):
    monkeypatch.setattr(cluster, "FIRES_SETTLE_S", 0.0)  # every row settled once committed
    client = serve()
    store = engine.get_store()
    engine.set_schedule("minutely", "echo", "* * * * *")
    base = time.time() - time.time() % 60 - 3600
    claimed(store, *(Claim("minutely", base + 60 * n, FireOutcome.ENQUEUED, f"job-{n}") for n in range(5)))
    assert value(scrape(client), "engine_schedule_fires_total", schedule="minutely", outcome="enqueued") == 5

    # when the retention purges the older rows, and more fires come
    assert Ledger(store).purge_fires(older_than=base + 60 * 4) == 4
    claimed(store, Claim("minutely", base + 60 * 5, FireOutcome.MISSED))

    # then the counters went on from where they were
    samples = scrape(client)
    assert value(samples, "engine_schedule_fires_total", schedule="minutely", outcome="enqueued") == 5
    assert value(samples, "engine_schedule_fires_total", schedule="minutely", outcome="missed") == 1
    assert value(samples, "engine_schedule_last_fire_timestamp_seconds", schedule="minutely") == base + 60 * 5


def test_the_fires_of_a_deleted_schedule_go_and_the_others_count_on(serve, monkeypatch):
    monkeypatch.setattr(cluster, "FIRES_SETTLE_S", 0.0)
    client = serve()  # on SQLite, the next rows take the ids of the latest rows deleted
    store = engine.get_store()
    engine.set_schedule("stays", "echo", "* * * * *")
    engine.set_schedule("goes", "echo", "* * * * *")
    claimed(store, Claim("stays", 60.0, FireOutcome.ENQUEUED, "a"))
    claimed(store, Claim("goes", 60.0, FireOutcome.ENQUEUED, "b"), Claim("goes", 120.0, FireOutcome.ENQUEUED, "c"))
    scrape(client)

    engine.delete_schedule("goes")
    claimed(store, Claim("stays", 120.0, FireOutcome.ENQUEUED, "d"), Claim("stays", 180.0, FireOutcome.MISSED))
    samples = scrape(client)

    assert value(samples, "engine_schedule_fires_total", schedule="stays", outcome="enqueued") == 2
    assert value(samples, "engine_schedule_fires_total", schedule="stays", outcome="missed") == 1
    assert not [labels for name, labels in samples if ("schedule", "goes") in labels]


def test_recent_fires_are_counted_again_until_they_settle(store):
    # given fires just recorded, which a transaction still open could precede by id
    ledger = Ledger(store)
    claimed(store, Claim("s", 60.0, FireOutcome.ENQUEUED, "a"), Claim("s", 120.0, FireOutcome.MISSED))

    recent = ledger.count_fires(after_id=0, settled_before=time.time() - 300)
    settled = ledger.count_fires(after_id=0, settled_before=time.time() + 1)

    assert (recent.settled_id, recent.settled) == (0, {})
    assert recent.recent == {("s", FireOutcome.ENQUEUED): (1, 60.0), ("s", FireOutcome.MISSED): (1, 120.0)}
    assert settled.settled == recent.recent and settled.recent == {}
    assert ledger.count_fires(after_id=settled.settled_id, settled_before=time.time() + 1).settled == {}


def test_a_store_that_cannot_be_reached_scrapes_as_down_with_the_broker_up(serve, mode):
    client = serve()
    broker, store = engine.get_broker(), engine.get_store()
    unreachable = Store("postgresql+psycopg://postgres@127.0.0.1:9/nothing")  # the discard port: refused
    engine.app.use(broker, unreachable)
    try:
        samples = scrape(client)
    finally:
        engine.app.use(broker, store)
        unreachable.close()

    assert value(samples, "engine_up", component="store") == 0
    assert value(samples, "engine_up", component="broker") == 1
    assert value(samples, "engine_queue_messages", queue="default", kind="ready") == 0
    assert not [name for name, _ in samples if name in ("engine_jobs", "engine_workers_alive")]


def test_a_store_that_hangs_is_waited_for_the_scrape_timeout_only(serve, mode):
    # given a "database" that takes connections and never answers
    silent = socket.create_server(("127.0.0.1", 0))
    taken: list[socket.socket] = []
    threading.Thread(target=_accept_until_closed, args=(silent, taken), daemon=True).start()
    client = serve(metrics_scrape_timeout_s=1.0)
    broker, store = engine.get_broker(), engine.get_store()
    hanging = Store(f"postgresql+psycopg://postgres@127.0.0.1:{silent.getsockname()[1]}/nothing")
    engine.app.use(broker, hanging)
    try:
        started = time.monotonic()
        first = scrape(client)
        second = scrape(client)  # the first scrape's reads still hang: none is started again
        took_s = time.monotonic() - started
        reading = sorted(thread.name for thread in threading.enumerate() if thread.name.startswith("metrics: the store"))
    finally:
        engine.app.use(broker, store)
        silent.close()
        for connection in taken:  # the hung reads fail, and their threads end
            connection.close()
        hanging.close()

    assert took_s < 10  # two scrapes of a 1 s timeout: a hung read would take the test's 30 s
    for samples in (first, second):
        assert value(samples, "engine_up", component="store") == 0
        assert value(samples, "engine_up", component="broker") == 1
    assert reading == ["metrics: the store's ping", "metrics: the store's reads"]  # the first scrape's, no more


def _accept_until_closed(listener: socket.socket, taken: list[socket.socket]) -> None:
    while True:
        try:
            taken.append(listener.accept()[0])
        except OSError:  # closed
            return


def test_the_broker_down_scrapes_as_down_with_the_store_up(store):
    def unreachable() -> dict[str, Any]:
        raise ConnectionClosed(OSError("connection refused"))

    collector = ClusterCollector(store=lambda: store, queue_depths=unreachable, dead_after_s=30, timeout_s=5)
    recorded(store, "waits", age_s=1)

    families = {family.name: family for family in collector.collect()}

    up = {sample.labels["component"]: sample.value for sample in families["engine_up"].samples}
    assert up == {"store": 1, "broker": 0}
    assert "engine_queue_messages" not in families
    assert {sample.labels["state"]: sample.value for sample in families["engine_jobs"].samples}["queued"] == 1


def test_scrapes_that_come_together_share_the_reads(store):
    # given a store whose ping takes a while, scraped by two Prometheus servers at once
    pings: list[float] = []

    class SlowToPing:
        def ping(self) -> None:
            pings.append(time.time())
            time.sleep(0.5)
            store.ping()

        def __getattr__(self, name: str) -> Any:
            return getattr(store, name)

    slow = SlowToPing()
    collector = ClusterCollector(store=lambda: slow, queue_depths=dict, dead_after_s=30, timeout_s=5)
    answers: list[list[Any]] = []
    scrapes = [threading.Thread(target=lambda: answers.append(list(collector.collect()))) for _ in range(2)]
    for each in scrapes:
        each.start()
    for each in scrapes:
        each.join()

    # then both saw the store up, from one ping
    assert len(pings) == 1 and len(answers) == 2
    for families in answers:
        [up] = [family for family in families if family.name == "engine_up"]
        assert {sample.labels["component"]: sample.value for sample in up.samples} == {"store": 1, "broker": 1}


def test_metrics_need_no_token_and_are_described(serve):
    client = serve(api_token="secret")

    assert client.get("/metrics").status == 200
    assert client.get("/api/jobs").status == 401
    described = client.get("/openapi.json").json["paths"]["/metrics"]["get"]
    assert described["tags"] == ["health"] and "security" not in described


def test_an_api_alone_serves_the_jobs_it_enqueued_beside_the_cluster(serve, monkeypatch):
    monkeypatch.delenv(MULTIPROC_DIR_VARIABLE, raising=False)
    client = serve()
    before = value(scrape(client), "engine_jobs_enqueued_total", actor="echo", queue="default") or 0.0

    assert client.post("/api/jobs", {"actor": "echo", "args": [1]}).status == 202

    samples = scrape(client)
    assert value(samples, "engine_jobs_enqueued_total", actor="echo", queue="default") == before + 1
    assert value(samples, "engine_up", component="store") == 1


def test_an_api_under_a_supervisor_leaves_its_own_counts_to_the_supervisor(serve, monkeypatch, tmp_path):
    monkeypatch.setenv(MULTIPROC_DIR_VARIABLE, str(tmp_path))
    client = serve()

    assert client.post("/api/jobs", {"actor": "echo", "args": [1]}).status == 202

    samples = scrape(client)
    assert not any(name.startswith("engine_jobs_enqueued") for name, _labels in samples)
    assert value(samples, "engine_up", component="store") == 1
