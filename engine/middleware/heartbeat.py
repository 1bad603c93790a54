"""Heartbeat: each worker process says, every few seconds, that it still lives.

The store keeps one row per worker process. An attempt records the worker running it, so a job
found `running` by a second delivery (RabbitMQ redelivers a message when a connection drops or
a consumer times out; the embedded broker when a lease runs out) is told apart: under a live
worker it is left alone, under a dead one it runs again. Liveness, not a fixed timeout, is
what keeps a slow job from running twice and a dead worker's job from being lost.
"""

from __future__ import annotations

import os
import socket
import threading
from typing import Optional
from uuid import uuid4

from dramatiq import Broker, Middleware, Worker
from loguru import logger
from sqlalchemy.exc import SQLAlchemyError

from ..store import Store


class Heartbeat(Middleware):
    """Registers this worker process in the store and keeps its heartbeat fresh.

    Parameters:
      store(Store): where the heartbeat is written.
      interval_s(float): seconds between heartbeats; well below the time after which a silent
        worker counts as dead (``ENGINE_WORKER_DEAD_AFTER_S``).
    """

    def __init__(self, store: Store, *, interval_s: float) -> None:
        self.store = store
        self.interval_s = interval_s
        self.host = socket.gethostname()
        #: This process's identity in the store once it runs as a worker; None before.
        self.worker_id: Optional[str] = None
        self._stopped = threading.Event()

    def after_worker_boot(self, broker: Broker, worker: Worker) -> None:
        self.worker_id = uuid4().hex
        self._beat()
        threading.Thread(target=self._beat_until_stopped, name="heartbeat", daemon=True).start()

    def after_worker_shutdown(self, broker: Broker, worker: Worker) -> None:
        self._stopped.set()
        if self.worker_id is not None:
            self.store.mark_workers_stopped(worker_id=self.worker_id)

    def _beat_until_stopped(self) -> None:
        while not self._stopped.wait(self.interval_s):
            self._beat()

    def _beat(self) -> None:
        try:
            self.store.heartbeat(self.worker_id, host=self.host, pid=os.getpid())  # type: ignore[arg-type]
        except SQLAlchemyError as error:
            # Others may take this worker's jobs for abandoned if this lasts: say so loudly.
            logger.warning("Heartbeat of worker {} failed: {}", self.worker_id, error)
