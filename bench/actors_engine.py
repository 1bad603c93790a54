"""The engine with full tracking: the benchmark's measured side.

Named in ``ENGINE_ACTOR_MODULES`` for ``engine worker -p P -t T``; the broker and store come
from ``ENGINE_BROKER_URL`` and ``ENGINE_STORE_URL`` (no broker URL: the embedded SQLite broker).
Same job bodies as `bench.actors_bare`.
"""

from __future__ import annotations

import engine

from . import bodies

noop = engine.actor(bodies.noop)
io_1ms = engine.actor(bodies.io_1ms)
probe = engine.actor(bodies.probe)
