"""The worker entry point: ``dramatiq engine.actors``.

Importing this module configures the broker from settings (making it Dramatiq's global broker)
and registers every actor: the built-ins in `actors/` and the modules named in
``ENGINE_ACTOR_MODULES``.
"""

from __future__ import annotations

import importlib

from .app import get_broker
from .settings import get_settings

BUILTIN_ACTOR_MODULES = ("actors.import_csv", "actors.generate_report", "actors.purge_jobs", "actors.process_image")

broker = get_broker()

for _module in (*BUILTIN_ACTOR_MODULES, *get_settings().actor_modules):
    importlib.import_module(_module)
