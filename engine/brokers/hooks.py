"""Middleware hooks called only where a middleware has them.

Dramatiq's broker calls every hook of every middleware for each signal: with the engine's eleven
middleware, a job costs some fifty calls of `Middleware`'s empty hooks (``before_ack`` of
CurrentMessage, ``after_enqueue`` of AgeLimit...), each found by ``getattr``. `HookDispatch`
calls only the middleware whose class overrides the hook, in Dramatiq's order, with Dramatiq's
error handling: a job then costs only the calls of the hooks that do something.
"""

from __future__ import annotations

from typing import Any, Callable

from dramatiq.middleware import Middleware, MiddlewareError

Hook = Callable[..., None]


class HookDispatch:
    """Mixed into a `dramatiq.Broker` before it: `emit_before` and `emit_after` as Dramatiq's,
    over only the middleware that implement the signal's hook.

    The hooks of each signal are looked up once, and again when the middleware list changed
    (``add_middleware``, or an edit of ``broker.middleware``).
    """

    middleware: list[Middleware]
    logger: Any  # Dramatiq's, whose error handling this keeps

    def emit_before(self, signal: str, *args: Any, **kwargs: Any) -> None:
        name = "before_" + signal
        for middleware, hook in self._hooks(name, reverse=False):
            try:
                hook(self, *args, **kwargs)
            except MiddlewareError:
                raise
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", name, middleware, exc_info=True)

    def emit_after(self, signal: str, *args: Any, **kwargs: Any) -> None:
        name = "after_" + signal
        for middleware, hook in self._hooks(name, reverse=True):
            try:
                hook(self, *args, **kwargs)
            except Exception:
                self.logger.critical("Unexpected failure in %s of %r.", name, middleware, exc_info=True)

    def _hooks(self, name: str, *, reverse: bool) -> list[tuple[Middleware, Hook]]:
        current = tuple(self.middleware)
        cache: dict[str, tuple[tuple[Middleware, ...], list[tuple[Middleware, Hook]]]]
        cache = self.__dict__.setdefault("_hook_cache", {})
        cached = cache.get(name)
        if cached is None or cached[0] != current:
            ordered = reversed(current) if reverse else current
            cached = current, [(middleware, getattr(middleware, name)) for middleware in ordered if _implements(middleware, name)]
            cache[name] = cached
        return cached[1]


def _implements(middleware: Middleware, name: str) -> bool:
    """Whether `middleware` has hook `name`, and not `Middleware`'s empty one."""
    hook = getattr(middleware, name, None)
    return hook is not None and getattr(hook, "__func__", None) is not getattr(Middleware, name, None)
