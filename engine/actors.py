"""The worker entry point: ``dramatiq engine.actors``.

Importing this module configures the broker from settings (making it Dramatiq's global broker)
and registers every actor: the built-ins in `actors/` and the modules named in
``ENGINE_ACTOR_MODULES``.

In a worker process of Dramatiq's CLI, and only there, it first sets up the engine's logging in
place of Dramatiq's (`engine.logging.setup_logging`): loguru, JSON lines with ``ENGINE_LOG_JSON``,
the job's fields, secrets masked, at ``ENGINE_LOG_LEVEL`` (Dramatiq's ``--verbose`` and
``--skip-logging`` then apply to its parent process only). Such a process is known by its stderr:
before importing this module, the CLI has made it the pipe to its parent process, which writes
each line it receives whole (loguru writes a line at a time). A configuration error or an
unreachable store there is one masked critical line and exit code ``EXIT_CONFIG`` (2), as with
``engine worker``, instead of the traceback `multiprocessing` would print.

Such a process is also bound to die with the CLI's parent process (`engine.lifetime`): Dramatiq
does not stop its worker processes when the parent is SIGKILLed, and an orphaned one would go on
consuming; its jobs are delivered again, as those of any dead worker.

Anywhere else this module leaves logging alone: ``engine worker``, ``engine run`` and the other
commands set it up themselves, and a program that imports this module to send jobs keeps its own.

The lines of the CLI's parent process (``Dramatiq ... is booting up.``, ``Sending signal ...``,
``Worker with PID ... exited unexpectedly``) stay in Dramatiq's text format: that process never
imports this module. So does a worker process's ``Loading broker...`` at ``--verbose``, logged
before the import.
"""

from __future__ import annotations

import importlib
import os
import sys

from dramatiq.compat import StreamablePipe
from loguru import logger
from sqlalchemy.exc import OperationalError

from .app import get_broker
from .errors import ConfigError, shown_message
from .lifetime import die_with_parent
from .logging import setup_logging
from .redaction import mask
from .settings import get_settings
from .worker import EXIT_CONFIG

BUILTIN_ACTOR_MODULES = ("actors.import_csv", "actors.generate_report", "actors.purge_jobs", "actors.process_image")


def _import_actor_module(name: str) -> None:
    """Import a module of ``ENGINE_ACTOR_MODULES``.

    Raises:
      ConfigError: naming the module and why it does not import (missing, or raising at import),
        so that every command and worker reports it in one line instead of a traceback.
    """
    try:
        importlib.import_module(name)
    except Exception as error:
        raise ConfigError(
            f"cannot import actor module {name!r} (ENGINE_ACTOR_MODULES): {type(error).__name__}: {error}"
        ) from error


def _in_dramatiq_cli_worker() -> bool:
    """True in a worker process of ``dramatiq``: its stderr is the pipe to the CLI's parent
    process (``dramatiq.cli.setup_worker_logging`` replaces it before importing the broker)."""
    return isinstance(sys.stderr, StreamablePipe)


_cli_worker = _in_dramatiq_cli_worker()
if _cli_worker and not die_with_parent(os.getppid()):
    raise SystemExit(0)  # the CLI's parent died while this process started
try:
    if _cli_worker:
        setup_logging(get_settings())
    broker = get_broker()
    for _module in BUILTIN_ACTOR_MODULES:
        importlib.import_module(_module)
    for _module in get_settings().actor_modules:
        _import_actor_module(_module)
except (ConfigError, OperationalError) as error:
    if not _cli_worker:
        raise
    # Masked here too: when the settings themselves are broken, the engine's masking logger is not set up.
    logger.critical("dramatiq engine.actors: {}", mask(shown_message(error)))
    raise SystemExit(EXIT_CONFIG) from None
