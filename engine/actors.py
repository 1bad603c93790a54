"""The worker entry point: ``dramatiq engine.actors``.

Importing this module configures the broker from settings (making it Dramatiq's global broker)
and registers every actor: the built-ins in `actors/` and the modules named in
``ENGINE_ACTOR_MODULES``.
"""

from __future__ import annotations

import importlib

from .app import get_broker
from .errors import ConfigError
from .settings import get_settings

BUILTIN_ACTOR_MODULES = ("actors.import_csv", "actors.generate_report", "actors.purge_jobs", "actors.process_image")

broker = get_broker()


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


for _module in BUILTIN_ACTOR_MODULES:
    importlib.import_module(_module)
for _module in get_settings().actor_modules:
    _import_actor_module(_module)
