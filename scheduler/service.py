"""The scheduler service: APScheduler's timing, the store's ledger, the engine's send path.

Schedules with the same cron expression and zone share one job of an APScheduler 3
`BackgroundScheduler` (its in-memory job store, their `CronTrigger`): APScheduler only says
when. Its job does no work: `_FireExecutor` queues the due fire times with the names of the
schedules due then, and the scheduler's claimer thread takes what is queued, waits
`BATCH_WINDOW_S` for more fires of about the same instant, and fires those of each fire time
together, `MAX_FIRES_PER_TRANSACTION` at a time:

1. one transaction claims each (schedule, fire time) in the ledger, all in one statement, and
   records the jobs of the claims it won, with their schedule and fire time (Tracking's rows,
   written together by `Store.record_enqueues`; embedded, each with its message row). Claims
   another scheduler made first insert nothing: the ledger's unique key decides;
2. with RabbitMQ, the won jobs' messages are published after the commit, by the broker's
   sender thread (in batches, confirms pipelined), marked so that Tracking does not write
   their rows a second time. A scheduler that dies in between leaves `queued` jobs without a
   message, which the workers' resend sends (`engine.middleware.resend`).

So any number of schedulers, on any hosts, create exactly one job per fire time, and no leader
is needed; a scheduler that loses a batch pays one statement that inserts nothing. Each polls
the store's change counter every `poll_interval_s` and reloads what changed; when it (re)loads
a schedule it first settles the fire times that came due since the ledger's latest (`_load`),
which is how an outage of every scheduler becomes misfires.
"""

from __future__ import annotations

import queue
import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable, Iterable, NamedTuple, Optional, TypeVar

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from dramatiq import Broker, Message
from dramatiq.errors import ActorNotFound
from loguru import logger
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from engine.brokers.sqlite import SQLiteBroker
from engine.middleware.tracking import RECHECK_OPTION, Tracking
from engine.store import Store

from .definition import Misfire, Schedule, fire_times
from .ledger import MAX_MISSED_RECORDED, Claim, FireOutcome, Ledger, StoredSchedule

#: How often (seconds) a scheduler looks for schedule changes made elsewhere.
POLL_INTERVAL_S = 1.0

#: Fire times this recent (seconds, and within the schedule's grace) are fired when a scheduler
#: finds them due and unclaimed, each: a live scheduler may simply be a little late with them.
#: Older ones are coalesced into at most one job (see `plan_fires`), so no outage ends in a burst.
RECENT_S = 10.0

#: How long (seconds) the claimer waits, once a fire is due, for the others due about then
#: (other cron expressions due at the same second come from APScheduler one by one).
BATCH_WINDOW_S = 0.02

#: At most this many fires are claimed in one transaction: the jobs of the first are sent
#: while the next are claimed.
MAX_FIRES_PER_TRANSACTION = 500

#: How long (seconds) to wait before trying again the fires the store failed, while they are
#: within their grace.
FIRE_RETRY_PAUSE_S = 1.0

_T = TypeVar("_T")


def plan_fires(schedule: Schedule, due: list[float], now: float) -> tuple[list[float], list[float]]:
    """Split due, unclaimed fire times (oldest first) into those to fire and those missed.

    Each fire time at most `RECENT_S` old (and within `misfire_grace_s`) is fired. If none is,
    the latest due is fired when it is within the grace, or as a catch-up when `misfire` is
    `once`. Every other one is missed.

    Returns:
      (to_fire, missed), each oldest first.
    """
    if not due:
        return [], []
    recent = min(RECENT_S, schedule.misfire_grace_s)
    to_fire = [fire_time for fire_time in due if now - fire_time <= recent]
    latest = due[-1]
    if not to_fire and (now - latest <= schedule.misfire_grace_s or schedule.misfire == Misfire.ONCE):
        to_fire = [latest]
    chosen = set(to_fire)
    return to_fire, [fire_time for fire_time in due if fire_time not in chosen]


class _Due(NamedTuple):
    """Fire times come due for some schedules: from their APScheduler job, or from a (re)load."""

    names: tuple[str, ...]
    fire_times: list[float]


class Scheduler:
    """Fires the store's schedules until stopped; run any number of them.

    Parameters:
      broker(Broker): the engine's broker, with its actors declared and Tracking in its
        middleware.
      store(Store): the store that broker tracks jobs in.
      poll_interval_s(float): how often to look for changes made elsewhere.
    """

    def __init__(self, broker: Broker, store: Store, *, poll_interval_s: float = POLL_INTERVAL_S) -> None:
        self.broker = broker
        self.store = store
        self.ledger = Ledger(store)
        self.poll_interval_s = poll_interval_s
        self._version: Optional[int] = None
        self._stopped = threading.Event()
        # The schedules fired here, and the APScheduler job (`_group`) each belongs to, read by
        # APScheduler's thread and the claimer while the poller changes them.
        self._lock = threading.Lock()
        self._loaded: dict[str, StoredSchedule] = {}
        self._groups: dict[str, set[str]] = {}
        self._due: queue.SimpleQueue[Optional[_Due]] = queue.SimpleQueue()
        self._claimer = threading.Thread(target=self._claim_until_stopped, name="fire-claimer", daemon=True)
        self._timing = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": _FireExecutor(self)},
            # Lateness is judged by `plan_fires`, with the ledger: APScheduler passes every run time.
            job_defaults={"misfire_grace_time": None, "coalesce": False},
            timezone=timezone.utc,
        )
        self._poller: Optional[threading.Thread] = None

    def start(self) -> None:
        """Load the schedules, settle what came due while no scheduler ran, and start firing."""
        self._claimer.start()
        self._timing.start()
        self.sync()
        self._poller = threading.Thread(target=self._poll_until_stopped, name="schedule-changes", daemon=True)
        self._poller.start()
        logger.info("Scheduler started with {} schedule(s).", len(self._loaded))

    def stop(self) -> None:
        """Stop firing; the fires due by now are finished first."""
        self._stopped.set()
        if self._poller is not None:
            self._poller.join()
        self._timing.shutdown(wait=True)
        self._due.put(None)
        self._claimer.join()

    # -- following the store -------------------------------------------------------------------

    def sync(self) -> bool:
        """Reload the schedules if the store's change counter moved; True if it did."""
        version = self.ledger.version()
        if version == self._version:
            return False
        stored = {each.schedule.name: each for each in self.ledger.list() if each.schedule.enabled}
        for name in set(self._loaded) - set(stored):
            self._unload(name)
            logger.info("Schedule {} is no longer fired here: paused or deleted.", name)
        changed = [each for name, each in stored.items() if self._loaded.get(name) != each]
        last_fires = self.ledger.last_fire_times() if changed else {}
        for each in changed:
            self._load(each, last_fires.get(each.schedule.name))
        self._version = version
        return True

    def _load(self, stored: StoredSchedule, last_fire: Optional[float]) -> None:
        """Fire the schedule from now on, once the fire times due since the later of its latest
        fire and its `active_since` are settled."""
        schedule = stored.schedule
        before = self._loaded.get(schedule.name)
        if before is not None and _group(before.schedule) != _group(schedule):
            self._unload(schedule.name)
        trigger = schedule.trigger()
        group = _group(schedule)
        with self._lock:
            # Read under the lock: a fire time of the group either is due by `now`, or comes
            # from APScheduler after this schedule joined the group.
            now = datetime.now(timezone.utc)
            due = _latest_fire_times(trigger, max(last_fire or 0.0, stored.active_since), now)
            self._loaded[schedule.name] = stored
            members = self._groups.setdefault(group, set())
            new_group = not members
            members.add(schedule.name)
        if due:
            self._due.put(_Due((schedule.name,), due))
        if new_group:  # outside the lock: APScheduler's thread holds its own while it takes ours
            self._timing.add_job(_fire_by_executor, trigger, id=group, name=group, next_run_time=trigger.get_next_fire_time(now, now))

    def _unload(self, name: str) -> None:
        with self._lock:
            group = _group(self._loaded.pop(name).schedule)
            self._groups[group].discard(name)
            emptied = not self._groups[group]
            if emptied:
                del self._groups[group]
        if emptied:
            self._timing.remove_job(group)

    def _poll_until_stopped(self) -> None:
        while not self._stopped.wait(self.poll_interval_s):
            try:
                self.sync()
            except SQLAlchemyError as error:
                logger.warning("Could not look for schedule changes ({!r}); trying again.", error)

    # -- firing --------------------------------------------------------------------------------

    def _queue_group(self, group: str, due: list[float]) -> None:
        """Queue the due fire times of an APScheduler job for the schedules in it now."""
        with self._lock:
            names = tuple(self._groups.get(group, ()))
        if names:
            self._due.put(_Due(names, due))

    def _claim_until_stopped(self) -> None:
        """The claimer thread: fire what is due, a batch at a time, until `stop` queues None."""
        stopping = False
        while not stopping:
            batch = [self._due.get()]
            window_ends = time.monotonic() + BATCH_WINDOW_S
            while (left := window_ends - time.monotonic()) > 0:
                try:
                    batch.append(self._due.get(timeout=left))
                except queue.Empty:
                    break
            stopping = None in batch
            due: dict[str, set[float]] = {}
            for each in batch:
                for name in each.names if each is not None else ():
                    due.setdefault(name, set()).update(each.fire_times)
            try:
                self.fire_due({name: sorted(fire_times) for name, fire_times in due.items()})
            except Exception as error:
                logger.exception("Fires of {} schedule(s) failed: {!r}", len(due), error)

    def fire_due(self, due: dict[str, list[float]]) -> None:
        """Fire, or record as missed, the schedules' due fire times (by name: epoch seconds,
        oldest first). The fires of one fire time are claimed together, up to
        `MAX_FIRES_PER_TRANSACTION` in a transaction; earlier fire times go first."""
        now = time.time()
        with self._lock:
            loaded = {name: self._loaded[name] for name in due if name in self._loaded}  # not paused or deleted since
        by_fire_time: dict[float, list[Schedule]] = {}
        missed: dict[str, list[float]] = {}
        for name, stored in loaded.items():
            to_fire, missed[name] = plan_fires(stored.schedule, [each for each in due[name] if each > stored.active_since], now)
            for fire_time in to_fire:
                by_fire_time.setdefault(fire_time, []).append(stored.schedule)
        self._record_missed({name: fire_times for name, fire_times in missed.items() if fire_times})
        for fire_time, schedules in sorted(by_fire_time.items()):
            # One order for every scheduler: two claiming the same fires never deadlock (`Ledger.claim_many`).
            schedules.sort(key=lambda schedule: schedule.name)
            for first in range(0, len(schedules), MAX_FIRES_PER_TRANSACTION):
                fires = [(schedule, fire_time) for schedule in schedules[first : first + MAX_FIRES_PER_TRANSACTION]]
                retry_until = fire_time + max(max(schedule.misfire_grace_s for schedule, _ in fires), RECENT_S)
                created = self._retrying(lambda: self._claim(fires), _describe(fires), retry_until)
                if created:
                    self._send(created)

    def _record_missed(self, missed: dict[str, list[float]]) -> None:
        if not missed:
            return
        kept = [(name, fire_time) for name, fire_times in missed.items() for fire_time in fire_times[-MAX_MISSED_RECORDED:]]
        latest = max(fire_time for _, fire_time in kept)
        if self._retrying(lambda: self.ledger.record_missed(kept), f"{len(kept)} missed fire time(s)", latest + RECENT_S) is None:
            return
        for name, fire_times in missed.items():
            logger.warning(
                "Schedule {}: {} fire time(s) from {} to {} were missed{}.", name, len(fire_times),
                _iso(fire_times[0]), _iso(fire_times[-1]), f" (the ledger keeps the latest {MAX_MISSED_RECORDED})"
                if len(fire_times) > MAX_MISSED_RECORDED else "",
            )  # fmt: skip

    def _claim(self, fires: list[tuple[Schedule, float]]) -> list[Message]:
        """Claim `fires` and record the jobs of those won, in one transaction.

        Returns:
          the messages of the jobs created, to send once committed.

        Raises:
          SQLAlchemyError: the store failed; nothing was recorded.
        """
        with self.store.transaction() as connection:
            claims, messages = self._claims(connection, fires)
            won = self.ledger.claim_many(connection, claims)
            created = [(messages[key], *key) for key in sorted(won) if key in messages]
            record_jobs(self.broker, connection, created)
        for name, fire_time in sorted(won - set(messages)):
            logger.info("Schedule {}: fire time {} skipped, its previous job is unfinished.", name, _iso(fire_time))
        logger.debug("Fires {}: {} job(s) created, {} claimed elsewhere.", _describe(fires), len(created), len(fires) - len(won))
        return [message for message, _, _ in created]

    def _claims(
        self, connection: Connection, fires: list[tuple[Schedule, float]]
    ) -> tuple[list[Claim], dict[tuple[str, float], Message]]:
        """The ledger rows of `fires` (of one fire time), and the messages of those that are
        to create a job."""
        claims: list[Claim] = []
        messages: dict[tuple[str, float], Message] = {}
        for schedule, fire_time in fires:
            if not schedule.overlap and self.ledger.previous_job_unfinished(connection, schedule.name):
                claims.append(Claim(schedule.name, fire_time, FireOutcome.SKIPPED_OVERLAP))
                continue
            try:
                message = schedule_message(self.broker, schedule)
            except ActorNotFound:
                logger.error(
                    "Schedule {}: actor {!r} is not registered in this scheduler (ENGINE_ACTOR_MODULES?); fire time {} "
                    "is left to a scheduler that has it.", schedule.name, schedule.actor, _iso(fire_time),
                )  # fmt: skip
                continue
            claims.append(Claim(schedule.name, fire_time, FireOutcome.ENQUEUED, message.message_id))
            messages[schedule.name, fire_time] = message
        return claims, messages

    def _send(self, messages: list[Message]) -> None:
        """After the commit: the step a crash may interrupt (the workers' resend covers it)."""
        send_recorded(self.broker, messages)

    def _retrying(self, attempt: Callable[[], _T], what: str, until: float) -> Optional[_T]:
        """Run `attempt` until the store takes it; None once past `until` (epoch seconds), or
        stopped, with the failure logged."""
        while True:
            try:
                return attempt()
            except SQLAlchemyError as error:
                if time.time() > until or self._stopped.is_set():
                    logger.error("{} could not be recorded: {!r}", what, error)
                    return None
                logger.warning("The store failed ({!r}); trying {} again.", error, what)
                time.sleep(FIRE_RETRY_PAUSE_S)


def schedule_message(broker: Broker, schedule: Schedule) -> Message:
    """The message of one of the schedule's jobs. Raises: ActorNotFound."""
    actor = broker.get_actor(schedule.actor)
    options: dict[str, Any] = {}
    if schedule.priority is not None:
        options["broker_priority"] = schedule.priority
    return Message(
        queue_name=schedule.queue or actor.queue_name, actor_name=actor.actor_name,
        args=tuple(schedule.args), kwargs=dict(schedule.kwargs), options=options,
    )  # fmt: skip


def record_jobs(broker: Broker, connection: Connection, created: Iterable[tuple[Message, str, Optional[float]]]) -> None:
    """Record jobs in the current transaction (`connection`'s), each (message, schedule, fire
    time): their rows as Tracking writes them, with their schedule and fire time, in one
    statement; embedded, each with its message row (`SQLiteBroker.enqueue`), then tagged."""
    created = list(created)
    if isinstance(broker, SQLiteBroker):
        for message, _, _ in created:
            broker.enqueue(message)  # the message row joins this transaction
        Ledger.tag_jobs(connection, [(message.message_id, name, fire_time) for message, name, fire_time in created])
        return
    tracking = next(each for each in broker.middleware if isinstance(each, Tracking))
    records = [tracking.enqueue_record(message, None) for message, _, _ in created]
    for record, (_, name, fire_time) in zip(records, created):
        record.row.update(schedule=name, fire_time=fire_time)
    if records:
        tracking.store.dialect.record_enqueues(connection, records)


def send_recorded(broker: Broker, messages: list[Message]) -> None:
    """After the commit of `record_jobs`: wake the embedded broker's consumers, or hand the
    messages to RabbitMQ's sender thread. They go marked as a re-check (Tracking writes no row
    for one; the worker that takes it starts the job as it would any), since their rows are
    recorded. The sender tries RabbitMQ for ``ENGINE_SEND_BEHIND_TIMEOUT_S``, then fails the
    jobs it could not send, as it does any job sent from outside a worker."""
    if isinstance(broker, SQLiteBroker):
        broker.wake_consumers()
        return
    for message in messages:
        broker.enqueue(message.copy(options={**message.options, RECHECK_OPTION: True}))


def _fire_by_executor() -> None:
    """The function of every APScheduler job; `_FireExecutor` queues its fires in its place."""


class _FireExecutor(BaseExecutor):
    """APScheduler's executor, queueing each job's run times for the scheduler's claimer
    (APScheduler's own executors drop the run times). A fire is over, for APScheduler, once
    queued: no instances are counted, so none is refused."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__()
        self.scheduler = scheduler

    def submit_job(self, job: Any, run_times: list[datetime]) -> None:
        self._do_submit_job(job, run_times)

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        self.scheduler._queue_group(job.id, [run_time.timestamp() for run_time in run_times])


def _group(schedule: Schedule) -> str:
    """The id of the APScheduler job of the schedule: one per cron expression and zone."""
    return f"{schedule.timezone} {schedule.cron}"


def _describe(fires: list[tuple[Schedule, float]]) -> str:
    if len(fires) == 1:
        return f"schedule {fires[0][0].name} at {_iso(fires[0][1])}"
    times = [fire_time for _, fire_time in fires]
    return f"{len(fires)} fires from {_iso(min(times))} to {_iso(max(times))}"


def _latest_fire_times(trigger: Any, since: float, now: datetime) -> list[float]:
    """The trigger's fire times after `since` up to `now`, the latest `MAX_MISSED_RECORDED`
    + 1 at most (an outage of a year of a schedule firing every second is not walked whole)."""
    start = datetime.fromtimestamp(since, timezone.utc)
    while True:
        found = [each.timestamp() for each in fire_times(trigger, start, until=now, limit=MAX_MISSED_RECORDED + 2)]
        if len(found) <= MAX_MISSED_RECORDED + 1:
            return found
        start += (now - start) / 2  # too many: look at the later half only


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).isoformat(timespec="seconds")
