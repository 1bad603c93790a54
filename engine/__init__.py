"""A background-job engine on Dramatiq: every job tracked, audited, retried and observable.

Declare jobs with `engine.actor`, send them with ``actor.send()`` or `engine.submit`, and read
them back with `engine.get`, `engine.result`, `engine.attempts` and `engine.jobs`; stop them
with `engine.cancel`. Cron schedules are defined with `engine.set_schedule` and read back with
`engine.list_schedules`, `engine.get_schedule` and `engine.schedule_fires`.
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
    InvalidArguments,
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
from .schedules import (
    Fire,
    FireOutcome,
    InvalidSchedule,
    Misfire,
    Schedule,
    ScheduleInfo,
    ScheduleNotFound,
    delete_schedule,
    get_schedule,
    list_schedules,
    pause_schedule,
    preview_schedule,
    resume_schedule,
    run_schedule,
    schedule_fires,
    set_schedule,
)

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
    # Cron schedules
    "set_schedule",
    "get_schedule",
    "list_schedules",
    "delete_schedule",
    "pause_schedule",
    "resume_schedule",
    "run_schedule",
    "preview_schedule",
    "schedule_fires",
    "Schedule",
    "ScheduleInfo",
    "Fire",
    "FireOutcome",
    "Misfire",
    # Plumbing
    "get_broker",
    "get_store",
    # Errors
    "EngineError",
    "ConfigError",
    "JobNotFound",
    "ResultNotReady",
    "UnknownActor",
    "InvalidArguments",
    "ArgumentsNotSerializable",
    "ResultTooLarge",
    "ResultNotSerializable",
    "DuplicateJob",
    "InvalidJobState",
    "TrackingError",
    "BrokerUnavailable",
    "JobsNotSent",
    "InvalidSchedule",
    "ScheduleNotFound",
]
