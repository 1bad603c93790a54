"""Errors the engine raises to its users.

Every error here carries a message that says what went wrong and what to do about it, so that
the CLI and the HTTP API can show it as it is, without a stack trace.
"""

from __future__ import annotations

from dramatiq.errors import ConnectionClosed
from dramatiq.middleware import Interrupt, MiddlewareError
from sqlalchemy.exc import OperationalError


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


def shown_message(error: Exception) -> str:
    """What a command shows of an error that stops it (before masking it): the whole message of
    an `EngineError`, the first line of a database's `OperationalError` (the others are the
    failed statement and a link to SQLAlchemy's documentation)."""
    return str(error).splitlines()[0] if isinstance(error, OperationalError) else str(error)


class JobCanceled(Interrupt):
    """Raised inside a running job whose cancel was requested, to stop it there.

    It is a Dramatiq `Interrupt` (a BaseException, like TimeLimitExceeded), so that an actor's
    ``except Exception`` does not swallow it. An actor may catch it to clean up, and should then
    raise it again; the attempt is recorded as `canceled`, the job is `canceled` and never retried.
    """

    def __init__(self, message: str = "the job was canceled") -> None:
        super().__init__(message)


class ConfigError(EngineError):
    """A setting is missing or malformed; the message names the variable."""


class PermanentError(Exception):
    """Raise inside an actor to fail the job at once, with no retry.

    Use it for input that can never succeed (a malformed file, an image that is not an image),
    so that the job does not wait out its backoff schedule only to fail the same way again.
    """


class JobNotFound(EngineError, LookupError):
    """No job has this id; raised instead of reporting a typo as "pending" forever."""

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r}")
        self.job_id = job_id


class ResultNotReady(EngineError):
    """The job has no result yet (or never will: it failed or was canceled)."""

    def __init__(self, job_id: str, state: str) -> None:
        super().__init__(f"job {job_id} has no result: it is {state}")
        self.job_id = job_id
        self.state = state


class UnknownActor(EngineError):
    """No actor of this name is registered with the broker."""

    def __init__(self, actor_name: str, known: list[str]) -> None:
        super().__init__(f"unknown actor {actor_name!r}; known actors: {', '.join(sorted(known)) or 'none'}")
        self.actor_name = actor_name


class InvalidArguments(EngineError, MiddlewareError):
    """A job's arguments do not fit its actor's signature: one missing or unexpected, or a
    value that contradicts a type hint. Nothing was enqueued.

    It is a MiddlewareError so that Dramatiq lets it abort `broker.enqueue`.

    Attributes:
      actor_name(str): the actor.
      problems(list[tuple[str, str]]): (where, what) for each argument at fault; where is
        ``args.<index>`` or ``kwargs.<name>`` as the caller passed it, or the parameter's name.
    """

    def __init__(self, actor_name: str, problems: list[tuple[str, str]]) -> None:
        listed = "; ".join(f"{where}: {what}" for where, what in problems)
        super().__init__(f"arguments do not fit actor {actor_name!r}, nothing was enqueued: {listed}")
        self.actor_name = actor_name
        self.problems = problems


class ResultTooLarge(EngineError):
    """An actor returned a result bigger than ENGINE_RESULT_MAX_BYTES; the job fails with it."""


class ResultNotSerializable(EngineError):
    """An actor returned a value that JSON cannot represent; the job fails with it."""


class InvalidJobState(EngineError):
    """The job is not in a state that allows the requested operation (e.g. retry a running job)."""


class TrackingError(EngineError, MiddlewareError):
    """The store refused to record an enqueue, so the message was not sent.

    It is a MiddlewareError so that Dramatiq lets it abort `broker.enqueue` instead of logging it
    and publishing an untracked message.
    """


class ArgumentsNotSerializable(TrackingError):
    """The job's arguments cannot be encoded as JSON; nothing was enqueued."""


class DuplicateJob(TrackingError):
    """A job with this idempotency key exists already; nothing was enqueued."""

    def __init__(self, idempotency_key: str) -> None:
        super().__init__(f"a job with idempotency key {idempotency_key!r} exists already")
        self.idempotency_key = idempotency_key


class BrokerUnavailable(EngineError, ConnectionClosed):
    """RabbitMQ did not take a new job's message, so the job was not recorded either.

    Nothing was enqueued: sending again later is safe. It is also a Dramatiq `ConnectionClosed`,
    which is what code written for Dramatiq's RabbitMQ broker catches.

    Attributes:
      address(str): where RabbitMQ was expected (``host:port/vhost``, without credentials).
      job_id(str): the id the job would have had.
    """

    def __init__(self, address: str, job_id: str, reason: str) -> None:
        super().__init__(
            f"RabbitMQ at {address} is unavailable, so nothing was enqueued (job {job_id} was not created): {reason}"
        )
        self.address = address
        self.job_id = job_id


class JobsNotSent(EngineError, ConnectionClosed):
    """Jobs sent without waiting (``actor.send()`` outside a worker) that RabbitMQ never took,
    however long it was tried: `engine.flush` raises it.

    They are not lost: each is `failed`, the reason its last error, and ``engine retry`` sends
    it again.

    Attributes:
      address(str): where RabbitMQ was expected (``host:port/vhost``, without credentials).
      job_ids(list[str]): the jobs.
    """

    def __init__(self, address: str, job_ids: list[str], reason: str) -> None:
        shown = ", ".join(job_ids[:5]) + (f" and {len(job_ids) - 5} more" if len(job_ids) > 5 else "")
        super().__init__(
            f"RabbitMQ at {address} did not take {len(job_ids)} job(s) ({shown}): {reason}; "
            "they are failed, and `engine retry` sends them again"
        )
        self.address = address
        self.job_ids = job_ids
