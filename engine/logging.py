"""Logs through loguru, with Dramatiq's and pika's stdlib logging routed into it.

Each line written while a job runs carries its id, actor and attempt number (from Dramatiq's
CurrentMessage), as fields in JSON output (``ENGINE_LOG_JSON=1``) or in the text line.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

from dramatiq.middleware import CurrentMessage
from loguru import logger

from .settings import Settings

_TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <8}</level> "
    "[{process}] {extra[job]}<cyan>{name}</cyan> - <level>{message}</level>"
)


class _InterceptHandler(logging.Handler):
    """Sends stdlib log records to loguru, keeping their level and origin."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: Any = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(depth=6, exception=record.exc_info).log(level, record.getMessage())


def _bind_job(record: Any) -> None:
    message = CurrentMessage.get_current_message()
    if message is None:
        record["extra"].setdefault("job", "")
        return
    attempt = message.options.get("retries", 0) + 1
    record["extra"].update(job_id=message.message_id, actor=message.actor_name, attempt=attempt)
    record["extra"].setdefault("job", f"{message.actor_name}#{message.message_id}@{attempt} ")


def setup_logging(settings: Settings) -> None:
    """Configure loguru for this process and route stdlib logging into it."""
    logger.remove()
    if settings.log_json:
        logger.add(sys.stderr, level=settings.log_level, serialize=True)
    else:
        logger.add(sys.stderr, level=settings.log_level, format=_TEXT_FORMAT)
    logger.configure(patcher=_bind_job)
    logging.basicConfig(handlers=[_InterceptHandler()], level=settings.log_level, force=True)
    logging.getLogger("pika").setLevel(max(logging.WARNING, logging.getLevelName(settings.log_level)))
