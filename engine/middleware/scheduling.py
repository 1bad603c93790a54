"""BatchScheduling: a worker process's threads run under Linux's ``SCHED_BATCH`` policy.

Under the GIL, a thread woken while another runs Python can do nothing until that one lets go
of it. The kernel's default policy lets a woken thread preempt the running one on its CPU (a
worker process has one when pinned: ``ENGINE_PIN_CPUS``), so each wake-up of a job's path (the
writer settling the starts of a batch, the consumer handing a message to a worker thread) cost
two context switches: to the woken thread, which finds the GIL held, and back. ``SCHED_BATCH``
tells the kernel that the threads are throughput work: a woken thread waits until the running
one blocks (on the database, the socket), and then finds the GIL free. Priorities (nice) are
left alone, and the threads still get their fair share of the CPU.
"""

from __future__ import annotations

import os

from dramatiq import Broker, Middleware, Worker
from loguru import logger


class BatchScheduling(Middleware):
    """Puts the thread that boots the worker under ``SCHED_BATCH`` before the worker starts
    its threads: each inherits it (consumers, worker threads, and the threads they start, such
    as the store's writer). Nothing changes where the policy is unknown (not Linux) or denied."""

    def before_worker_boot(self, broker: Broker, worker: Worker) -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, os.sched_param(0))
        except (AttributeError, OSError) as error:
            logger.info("The worker's threads keep the default scheduling policy ({}).", error)
