"""A background-job engine on Dramatiq: every job tracked, audited, retried and observable.

Declare jobs with `engine.actor`, send them with ``actor.send()`` or `engine.submit`, and read
them back with `engine.get`, `engine.result`, `engine.attempts` and `engine.jobs`; stop them
with `engine.cancel`.
"""

from .app import actor, get_broker, get_store
from .client import (
    CancelOutcome,
    CancelResult,
    Page,
    attempts,
    cancel,
    flush,
    get,
    jobs,
    queue_depths,
    result,
    retry,
    submit,
)
from .errors import (
    ArgumentsNotSerializable,
    BrokerUnavailable,
    ConfigError,
    DuplicateJob,
    EngineError,
    InvalidJobState,
    JobCanceled,
    JobNotFound,
    JobsNotSent,
    PermanentError,
    ResultNotReady,
    ResultNotSerializable,
    ResultTooLarge,
    TrackingError,
    UnknownActor,
)
from .job import Attempt, Job, JobState, Outcome
from .middleware.cancellation import cancel_requested
from .progress import progress

__all__ = [
    # Declaring and sending jobs
    "actor",
    "submit",
    "flush",
    "progress",
    "cancel_requested",
    "PermanentError",
    "JobCanceled",
    # Reading jobs back
    "get",
    "result",
    "attempts",
    "jobs",
    "retry",
    "cancel",
    "CancelResult",
    "CancelOutcome",
    "queue_depths",
    "Job",
    "Attempt",
    "JobState",
    "Outcome",
    "Page",
    # Plumbing
    "get_broker",
    "get_store",
    # Errors
    "EngineError",
    "ConfigError",
    "JobNotFound",
    "ResultNotReady",
    "UnknownActor",
    "ArgumentsNotSerializable",
    "ResultTooLarge",
    "ResultNotSerializable",
    "DuplicateJob",
    "InvalidJobState",
    "TrackingError",
    "BrokerUnavailable",
    "JobsNotSent",
]
