"""The metrics of one engine process: jobs it sent, attempts it ran, by outcome, their durations
and queue waits, and the attempts running now.

Tracking (`engine.middleware.tracking`) calls one function of this module at each point where
it has decided something, with what it decided: the outcome is Tracking's, never worked out
here again. Attempts are counted once their end is committed, so that an attempt whose worker
dies before its end is recorded is counted once, as `abandoned`, by the start that takes its job
over (as the store records it).

Under a supervisor that serves metrics (``ENGINE_METRICS_PORT``), each process keeps these in
files of PROMETHEUS_MULTIPROC_DIR, which the supervisor sums (`engine.metrics.host`); without
it, in the process's default registry.
"""

from __future__ import annotations

import functools
import time
from typing import Any, NamedTuple, Optional

from dramatiq import Message
from dramatiq.common import q_name
from prometheus_client import Counter, Gauge, Histogram

from ..job import Outcome
from ..writer import Pending

#: The message option holding when the job falls due (epoch milliseconds): set when it is sent,
#: moved by each delay. Dramatiq's own ``eta`` is dropped when a delayed message falls due.
DUE_OPTION = "engine_due_ms"

#: Upper bounds of the duration and queue wait buckets, in seconds: jobs take from milliseconds
#: to many minutes (the default time limit is 10 min), and may wait as long in a busy queue.
BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

_LABELS = ("actor", "queue")

JOBS_ENQUEUED = Counter(
    "engine_jobs_enqueued", "Jobs sent by this process, new or requeued by hand: not retries nor delays falling due.", _LABELS
)
ATTEMPTS = Counter("engine_attempts", "Attempts that ended, by outcome.", (*_LABELS, "outcome"))
ATTEMPT_DURATION = Histogram(
    "engine_attempt_duration_seconds", "How long attempts ran, from their start to their end.", _LABELS, buckets=BUCKETS_S
)
QUEUE_WAIT = Histogram(
    "engine_queue_wait_seconds",
    "From a job's enqueue, or its due time when delayed or retried, to its attempt's start.",
    _LABELS,
    buckets=BUCKETS_S,
)
IN_PROGRESS = Gauge("engine_attempts_in_progress", "Attempts running now.", _LABELS, multiprocess_mode="livesum")


def mark_due(message: Message, delay: Optional[int]) -> bool:
    """Note in `message` when it falls due: now, or after `delay` milliseconds.

    Returns:
      bool: whether this is the job's first send (its message had no due time yet): a new job,
      or one requeued from the store; not a retry, nor a delayed message falling due.
    """
    first = DUE_OPTION not in message.options
    message.options[DUE_OPTION] = int(time.time() * 1000) + (delay or 0)
    return first


def job_enqueued(message: Message, recorded: Optional[Pending[None]] = None) -> None:
    """Count a job sent, now or once its row is committed (`recorded`, if it has not failed)."""
    enqueued = _of(message).enqueued
    if recorded is None:
        enqueued.inc()
        return

    def count(done: Pending[None]) -> None:
        if done.exception() is None:
            enqueued.inc()

    recorded.add_done_callback(count)


def attempt_started(message: Message, started_at: float) -> None:
    """An attempt of `message`'s job started at `started_at` (epoch seconds, as committed)."""
    metrics = _of(message)
    metrics.in_progress.inc()
    due_ms = message.options.get(DUE_OPTION, message.message_timestamp)
    # Clocks of different hosts may disagree by a little: never a negative wait.
    metrics.queue_wait.observe(max(0.0, started_at - due_ms / 1000))


def attempt_ended(message: Message, outcome: Outcome, started_at: float, recorded: Pending[None]) -> None:
    """An attempt started at `started_at` ended with `outcome`; counted once `recorded` is committed."""
    metrics = _of(message)
    metrics.in_progress.dec()
    duration_s = max(0.0, time.time() - started_at)

    def count(done: Pending[None]) -> None:
        if done.exception() is None:
            metrics.attempts[outcome].inc()
            metrics.duration.observe(duration_s)

    recorded.add_done_callback(count)


def attempt_abandoned(message: Message) -> None:
    """The start of `message`'s job closed its previous attempt as abandoned (its worker died)."""
    _of(message).attempts[Outcome.ABANDONED].inc()


class _ActorMetrics(NamedTuple):
    """The metrics of one actor and queue, looked up once: a job makes a few calls to each."""

    enqueued: Any
    attempts: dict[Outcome, Any]
    duration: Any
    queue_wait: Any
    in_progress: Any


def _of(message: Message) -> _ActorMetrics:
    return _actor_metrics(message.actor_name, message.queue_name)


@functools.cache  # actors and queues are few
def _actor_metrics(actor: str, queue_name: str) -> _ActorMetrics:
    queue = q_name(queue_name)  # a delayed message's queue is the delay queue
    return _ActorMetrics(
        enqueued=JOBS_ENQUEUED.labels(actor, queue),
        attempts={outcome: ATTEMPTS.labels(actor, queue, outcome.value) for outcome in Outcome},
        duration=ATTEMPT_DURATION.labels(actor, queue),
        queue_wait=QUEUE_WAIT.labels(actor, queue),
        in_progress=IN_PROGRESS.labels(actor, queue),
    )
