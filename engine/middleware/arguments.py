"""Arguments: a job whose arguments do not fit its actor is refused when it is sent.

A call with a missing or unexpected argument, or with a value that contradicts the actor's type
hints, would otherwise be enqueued, fail with a TypeError (or worse, half run) and be retried
until its retries ran out. Checked in ``before_enqueue``, before Tracking records anything, it
fails ``actor.send()``, `engine.submit` and ``POST /api/jobs`` alike, and nothing is enqueued.

Values are checked by pydantic in strict mode against their JSON form, which is what the worker
will receive: ``"5"`` is not an ``int``, but an ISO 8601 string is a ``datetime`` and an array
a ``tuple``.
"""

from __future__ import annotations

import inspect
import json
import typing
from dataclasses import dataclass
from typing import Any, Callable, Optional

from dramatiq import Broker, Message, Middleware
from dramatiq.errors import ActorNotFound
from loguru import logger
from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError, create_model
from pydantic.errors import PydanticSchemaGenerationError, PydanticUserError

from ..errors import InvalidArguments

#: Message options of a message sent again (a retry, a re-check): its arguments were checked
#: when the job was first sent.
_SENT_BEFORE = frozenset({"retries", "engine_recheck"})

_Problems = list[tuple[str, str]]


class Arguments(Middleware):
    """Checks each new job's arguments against its actor's signature and type hints.

    The check of each actor is built once, at its first send. An actor without type hints
    costs one ``inspect.Signature.bind`` per send.
    """

    def __init__(self) -> None:
        self._checks: dict[Callable[..., Any], _Check] = {}

    def before_enqueue(self, broker: Broker, message: Message, delay: Optional[int]) -> None:
        if not _SENT_BEFORE.isdisjoint(message.options):
            return
        try:
            fn = broker.get_actor(message.actor_name).fn
        except ActorNotFound:
            return  # sent by name to an actor this process does not know: nothing to check against
        check = self._checks.get(fn)
        if check is None:
            check = self._checks[fn] = _Check.of(fn)
        problems = check.problems(message.args, message.kwargs)
        if problems:
            raise InvalidArguments(message.actor_name, problems)


@dataclass(frozen=True)
class _Check:
    signature: inspect.Signature
    model: Optional[type[BaseModel]]  # None when no parameter has a type hint

    @classmethod
    def of(cls, fn: Callable[..., Any]) -> "_Check":
        signature = inspect.signature(fn)
        return cls(signature, _model_of(fn, signature))

    def problems(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Problems:
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError:
            return _binding_problems(self.signature, args, kwargs)
        if self.model is None:
            return []
        try:
            encoded = json.dumps(bound.arguments)
        except (TypeError, ValueError):
            return []  # Tracking refuses what JSON cannot encode, with its own error
        try:
            self.model.__pydantic_validator__.validate_json(encoded, strict=True)
        except ValidationError as error:
            return [_value_problem(self.signature, args, item) for item in error.errors(include_url=False)]
        return []


def _model_of(fn: Callable[..., Any], signature: inspect.Signature) -> Optional[type[BaseModel]]:
    """A pydantic model with a field per annotated parameter, or None if there is none."""
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception as error:  # an annotation naming what the module cannot resolve
        logger.warning("Arguments of actor {} are not type-checked: its hints do not resolve ({})", fn.__name__, error)
        return None
    fields: dict[str, Any] = {}
    for name, parameter in signature.parameters.items():
        if name not in hints:
            continue
        hint = hints[name] if _has_schema(hints[name]) else Any
        if parameter.kind is parameter.VAR_POSITIONAL:
            hint = tuple[hint, ...]  # type: ignore[valid-type]
        elif parameter.kind is parameter.VAR_KEYWORD:
            hint = dict[str, hint]  # type: ignore[valid-type]
        default = None if parameter.default is parameter.empty else parameter.default
        fields[name] = (hint, default)
    if not fields:
        return None
    return create_model(f"{fn.__name__}_arguments", __config__=ConfigDict(extra="ignore"), **fields)


def _has_schema(hint: Any) -> bool:
    """Whether pydantic can check a value against `hint` (not an arbitrary class)."""
    try:
        TypeAdapter(hint)
    except (PydanticSchemaGenerationError, PydanticUserError, TypeError):
        return False
    return True


def _binding_problems(signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]) -> _Problems:
    """Every argument missing, unexpected or given twice (``bind`` says only the first)."""
    parameters = list(signature.parameters.values())
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    takes_varargs = any(p.kind is p.VAR_POSITIONAL for p in parameters)
    takes_varkw = any(p.kind is p.VAR_KEYWORD for p in parameters)
    by_keyword = {p.name for p in parameters if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    problems: _Problems = []
    if not takes_varargs:
        problems += [
            (f"args.{index}", f"unexpected positional argument (the actor takes {len(positional)})")
            for index in range(len(positional), len(args))
        ]
    given_positionally = {p.name for p in positional[: len(args)]}
    for name in kwargs:
        if name in given_positionally:
            problems.append((f"kwargs.{name}", "given twice: positionally and by keyword"))
        elif name not in by_keyword and not takes_varkw:
            problems.append((f"kwargs.{name}", "unexpected keyword argument"))
    for parameter in parameters:
        required = parameter.default is parameter.empty and parameter.kind not in (
            parameter.VAR_POSITIONAL,
            parameter.VAR_KEYWORD,
        )
        if required and parameter.name not in given_positionally and parameter.name not in kwargs:
            problems.append((parameter.name, "missing required argument"))
    return problems or [("args", "do not fit the actor's signature")]


def _value_problem(signature: inspect.Signature, args: tuple[Any, ...], error: Any) -> tuple[str, str]:
    """(where, what) of one pydantic error, `where` as the caller passed the value."""
    name, *rest = error["loc"]
    parameter = signature.parameters[name]
    names = list(signature.parameters)
    if parameter.kind is parameter.VAR_POSITIONAL:
        where = f"args.{names.index(name) + int(rest[0])}" if rest else "args"
    elif parameter.kind is parameter.VAR_KEYWORD:
        where = f"kwargs.{rest[0]}" if rest else "kwargs"
    elif parameter.kind is not parameter.KEYWORD_ONLY and names.index(name) < len(args):
        where = f"args.{names.index(name)}"
    else:
        where = f"kwargs.{name}"
    got = repr(error.get("input"))
    return where, f"{error['msg']} (parameter {name!r}), got {got[:80]}"
