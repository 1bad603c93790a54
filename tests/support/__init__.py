"""Modules the tests load into real worker processes through ENGINE_ACTOR_MODULES."""
