"""Cancellation: a running job stops within a second of `engine.cancel`, wherever it runs.

The path of a cancel request:

- `engine.cancel` records it in the store (`Store.request_cancel`): a `scheduled` or `queued`
  job is canceled there and then, and Tracking's start skips its message later; a `running` job
  keeps the request in ``jobs.cancel_requested_at``, durably.
- The request is then pushed to every worker process (`Cancellation.broadcast`): through the
  RabbitMQ fanout exchange `EXCHANGE` when RabbitMQ is the broker, through a Unix datagram
  socket per worker process in ``<database>.cancel/`` on the embedded broker. Each worker
  process listens on a thread of its own.
- The process running the job interrupts the thread running it, as Dramatiq's TimeLimit does:
  `JobCanceled` is raised in that thread asynchronously. Code in Python stops at once; code
  blocked in C or in a system call (a socket read, ``time.sleep``) stops as soon as it returns
  to Python. `engine.cancel_requested` lets an actor check at points of its choosing.
- A process that missed the push (cut off from RabbitMQ, say) finds the request in the store:
  every `check_interval_s` seconds it asks about the jobs it runs, in one query (none when idle).

The interrupt is raised only while the thread runs the job's own code: each actor's function
is wrapped when it is declared, and arming the thread on entry, raising into it and disarming it
on exit all take one lock. An interrupt raised but not yet delivered when the code returns is
withdrawn. So `JobCanceled` surfaces from the actor call or not at all: never in another
middleware's hook, in Dramatiq's own handling of the job's end, nor in the thread's next job.
"""

from __future__ import annotations

import ctypes
import functools
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable, Optional

from dramatiq import Actor, Broker, Middleware, Worker
from dramatiq.broker import MessageProxy
from dramatiq.middleware import raise_thread_exception
from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from ..errors import JobCanceled
from ..notifiers import Fanout, SocketDirectory, sidecar_directory
from ..store import Store
from .tracking import current_attempt

#: The RabbitMQ fanout exchange cancel requests are published to; every worker process binds
#: an exclusive queue of its own to it.
EXCHANGE = "engine.cancel"



@dataclass
class _RunningJob:
    """A job a worker thread of this process runs.

    Attributes:
      job_id(str): the job.
      armed(bool): the thread is in the job's own code, where it may be interrupted.
      requested(bool): a cancel of it was requested.
      interrupted_at(float): when `JobCanceled` was last raised in its thread (monotonic).
    """

    job_id: str
    armed: bool = False
    requested: bool = False
    interrupted_at: Optional[float] = None


#: The job the current worker thread runs, or None outside a job.
_current: ContextVar[Optional[_RunningJob]] = ContextVar("current_cancelable_job", default=None)


def cancel_requested() -> bool:
    """A checkpoint for cooperative code: stop here if the running job's cancel was requested.

    A running job is interrupted anyway, wherever its code is, when its cancel is requested;
    this is for code that wants to stop at a point of its choosing too, or that must not lose
    a cancel by catching `JobCanceled` (a bare ``except:``). Clean up in ``finally`` or in
    ``except engine.JobCanceled`` (and raise it again).

    Outside a job (an actor called as a plain function, in a test say) it returns False.

    Returns:
      bool: False: no cancel was requested.

    Raises:
      JobCanceled: a cancel was requested; let it propagate, and the attempt is recorded as
        `canceled`.
    """
    running = _current.get()
    if running is not None and running.requested:
        raise JobCanceled()
    return False


class Cancellation(Middleware):
    """Interrupts running jobs whose cancel was requested, on whichever worker runs them.

    It comes before Tracking (in `engine.app.build_middleware`): a job is registered here
    before Tracking's start makes it `running`, so that no request is pushed while the job is
    `running` but unknown to its process; a request committed before the start is read by the
    start itself (`AttemptStart.cancel_requested`). Each actor's function is wrapped
    when the actor is declared, so that its thread is interrupted only while it runs the job's
    own code.

    Parameters:
      store(Store): where cancel requests are recorded (``jobs.cancel_requested_at``).
      broker_url(str): the amqp:// URL of RabbitMQ, whose fanout exchange `EXCHANGE` carries
        requests to workers; None on the embedded broker, where they go through Unix sockets
        in ``<database>.cancel/``.
      check_interval_s(float): how often, in seconds, a worker looks in the store for requests
        on the jobs it runs, in case it missed their push. A thread whose job does not stop is
        interrupted again this often.
    """

    def __init__(self, store: Store, *, broker_url: Optional[str] = None, check_interval_s: float = 1.0) -> None:
        self.store = store
        self.check_interval_s = check_interval_s
        self.notifier = _notifier_for(store, broker_url)
        self._running: dict[int, _RunningJob] = {}  # by the id of the thread running it
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._store_checks: Optional[threading.Thread] = None

    # -- the requesting side ---------------------------------------------------------------------

    def broadcast(self, job_id: str) -> None:
        """Tell every worker process that the job's cancel was requested.

        Call it after the request is committed to the store. If the push fails, the workers
        still find the request in the store within `check_interval_s` seconds.
        """
        if self.notifier is None:
            return
        try:
            unreached = self.notifier.broadcast(job_id.encode())
        except OSError as error:
            logger.warning(
                "Could not push the cancel of job {} to the workers ({!r}); they will find it in the store within {} s.",
                job_id,
                error,
                self.check_interval_s,
            )
            return
        for listener in unreached:
            logger.warning("The cancel socket {} is full; its worker will find job {} in the store.", listener, job_id)

    # -- the worker side -------------------------------------------------------------------------

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self._stopping.clear()
        if self.notifier is not None:
            try:
                self.notifier.listen(self._on_request, thread_name="cancel-listener")
            except OSError as error:
                logger.warning("Cannot listen for cancel requests ({!r}); polling the store only.", error)
        self._store_checks = threading.Thread(target=self._check_store, name="cancel-checks", daemon=True)
        self._store_checks.start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        # After, not before: jobs still running while the worker drains can still be canceled.
        self._stopping.set()
        if self.notifier is not None:
            self.notifier.close()
        if self._store_checks is not None:
            self._store_checks.join()
            self._store_checks = None

    def after_declare_actor(self, broker: Broker, actor: Actor) -> None:
        actor.fn = self._interruptible(actor.fn)

    def before_process_message(self, broker: Broker, message: MessageProxy) -> None:
        # Registered before Tracking starts the job, so that a request committed after the
        # start finds it here when it is pushed; one committed before, Tracking's start reads.
        running = _RunningJob(message.message_id)
        with self._lock:
            self._running[threading.get_ident()] = running
        _current.set(running)

    def after_process_message(
        self, broker: Broker, message: MessageProxy, *, result: object = None, exception: Optional[BaseException] = None
    ) -> None:
        _current.set(None)
        with self._lock:
            self._running.pop(threading.get_ident(), None)

    after_skip_message = after_process_message

    def interrupt(self, job_id: str) -> bool:
        """Raise `JobCanceled` in the thread of this process that runs the job, if one does.

        Called with each pushed request and each one found in the store. A thread is
        interrupted at most once per `check_interval_s`, so that a job's cleanup code has that
        long to run; one whose job goes on running (it swallowed the exception) is interrupted
        again.

        Returns:
          bool: True if the job runs in this process.
        """
        now = time.monotonic()
        interrupted: list[int] = []
        found = False
        with self._lock:
            for thread_id, running in self._running.items():
                if running.job_id != job_id:
                    continue
                found = running.requested = True
                if not running.armed:
                    continue  # not in the job's code (yet): entering it raises JobCanceled
                if running.interrupted_at is None or now - running.interrupted_at >= self.check_interval_s:
                    running.interrupted_at = now
                    raise_thread_exception(thread_id, JobCanceled)
                    interrupted.append(thread_id)
        for thread_id in interrupted:
            logger.info("Canceling job {}: interrupting worker thread {}.", job_id, thread_id)
        return found

    def _on_request(self, message: bytes) -> None:
        self.interrupt(message.decode())

    def _interruptible(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        """Wrap an actor's function: its thread may be interrupted while it runs, and only then."""

        @functools.wraps(fn)
        def interruptible(*args: Any, **kwargs: Any) -> Any:
            thread_id = threading.get_ident()
            armed = self._arm(thread_id)
            try:
                return fn(*args, **kwargs)
            finally:
                if armed:
                    self._disarm(thread_id)

        return interruptible

    def _arm(self, thread_id: int) -> bool:
        """The thread enters its job's code. False when it runs no job (a plain function call)
        or is in the job's code already (an actor calling another as a function).

        Raises:
          JobCanceled: the job's cancel came in since its start.
        """
        with self._lock:
            running = self._running.get(thread_id)
            if running is None or running.armed:
                return False
            attempt = current_attempt.get()
            running.requested |= attempt is not None and attempt.cancel_requested
            if not running.requested:
                running.armed = True
                return True
        logger.info("Job {} was canceled before its code started.", running.job_id)
        raise JobCanceled()

    def _disarm(self, thread_id: int) -> None:
        """The thread leaves its job's code: no interrupt is raised in it any more, and one raised
        but not delivered yet is withdrawn."""
        with self._lock:
            running = self._running.get(thread_id)
            if running is not None and running.armed:
                running.armed = False
                if running.interrupted_at is not None:
                    _withdraw_thread_exception(thread_id)

    def _check_store(self) -> None:
        """Every `check_interval_s`, interrupt the jobs of this process whose cancel is in the store."""
        while not self._stopping.wait(self.check_interval_s):
            with self._lock:
                job_ids = [running.job_id for running in self._running.values()]
            if not job_ids:
                continue
            try:
                requested = self.store.cancel_requests(job_ids)
            except SQLAlchemyError as error:
                logger.warning("Could not look for cancel requests in the store: {!r}", error)
                continue
            for job_id in requested:
                self.interrupt(job_id)


def _withdraw_thread_exception(thread_id: int) -> None:
    """Clear an exception set by `raise_thread_exception` that the thread has not raised yet."""
    ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread_id), None)


def _notifier_for(store: Store, broker_url: Optional[str]) -> Optional[SocketDirectory | Fanout]:
    """How requests reach the worker processes: the fanout exchange with RabbitMQ, the sockets
    beside the database on one machine, or nothing (then the workers poll the store only)."""
    if broker_url:
        return Fanout(broker_url, EXCHANGE, name="cancel")
    directory = sidecar_directory(store, "cancel")
    return SocketDirectory(directory) if directory is not None else None
