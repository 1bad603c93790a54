"""A background-job engine on Dramatiq: every job tracked, audited, retried and observable.

Declare jobs with `engine.actor`, send them with ``actor.send()`` or `engine.submit`, and read
them back with `engine.get`, `engine.result`, `engine.attempts` and `engine.jobs`.
"""

from .broker import actor, get_broker, get_store
from .client import Page, attempts, get, jobs, result, retry, submit
from .errors import (
    ArgumentsNotSerializable,
    ConfigError,
    DuplicateJob,
    EngineError,
    InvalidJobState,
    JobNotFound,
    PermanentError,
    ResultNotReady,
    ResultNotSerializable,
    ResultTooLarge,
    TrackingError,
    UnknownActor,
)
from .job import Attempt, Job, JobState, Outcome
from .progress import progress

__all__ = [
    # Declaring and sending jobs
    "actor",
    "submit",
    "progress",
    "PermanentError",
    # Reading jobs back
    "get",
    "result",
    "attempts",
    "jobs",
    "retry",
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
]
