"""Logs through loguru, with the stdlib logging of Dramatiq, pika, APScheduler and the user's
own loggers routed into it.

Each line written while a job runs carries its id, actor, attempt number and queue (from
Dramatiq's CurrentMessage and the attempt that `Tracking` started), whether it was logged by
the engine, by the user's actor through loguru or through `logging`: as fields in JSON output
(``ENGINE_LOG_JSON=1``), or as ``[actor#attempt@queue job-id]`` in a text line.

With ``ENGINE_LOG_JSON=1`` every line is one flat JSON object (see `json_line`); a message or a
traceback of several lines is one line still. Secrets are masked in every line, tracebacks
included (`engine.redaction`), and tracebacks show no variable values, which could hold them.
"""

from __future__ import annotations

import inspect
import json
import logging
import sys
import threading
import traceback
from datetime import timezone
from types import TracebackType
from typing import Any, Optional

from dramatiq.common import q_name
from dramatiq.middleware import CurrentMessage
from loguru import logger

from . import redaction
from .middleware.tracking import current_attempt
from .settings import Settings

#: Stdlib loggers that are chatty at INFO: they log at WARNING and above unless ENGINE_LOG_LEVEL
#: asks for DEBUG. pika logs every connection and channel; APScheduler every run of a fire check.
QUIET_LOGGERS = ("pika", "apscheduler")

#: The fields of a job, bound to each line logged while it runs.
JOB_FIELDS = ("job_id", "actor", "attempt", "queue")

_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <8}</level> "
    "[{process}] {extra[_job]}<cyan>{name}</cyan> - <level>{message}</level>\n{extra[_traceback]}"
)

__all__ = ["JOB_FIELDS", "QUIET_LOGGERS", "json_line", "setup_logging"]


def setup_logging(settings: Settings, *, client: bool = False) -> None:
    """Configure loguru for this process and route stdlib logging into it.

    Lines go to stderr, as JSON objects when ``ENGINE_LOG_JSON`` is set, else as text; the
    settings' secrets are masked from now on (`engine.redaction.remember_secrets`).

    Parameters:
      settings(Settings): ``ENGINE_LOG_JSON`` and ``ENGINE_LOG_LEVEL``, and the secrets.
      client(bool): for a command that only talks to the engine (``engine submit``, ``status``):
        it logs warnings and errors only, its output being what it prints.
    """
    redaction.remember_secrets(settings)
    level = _at_least(settings.log_level, logging.WARNING if client else logging.NOTSET)
    logger.remove()
    format_line = _json_format if settings.log_json else _text_format
    logger.add(sys.stderr, level=level, format=format_line, backtrace=False, diagnose=False)
    logger.configure(patcher=_patch)
    logging.basicConfig(handlers=[_InterceptHandler()], level=level, force=True)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(level if level <= logging.DEBUG else max(level, logging.WARNING))
    # Python prints an uncaught exception's traceback itself, unmasked and not as JSON.
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread


def _at_least(level_name: str, floor: int) -> int:
    """The number of loguru's level `level_name` (TRACE and SUCCESS are loguru's own), or `floor`."""
    return max(floor, logger.level(level_name).no)


def json_line(record: dict[str, Any]) -> str:
    """The JSON object of one log record, on one line.

    Its fields: ``time`` (ISO 8601, UTC), ``level``, ``message``, ``logger`` (the stdlib logger's
    name, or the module that called loguru), ``function``, ``line``, ``process`` (pid),
    ``thread`` (name); during a job ``job_id``, ``actor``, ``attempt`` and ``queue``;
    ``exception`` (the formatted traceback) when there is one; then every other extra bound
    with ``logger.bind``, unless its name is one of the above.
    """
    fields: dict[str, Any] = {
        "time": record["time"].astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "level": record["level"].name,
        "message": record["message"],
        "logger": record["name"],
        "function": record["function"],
        "line": record["line"],
        "process": record["process"].id,
        "thread": record["thread"].name,
    }
    extra = {key: value for key, value in record["extra"].items() if not key.startswith("_")}
    fields.update((name, extra.pop(name)) for name in JOB_FIELDS if name in extra)
    traceback_text = _traceback(record)
    if traceback_text:
        fields["exception"] = traceback_text
    for key, value in extra.items():
        fields.setdefault(key, value)
    return json.dumps(fields, default=str)


def _json_format(record: dict[str, Any]) -> str:
    record["extra"]["_json"] = json_line(record)
    return "{extra[_json]}\n"


def _text_format(record: dict[str, Any]) -> str:
    extra = record["extra"]
    if "job_id" in extra:
        attempt = f"#{extra['attempt']}" if "attempt" in extra else ""
        extra["_job"] = f"[{extra['actor']}{attempt}@{extra['queue']} {extra['job_id']}] "
    else:
        extra["_job"] = ""
    traceback_text = _traceback(record)
    extra["_traceback"] = traceback_text + "\n" if traceback_text else ""
    return _TEXT_FORMAT


def _traceback(record: dict[str, Any]) -> str:
    """The record's exception as the stdlib formats it (no variable values), masked; or ''."""
    exception = record["exception"]
    if exception is None or exception.type is None:
        return ""
    lines = traceback.format_exception(exception.type, exception.value, exception.traceback)
    return redaction.mask("".join(lines)).rstrip("\n")


def _log_uncaught(kind: type[BaseException], error: BaseException, trace: Optional[TracebackType]) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, error, trace)
        return
    logger.opt(exception=(kind, error, trace)).critical("Uncaught {}: the process stops.", kind.__name__)


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:  # as Python's own hook does
        return
    where = args.thread.name if args.thread is not None else "a thread"
    logger.opt(exception=(args.exc_type, args.exc_value, args.exc_traceback)).error(
        "Uncaught {} in {}: the thread stops.", args.exc_type.__name__, where
    )


def _patch(record: dict[str, Any]) -> None:
    _bind_job(record)
    redaction.mask_record(record)


def _bind_job(record: dict[str, Any]) -> None:
    """Adds the running job's fields to the record's extras, in the thread that runs the job."""
    message = CurrentMessage.get_current_message()
    if message is None:
        return
    extra = record["extra"]
    extra.update(job_id=message.message_id, actor=message.actor_name, queue=q_name(message.queue_name))
    number = _attempt_number(message.message_id)
    if number is not None:
        extra["attempt"] = number


def _attempt_number(job_id: str) -> Optional[int]:
    """The number of the attempt the store counts (redeliveries and `engine retry` included),
    once `Tracking` has started it; None before, while the message is being checked."""
    attempt = current_attempt.get()
    return attempt.number if attempt is not None and attempt.job_id == job_id else None


class _InterceptHandler(logging.Handler):
    """Sends stdlib log records to loguru, keeping their level, logger name and caller."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: Any = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        # The caller is the first frame outside the logging module (loguru's own recipe).
        frame, depth = inspect.currentframe(), 0
        while frame is not None and (depth == 0 or frame.f_code.co_filename == logging.__file__):
            frame, depth = frame.f_back, depth + 1
        named = logger.patch(lambda loguru_record: loguru_record.update(name=record.name))
        named.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())
