"""Cluster-wide metrics: what the store and the broker hold, read at each scrape.

No process keeps these figures: every scrape of the API's ``GET /metrics`` reads them (as
sidekiq-prometheus-exporter does), so they need no multiprocess files, and every API process
answers with the same ones. They are:

- ``engine_jobs{state}``: jobs in the store, by state.
- ``engine_queue_messages{queue, kind}``: the broker's queue depths (`engine.client.queue_depths`).
- ``engine_queue_oldest_job_age_seconds{queue}``: how long the longest-waiting job of the queue
  has been due and not started (`Store.oldest_waiting_by_queue`); 0 for a queue with none.
- ``engine_workers_alive``: worker processes alive, by the rule of ``GET /api/workers``.
- ``engine_schedule_fires_total{schedule, outcome}``, ``engine_schedule_last_fire_timestamp_seconds``
  and ``engine_schedule_next_fire_timestamp_seconds{schedule}``: from the fire ledger.
- ``engine_up{component}``: whether the store and the broker answered.

A scrape never fails and never hangs: the store's ping, the store's reads and the broker's
depths each run on a thread, the scrape waits for them `timeout_s` at most, and answers with
what was read by then, ``engine_up`` 0 for what did not answer.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterator, Optional

from loguru import logger
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from scheduler.ledger import FireCount, FireOutcome, Ledger, StoredSchedule

from ..job import JobState
from ..store import Store

#: Rows of the fire ledger younger than this (seconds) are counted afresh at every scrape: by
#: the time a row is older, every row of a lower id has been committed (see `Ledger.count_fires`).
FIRES_SETTLE_S = 300.0

#: The outcome label of each outcome of the ledger. A fire time skipped because the previous
#: fire's job is unfinished (overlap = false) is a duplicate run skipped. A scheduler that loses
#: the claim of a fire time to another records nothing: that fire time is counted once, by the
#: winner's row.
FIRE_OUTCOME_LABELS = {
    FireOutcome.ENQUEUED: "enqueued",
    FireOutcome.MISSED: "missed",
    FireOutcome.SKIPPED_OVERLAP: "skipped-duplicate",
}

#: The kinds of queued messages counted, as the broker's depths name them.
QUEUE_KINDS = ("ready", "delayed", "dead")

_Read = Callable[[dict[str, Any], float], None]


class ClusterCollector:
    """The cluster-wide metrics, for prometheus-client (`generate_latest`, a registry).

    Parameters:
      store: the engine's store, asked for at each scrape (`engine.app.get_store`), where
        asking fails while the database is down.
      queue_depths: the broker's depths (`engine.client.queue_depths`).
      dead_after_s(float): a worker not heard from for this long is dead
        (``ENGINE_WORKER_DEAD_AFTER_S``).
      timeout_s(float): how long a scrape waits at most for the store and the broker
        (``ENGINE_METRICS_SCRAPE_TIMEOUT_S``).
    """

    def __init__(
        self,
        *,
        store: Callable[[], Store],
        queue_depths: Callable[[], dict[str, dict[str, int]]],
        dead_after_s: float,
        timeout_s: float,
    ) -> None:
        self._store = store
        self._queue_depths = queue_depths
        self.dead_after_s = dead_after_s
        self.timeout_s = timeout_s
        self._fires = _FireTally()
        self._next_fires = _NextFires()
        self._readers = {
            "store": _Reader("the store's ping", self._ping),
            "reads": _Reader("the store's reads", self._read_store),
            "broker": _Reader("the broker's queue depths", self._read_broker),
        }

    def describe(self) -> list[Metric]:
        """Nothing: a registry must not scrape the store when the collector is registered."""
        return []

    def collect(self) -> Iterator[Metric]:
        deadline = time.monotonic() + self.timeout_s
        readings = {name: reader.start(deadline) for name, reader in self._readers.items()}
        found = {name: _wait(self._readers[name], each, deadline, self.timeout_s) for name, each in readings.items()}
        store, broker = found["reads"], found["broker"]

        up = GaugeMetricFamily("engine_up", "Whether the component answered this scrape (1) or not (0)", labels=["component"])
        up.add_metric(["store"], 1.0 if "pong" in found["store"] else 0.0)
        up.add_metric(["broker"], 1.0 if "depths" in broker else 0.0)
        yield up
        if "jobs" in store:
            jobs = GaugeMetricFamily("engine_jobs", "Jobs in the store, by state", labels=["state"])
            for state in JobState:
                jobs.add_metric([state.value], store["jobs"].get(state, 0))
            yield jobs
        if "depths" in broker:
            yield _queue_messages(broker["depths"])
        if "waiting" in store:
            yield _oldest_ages(store["waiting"], store["now"], queues=broker.get("depths", {}))
        if "workers_alive" in store:
            alive = "Worker processes alive (heard from, not stopped)"
            yield GaugeMetricFamily("engine_workers_alive", alive, value=store["workers_alive"])
        if "fires" in store:
            yield from _schedule_metrics(store["schedules"], store["fires"], self._next_fires.lookup())

    # -- the reads, each on its reader's thread ------------------------------------------------

    def _ping(self, found: dict[str, Any], deadline: float) -> None:
        self._store().ping()
        found["pong"] = True

    def _read_broker(self, found: dict[str, Any], deadline: float) -> None:
        found["depths"] = self._queue_depths()

    def _read_store(self, found: dict[str, Any], deadline: float) -> None:
        """The store's figures one after the other, in `found` as each is read: a slow store
        answers with the first ones, and no more are asked for once the scrape has answered."""
        store, now = self._store(), time.time()
        found["now"] = now
        ledger = Ledger(store)
        reads: list[tuple[str, Callable[[], Any]]] = [
            ("jobs", store.count_by_state),
            ("waiting", lambda: store.oldest_waiting_by_queue(now=now)),
            ("workers_alive", lambda: self._workers_alive(store, now)),
            ("schedules", ledger.list),
            ("fires", lambda: self._fires.count(ledger, {each.schedule.name for each in found["schedules"]}, now)),
        ]
        for key, read in reads:
            if time.monotonic() > deadline:
                return
            found[key] = read()

    def _workers_alive(self, store: Store, now: float) -> int:
        workers = store.list_workers(seen_since=now - self.dead_after_s)
        return sum(worker.alive(now=now, dead_after_s=self.dead_after_s) for worker in workers)


class _FireTally:
    """The fire ledger's rows counted by schedule and outcome, kept from scrape to scrape: each
    scrape counts the rows added since (`Ledger.count_fires`), and rows the retention purges
    later stay counted, so that the counters never go down. Used by one thread at a time (the
    store's reader)."""

    def __init__(self) -> None:
        self._after_id = 0
        self._settled: dict[tuple[str, FireOutcome], FireCount] = {}

    def count(self, ledger: Ledger, schedules: set[str], now: float) -> dict[tuple[str, FireOutcome], FireCount]:
        """The counts of every row so far, `schedules` being the names that exist now."""
        if {name for name, _ in self._settled} - schedules:
            # A schedule was deleted, with its rows, whose ids SQLite may give to new rows: all
            # are counted again (what was purged no longer is: Prometheus takes it for a restart).
            self._after_id, self._settled = 0, {}
        counts = ledger.count_fires(after_id=self._after_id, settled_before=now - FIRES_SETTLE_S)
        self._settled = _added(self._settled, counts.settled)
        self._after_id = counts.settled_id
        return _added(self._settled, counts.recent)


def _added(
    base: dict[tuple[str, FireOutcome], FireCount], more: dict[tuple[str, FireOutcome], FireCount]
) -> dict[tuple[str, FireOutcome], FireCount]:
    total = dict(base)
    for key, extra in more.items():
        before = total.get(key)
        total[key] = extra if before is None else FireCount(before.count + extra.count, max(before.latest, extra.latest))
    return total


# -- the metrics from what was read --------------------------------------------------------------


def _queue_messages(depths: dict[str, dict[str, int]]) -> Metric:
    family = GaugeMetricFamily("engine_queue_messages", "Messages in the broker's queues, by kind", labels=["queue", "kind"])
    for queue, kinds in sorted(depths.items()):
        for kind in QUEUE_KINDS:
            family.add_metric([queue, kind], kinds.get(kind, 0))
    return family


def _oldest_ages(waiting_since: dict[str, float], now: float, *, queues: dict[str, Any]) -> Metric:
    family = GaugeMetricFamily(
        "engine_queue_oldest_job_age_seconds",
        "How long the longest-waiting job of the queue has been due and not started (0: none waits)",
        labels=["queue"],
    )
    for queue in sorted(set(waiting_since) | set(queues)):
        family.add_metric([queue], max(0.0, now - waiting_since[queue]) if queue in waiting_since else 0.0)
    return family


def _schedule_metrics(
    schedules: list[StoredSchedule],
    fires: dict[tuple[str, FireOutcome], FireCount],
    next_fire: Callable[[StoredSchedule, Optional[float]], Optional[float]],
) -> Iterator[Metric]:
    fired = CounterMetricFamily(
        "engine_schedule_fires_total", "Fire times in the schedule's ledger, by outcome", labels=["schedule", "outcome"]
    )
    last = GaugeMetricFamily(
        "engine_schedule_last_fire_timestamp_seconds", "The schedule's latest fire time in its ledger, whatever its outcome",
        labels=["schedule"],
    )  # fmt: skip
    upcoming = GaugeMetricFamily(
        "engine_schedule_next_fire_timestamp_seconds",
        "When the schedule is due next, after its latest fire or its creation or change; in the past: not fired",
        labels=["schedule"],
    )
    for stored in schedules:
        name = stored.schedule.name
        latest: Optional[float] = None
        for outcome, label in FIRE_OUTCOME_LABELS.items():
            count = fires.get((name, outcome))
            fired.add_metric([name, label], count.count if count else 0)
            if count and (latest is None or count.latest > latest):
                latest = count.latest
        if latest is not None:
            last.add_metric([name], latest)
        due = next_fire(stored, latest)
        if due is not None:
            upcoming.add_metric([name], due)
    yield from (fired, last, upcoming)


class _NextFires:
    """When schedules are due next, remembered from one scrape to the next by cron expression,
    zone and the time after which: the schedules of one cron expression that fired together
    share one, and one changes only when its schedule fires, so that a scrape computes few."""

    def __init__(self) -> None:
        self._known: dict[tuple[str, str, float], Optional[float]] = {}

    def lookup(self) -> Callable[[StoredSchedule, Optional[float]], Optional[float]]:
        """The lookup of one scrape (`_next_fire`); the next scrape forgets what this one did
        not look up."""
        known, used = self._known, {}
        self._known = used

        def next_fire(stored: StoredSchedule, last_fire: Optional[float]) -> Optional[float]:
            if not stored.schedule.enabled:
                return None
            after = max(last_fire or 0.0, stored.active_since)
            key = (stored.schedule.cron, stored.schedule.timezone, after)
            if key not in used:
                used[key] = known[key] if key in known else _next_fire(stored, after)
            return used[key]

        return next_fire


def _next_fire(stored: StoredSchedule, after: float) -> Optional[float]:
    """When the schedule is due after `after`: its latest fire, or when it was created, resumed
    or retimed (`active_since`), whichever is later, as a scheduler counts (`scheduler.service`);
    None when its cron has no time left."""
    found = stored.schedule.next_fire_times(1, after=datetime.fromtimestamp(after, tz=timezone.utc))
    return found[0].timestamp() if found else None


# -- reads on threads, waited for until a deadline -----------------------------------------------


class _Reading:
    """One run of a read, for the scrapes that came before its `deadline`: what it found so
    far, and whether it is done."""

    def __init__(self, deadline: float) -> None:
        self.deadline = deadline
        self.found: dict[str, Any] = {}
        self.done = threading.Event()

    def run(self, read: _Read, what: str) -> None:
        try:
            read(self.found, self.deadline)
        except Exception as error:  # noqa: BLE001  (a scrape answers without what failed)
            logger.warning("Metrics: {} failed: {}", what, _first_line(error))
        finally:
            self.done.set()


class _Reader:
    """Runs a read on a daemon thread, one at a time. Scrapes that come together (two
    Prometheus servers) share a run; a scrape that finds a run still going past its deadline
    (a database that hangs) starts none, so threads do not pile up. Daemon: a read that hangs
    does not keep the process from exiting."""

    def __init__(self, what: str, read: _Read) -> None:
        self.what = what
        self._read = read
        self._lock = threading.Lock()
        self._current: Optional[_Reading] = None

    def start(self, deadline: float) -> Optional[_Reading]:
        """A new run, or the one going on for another scrape; None when that one is late."""
        with self._lock:
            current = self._current
            if current is not None and not current.done.is_set():
                return current if time.monotonic() < current.deadline else None
            self._current = reading = _Reading(deadline)
            thread = threading.Thread(target=reading.run, args=(self._read, self.what), name=f"metrics: {self.what}", daemon=True)
            thread.start()
        return reading


def _wait(reader: _Reader, reading: Optional[_Reading], deadline: float, timeout_s: float) -> dict[str, Any]:
    """What `reading` found by `deadline` (a copy: it may go on)."""
    if reading is None:
        logger.warning("Metrics: {} of an earlier scrape is still running, past its time", reader.what)
        return {}
    if not reading.done.wait(max(0.0, deadline - time.monotonic())):
        logger.warning("Metrics: {} did not end within {} s", reader.what, timeout_s)
    return dict(reading.found)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0][:300]
