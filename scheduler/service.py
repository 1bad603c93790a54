"""The scheduler service: APScheduler's timing, the store's ledger, the engine's send path.

Each enabled schedule is a job of an APScheduler 3 `BackgroundScheduler` with its in-memory job
store and the schedule's `CronTrigger`. APScheduler only says when: its job does no work, it
hands the due fire times to `Scheduler.fire_due` (`_FireExecutor`). A fire then:

1. claims (schedule, fire time) in the ledger and records its job's row (Tracking, through the
   broker's ``before_enqueue``) with the schedule and fire time, in one transaction; a claim
   another scheduler made first makes this one a no-op (the ledger's unique key decides);
2. embedded, the message row is inserted in that same transaction (`SQLiteBroker.enqueue`);
   with RabbitMQ it is published after the commit. A scheduler that dies in between leaves a
   `queued` job without a message, which the workers' resend sends (`engine.middleware.resend`).

So any number of schedulers, on any hosts, create exactly one job per fire time, and no leader
is needed. Each polls the store's change counter every `poll_interval_s` and reloads what
changed; when it (re)loads a schedule it first settles the fire times that came due since the
ledger's latest (`_settle`), which is how an outage of every scheduler becomes misfires.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any, Optional

from apscheduler.executors.base import BaseExecutor
from apscheduler.jobstores.memory import MemoryJobStore
from apscheduler.schedulers.background import BackgroundScheduler
from dramatiq import Broker, Message
from dramatiq.errors import ActorNotFound, ConnectionClosed
from loguru import logger
from sqlalchemy import Connection
from sqlalchemy.exc import SQLAlchemyError

from engine.tracked_broker import sending_now
from engine.brokers.sqlite import SQLiteBroker
from engine.store import Store

from .definition import Misfire, Schedule, fire_times
from .ledger import MAX_MISSED_RECORDED, FireOutcome, Ledger, StoredSchedule

#: How often (seconds) a scheduler looks for schedule changes made elsewhere.
POLL_INTERVAL_S = 1.0

#: Fire times this recent (seconds, and within the schedule's grace) are fired when a scheduler
#: finds them due and unclaimed, each: a live scheduler may simply be a little late with them.
#: Older ones are coalesced into at most one job (see `plan_fires`), so no outage ends in a burst.
RECENT_S = 10.0

#: How many fires run at once in one scheduler (each is a store transaction and a publish).
FIRE_THREADS = 8

#: How long (seconds) a fire that failed on the store or the broker is retried, at most.
FIRE_RETRY_PAUSE_S = 1.0


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
        self._loaded: dict[str, StoredSchedule] = {}
        self._version: Optional[int] = None
        self._stopped = threading.Event()
        self._fires = ThreadPoolExecutor(FIRE_THREADS, thread_name_prefix="fire")
        self._timing = BackgroundScheduler(
            jobstores={"default": MemoryJobStore()},
            executors={"default": _FireExecutor(self)},
            # Lateness is judged by `plan_fires`, with the ledger: APScheduler passes every run time.
            job_defaults={"misfire_grace_time": None, "coalesce": False, "max_instances": FIRE_THREADS},
            timezone=timezone.utc,
        )
        self._poller: Optional[threading.Thread] = None

    def start(self) -> None:
        """Load the schedules, settle what came due while no scheduler ran, and start firing."""
        self._timing.start()
        self.sync()
        self._poller = threading.Thread(target=self._poll_until_stopped, name="schedule-changes", daemon=True)
        self._poller.start()
        logger.info("Scheduler started with {} schedule(s).", len(self._loaded))

    def stop(self) -> None:
        """Stop firing; fires under way are finished first."""
        self._stopped.set()
        if self._poller is not None:
            self._poller.join()
        self._timing.shutdown(wait=True)
        self._fires.shutdown(wait=True)

    # -- following the store -------------------------------------------------------------------

    def sync(self) -> bool:
        """Reload the schedules if the store's change counter moved; True if it did."""
        version = self.ledger.version()
        if version == self._version:
            return False
        stored = {each.schedule.name: each for each in self.ledger.list() if each.schedule.enabled}
        for name in set(self._loaded) - set(stored):
            self._timing.remove_job(name)
            del self._loaded[name]
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
        trigger = schedule.trigger()
        now = datetime.now(timezone.utc)
        since = max(last_fire or 0.0, stored.active_since)
        due = _latest_fire_times(trigger, since, now)
        upcoming = trigger.get_next_fire_time(now, now)
        if self._timing.get_job(schedule.name) is not None:
            self._timing.remove_job(schedule.name)
        self._loaded[schedule.name] = stored
        if due:
            self._fires.submit(self.fire_due, schedule.name, due)
        self._timing.add_job(_fire_by_executor, trigger, id=schedule.name, name=schedule.name, next_run_time=upcoming)

    def _poll_until_stopped(self) -> None:
        while not self._stopped.wait(self.poll_interval_s):
            try:
                self.sync()
            except SQLAlchemyError as error:
                logger.warning("Could not look for schedule changes ({!r}); trying again.", error)

    # -- firing --------------------------------------------------------------------------------

    def fire_due(self, name: str, due: list[float]) -> None:
        """Fire, or record as missed, the schedule's due fire times (epoch seconds, oldest first)."""
        stored = self._loaded.get(name)
        if stored is None:
            return  # paused or deleted since
        schedule = stored.schedule
        to_fire, missed = plan_fires(schedule, due, time.time())
        if missed:
            recorded = self._retrying(schedule, missed[-1], lambda: self.ledger.record_missed(name, missed[-MAX_MISSED_RECORDED:]))
            if recorded:
                logger.warning(
                    "Schedule {}: {} fire time(s) from {} to {} were missed{}.", name, len(missed),
                    _iso(missed[0]), _iso(missed[-1]), f" (the ledger keeps the latest {MAX_MISSED_RECORDED})"
                    if len(missed) > MAX_MISSED_RECORDED else "",
                )  # fmt: skip
        for fire_time in to_fire:
            self._retrying(schedule, fire_time, lambda: self.fire(schedule, fire_time))

    def fire(self, schedule: Schedule, fire_time: float) -> Optional[str]:
        """Create the job of one fire time, unless another scheduler did.

        Returns:
          str: the job's id; None when the fire time was claimed elsewhere, or skipped.

        Raises:
          SQLAlchemyError: the store failed; nothing was recorded.
        """
        try:
            message = schedule_message(self.broker, schedule)
        except ActorNotFound:
            logger.error(
                "Schedule {}: actor {!r} is not registered in this scheduler (ENGINE_ACTOR_MODULES?); fire time {} "
                "is left to a scheduler that has it.", schedule.name, schedule.actor, _iso(fire_time),
            )  # fmt: skip
            return None
        with self.store.transaction() as connection:
            if not schedule.overlap and self.ledger.previous_job_unfinished(connection, schedule.name):
                if self.ledger.claim(connection, schedule.name, fire_time, FireOutcome.SKIPPED_OVERLAP):
                    logger.info("Schedule {}: fire time {} skipped, its previous job is unfinished.", schedule.name, _iso(fire_time))
                return None
            if not self.ledger.claim(connection, schedule.name, fire_time, FireOutcome.ENQUEUED, message.message_id):
                return None
            record_job(self.broker, connection, message, schedule.name, fire_time)
        self._send(message)
        logger.debug("Schedule {}: job {} for {}.", schedule.name, message.message_id, _iso(fire_time))
        return message.message_id

    def _send(self, message: Message) -> None:
        """After the commit: the step a crash may interrupt (the workers' resend covers it)."""
        send_recorded(self.broker, message)

    def _retrying(self, schedule: Schedule, fire_time: float, attempt: Any) -> Any:
        """Run `attempt` until the store takes it, while the fire time is within its grace."""
        while True:
            try:
                return attempt()
            except SQLAlchemyError as error:
                if time.time() - fire_time > max(schedule.misfire_grace_s, RECENT_S) or self._stopped.is_set():
                    logger.error("Schedule {}: fire time {} could not be recorded: {!r}", schedule.name, _iso(fire_time), error)
                    return None
                logger.warning("Schedule {}: the store failed ({!r}); trying fire time {} again.", schedule.name, error, _iso(fire_time))
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


def record_job(broker: Broker, connection: Connection, message: Message, schedule: str, fire_time: Optional[float]) -> None:
    """Record the job of `message` in the current transaction (`connection`'s), as created by
    `schedule` for `fire_time`: its row through Tracking (the broker's ``before_enqueue``) and,
    embedded, its message row too."""
    if isinstance(broker, SQLiteBroker):
        broker.enqueue(message)  # the message row joins this transaction
    else:
        broker.emit_before("enqueue", message, None)  # Tracking records the job's row in it
    Ledger.tag_job(connection, message.message_id, schedule, fire_time)


def send_recorded(broker: Broker, message: Message) -> None:
    """After the commit of `record_job`: wake the embedded broker's consumers, or publish to
    RabbitMQ (Tracking finds the job's row recorded and leaves it). A publish RabbitMQ refuses
    leaves the job `queued`, for the workers' resend to send."""
    if isinstance(broker, SQLiteBroker):
        broker.wake_consumers()
        return
    try:
        with sending_now():
            broker.enqueue(message)
    except ConnectionClosed as error:
        logger.warning(
            "Job {} is recorded, but RabbitMQ did not take its message ({}); the workers' resend sends it.",
            message.message_id, error,
        )  # fmt: skip


def _fire_by_executor() -> None:
    """The function of every APScheduler job; `_FireExecutor` runs the fire in its place."""


class _FireExecutor(BaseExecutor):
    """APScheduler's executor, handing each job's run times to `Scheduler.fire_due` on the
    scheduler's fire threads (APScheduler's own executors drop the run times)."""

    def __init__(self, scheduler: Scheduler) -> None:
        super().__init__()
        self.scheduler = scheduler

    def _do_submit_job(self, job: Any, run_times: list[datetime]) -> None:
        due = [run_time.timestamp() for run_time in run_times]
        self.scheduler._fires.submit(self._run, job.id, due)

    def _run(self, job_id: str, due: list[float]) -> None:
        try:
            self.scheduler.fire_due(job_id, due)
        except Exception as error:
            logger.exception("Schedule {}: fire failed: {!r}", job_id, error)
        finally:
            self._run_job_success(job_id, [])


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
