"""The job store (being split into modules: see `engine.store.attempts` for now)."""

from .attempts import (
    AttemptEnd,
    AttemptRecord,
    AttemptRun,
    AttemptStart,
    EnqueueRecord,
    StartRequest,
    Store,
    decode_cursor,
    encode_cursor,
    ended_attempt_durations,
)
