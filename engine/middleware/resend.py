"""Resend: jobs whose sending process died before their message went out are sent again.

Outside a worker, ``actor.send()`` on RabbitMQ returns once the job is handed to a sender
thread, which commits the job's row, then publishes its message (see `engine.flush`). A
process killed in between (SIGKILL, the OOM killer, a crash) leaves its job `queued`, or
`scheduled`, for a message that does not exist. The worker processes look for such jobs every
`interval_s` seconds and send them again:

- a `queued` job untouched for `older_than_s`, in a queue RabbitMQ shows empty: had its message
  been sent, it would wait there (or its job would have started);
- a `scheduled` job due `older_than_s` ago: a delayed message moves its job to `queued` when it
  falls due.

`older_than_s` is well past the time a live sender keeps trying (``ENGINE_SEND_BEHIND_TIMEOUT_S``,
after which it fails the job itself). One of them looks at a time (the store's lock
`RESEND_LOCK`: a look may read every queued job, which N processes need not each do), and a job found is claimed in the store.
Should its message exist after all (delivered to a worker that has not started it yet), the job
still runs once: Tracking skips the second delivery.
"""

from __future__ import annotations

import threading

from dramatiq import Broker, Middleware, Worker
from dramatiq.errors import ConnectionClosed
from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from ..errors import EngineError
from ..store import Store
from ..tracked_broker import TrackedBroker, sending_now

#: The name of the store's lock that the worker process that looks holds (see `Store.hold_lock`).
RESEND_LOCK = "engine.resend"


class Resend(Middleware):
    """Sends again, from each worker process, the jobs whose message was never sent.

    Parameters:
      store(Store): where the jobs are found and claimed.
      older_than_s(float): how long a job must have been waiting, untouched.
      interval_s(float): seconds between two looks.
    """

    def __init__(self, store: Store, *, older_than_s: float, interval_s: float) -> None:
        self.store = store
        self.older_than_s = older_than_s
        self.interval_s = interval_s
        self._stopped = threading.Event()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        # A broker that commits a job's row and its message together (the embedded one) never
        # leaves a job without a message.
        if isinstance(broker, TrackedBroker) and broker.sends_behind:
            self._stopped.clear()
            threading.Thread(target=self._resend_until_stopped, args=(broker,), name="resend", daemon=True).start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stopped.set()

    def _resend_until_stopped(self, broker: TrackedBroker) -> None:
        while not self._stopped.wait(self.interval_s):
            self.resend(broker)

    def resend(self, broker: TrackedBroker) -> int:
        """Look once; returns how many jobs were sent again."""
        try:
            if not self.store.hold_lock(RESEND_LOCK):
                return 0
            drained = [queue for queue, depth in broker.queue_depths().items() if depth["ready"] == 0]
            claimed = self.store.claim_unsent(drained, older_than_s=self.older_than_s)
        except (ConnectionClosed, SQLAlchemyError) as error:
            logger.warning("Could not look for jobs whose message was never sent: {!r}", error)
            return 0
        sent = 0
        for job, options in claimed:
            logger.warning(
                "Job {} ({}) is {} and no message of it waits in RabbitMQ: its sender most likely died "
                "before sending it. Sending it again (should the first come after all, it is skipped).",
                job.id, job.actor, job.state,
            )
            try:
                with sending_now():
                    broker.enqueue(job.message(options))
            except (EngineError, ConnectionClosed, SQLAlchemyError) as error:
                logger.warning("Could not send job {} again ({!r}); trying again in {:.0f} s.", job.id, error, self.older_than_s)
            else:
                sent += 1
        return sent
