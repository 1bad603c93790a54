"""The process's broker and store, built once from settings, with the engine's middleware.

`get_broker()` builds it once per process and makes it Dramatiq's global broker, so actors
declared with `engine.actor` (or plain ``dramatiq.actor`` after it) and ``dramatiq
engine.actors`` all use it. RabbitMQ when ``ENGINE_BROKER_URL`` is set; otherwise the embedded
SQLite broker in the store's file.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import dramatiq
from dramatiq import Broker
from dramatiq.middleware import (
    AgeLimit,
    Callbacks,
    CurrentMessage,
    Middleware,
    Pipelines,
    ShutdownNotifications,
    TimeLimit,
)

from .brokers import RabbitmqBroker, SQLiteBroker
from .errors import ConfigError
from .middleware import Heartbeat, Retries, Tracking
from .middleware.arguments import Arguments
from .middleware.cancellation import Cancellation
from .middleware.resend import Resend
from .middleware.scheduling import BatchScheduling
from .settings import Settings, get_settings
from .store import Store
from .tracked_broker import TrackedBroker

#: RabbitMQ queues are declared with this x-max-priority; `priority` on submit ranges 0..10.
MAX_PRIORITY = 10

_broker: Optional[Broker] = None
_store: Optional[Store] = None


def build_middleware(settings: Settings, store: Store) -> list[Middleware]:
    """The middleware stack, in order.

    CurrentMessage comes first so that log lines in every other hook carry the job's id.
    Cancellation registers a job before Tracking starts it (see `Cancellation`). Tracking
    comes before Retries so that its after-hooks run after Retries has decided.
    """
    heartbeat = Heartbeat(store, interval_s=settings.heartbeat_interval_s)
    tracking = Tracking(
        store,
        heartbeat=heartbeat,
        dead_after_s=settings.worker_dead_after_s,
        result_max_bytes=settings.result_max_bytes,
        traceback_max_bytes=settings.traceback_max_bytes,
        progress_interval_s=settings.progress_interval_s,
    )
    # Jobs whose sender died before sending them are looked for once a live sender would have
    # given up on them (and failed them) twice over.
    resend = Resend(store, older_than_s=2 * settings.send_behind_timeout_s, interval_s=settings.send_behind_timeout_s)
    return [
        CurrentMessage(),
        Arguments(),  # before anything records the job: a send that does not fit is refused whole
        heartbeat,
        resend,
        Cancellation(store, broker_url=settings.broker_url, check_interval_s=settings.cancel_check_interval_s),
        tracking,
        AgeLimit(),
        TimeLimit(time_limit=settings.time_limit_ms),
        ShutdownNotifications(),
        Callbacks(),
        Pipelines(),
        Retries(
            max_retries=settings.max_retries,
            min_backoff=settings.min_backoff_ms,
            max_backoff=settings.max_backoff_ms,
        ),
        *([BatchScheduling()] if settings.sched_batch else []),
    ]


def build_broker(settings: Settings) -> Broker:
    """A new broker for `settings`, its store created or migrated."""
    if settings.embedded and not settings.store_url.startswith("sqlite"):
        raise ConfigError(
            "ENGINE_BROKER_URL: the embedded broker lives in a SQLite store; "
            "set an amqp:// URL to use a PostgreSQL store"
        )
    store = Store(settings.store_url)
    store.upgrade()
    middleware = build_middleware(settings, store)
    if settings.embedded:
        return SQLiteBroker(store, middleware=middleware)
    return RabbitmqBroker(
        url=settings.broker_url,
        store=store,
        middleware=middleware,
        confirm_delivery=True,
        # RabbitMQ 3.10 quorum queues have no priorities.
        max_priority=None if settings.rabbitmq_quorum_queues else MAX_PRIORITY,
        quorum_queues=settings.rabbitmq_quorum_queues,
        delay_hold_ms=settings.delay_hold_ms,
        pool_size=settings.broker_pool_size,
        send_behind_timeout_s=settings.send_behind_timeout_s,
    )


def use(broker: Broker, store: Optional[Store] = None) -> Broker:
    """Make `broker` the engine's and Dramatiq's global broker.

    Parameters:
      store(Store): where its jobs are tracked; by default the store the broker was handed
        (`TrackedBroker.store`). Tests pass the one of a StubBroker's Tracking.
    """
    global _broker, _store
    if store is None and isinstance(broker, TrackedBroker):
        store = broker.store
    _broker, _store = broker, store
    dramatiq.set_broker(broker)
    return broker


def get_broker() -> Broker:
    """The process's broker, built from settings on first use."""
    return _broker if _broker is not None else use(build_broker(get_settings()))


def get_store() -> Store:
    """The store the process's broker tracks jobs in.

    Raises:
      RuntimeError: the broker was made the engine's without a store.
    """
    get_broker()
    if _store is None:
        raise RuntimeError("the engine's broker has no store: build it with build_broker, or pass one to use()")
    return _store


def actor(fn: Optional[Callable[..., Any]] = None, **options: Any) -> Any:
    """Declare an actor on the engine's broker; same options as ``dramatiq.actor``.

    Options are checked when the actor is declared, so a misspelt option fails at import.
    """
    return dramatiq.actor(fn, broker=get_broker(), **options)
