"""The OpenAPI 3.1 description, generated from the routes and their pydantic models."""

from __future__ import annotations

from typing import Any, Optional

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from . import models as m
from .routing import ERROR_REASONS, Route

_REF = "#/components/schemas/{model}"

_HEADERS = {
    401: {"WWW-Authenticate": "Bearer"},
    405: {"Allow": "the methods this path takes"},
    503: {"Retry-After": "seconds to wait before trying again"},
}


def describe(routes: list[Route], *, version: str, guarded: bool) -> dict[str, Any]:
    """The OpenAPI document of `routes`.

    Parameters:
      routes(list[Route]): every operation.
      version(str): the engine's version.
      guarded(bool): whether a token is required (``ENGINE_API_TOKEN`` is set): /api
        operations then name the bearer scheme.
    """
    inputs = {model for route in routes for model in (route.query, route.body) if model is not None}
    outputs = {model for route in routes for model in _success_models(route)} | {m.ErrorResponse}
    keyed = [(model, "validation") for model in inputs] + [(model, "serialization") for model in outputs]
    refs, top = models_json_schema(keyed, ref_template=_REF)
    schemas = top.get("$defs", {})
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation = _operation(route, refs, schemas)
        if guarded and route.guarded:
            operation["security"] = [{"bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "engine",
            "version": version,
            "description": "Submit, watch and control background jobs. Errors are "
            '`{"error": {"code", "message", "fields"?, "request_id"}}` with a 4xx or 5xx status.',
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer", "description": "ENGINE_API_TOKEN"}},
        },
    }


def _success_models(route: Route) -> list[type[BaseModel]]:
    found = [route.response] + [model for _, _, model in route.also]
    return [model for model in found if model is not None]


def _operation(route: Route, refs: dict[Any, Any], schemas: dict[str, Any]) -> dict[str, Any]:
    operation: dict[str, Any] = {
        "operationId": route.handler.__name__,
        "summary": route.summary,
        "tags": [route.tag],
        "parameters": [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
            for name in route.parameters
        ],
    }
    if route.query is not None:
        operation["parameters"] += _query_parameters(route.query, refs, schemas)
    if route.body is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(route.body, "validation")]}},
        }
    responses = {str(route.status): _answer(route.summary, route.response, route.media_type, refs, route)}
    for status, description, model in route.also:
        responses[str(status)] = _answer(description, model, route.media_type, refs, route)
    error = {"application/json": {"schema": refs[(m.ErrorResponse, "serialization")]}}
    for status in route.statuses():
        responses[str(status)] = {
            "description": ERROR_REASONS[status],
            "content": error,
            **({"headers": _headers(_HEADERS[status])} if status in _HEADERS else {}),
        }
    operation["responses"] = responses
    return operation


def _answer(description: str, model: Optional[type[BaseModel]], media_type: str, refs: dict[Any, Any], route: Route) -> dict[str, Any]:
    if not media_type:
        return {"description": description}
    schema = refs[(model, "serialization")] if model is not None else {"type": "string"}
    answer: dict[str, Any] = {"description": description, "content": {media_type: {"schema": schema}}}
    if route.method == "POST" and route.status in (201, 202):
        answer["headers"] = _headers({"Location": "the URL of what was created"})
    return answer


def _headers(described: dict[str, str]) -> dict[str, Any]:
    return {name: {"description": text, "schema": {"type": "string"}} for name, text in described.items()}


def _query_parameters(model: type[BaseModel], refs: dict[Any, Any], schemas: dict[str, Any]) -> list[dict[str, Any]]:
    """One parameter per field, its schema as in the model's (which stays among the schemas)."""
    name = refs[(model, "validation")]["$ref"].rsplit("/", 1)[1]
    properties = schemas[name]["properties"]
    required = set(schemas[name].get("required", []))
    return [
        {"name": field, "in": "query", "required": field in required, "schema": schema,
         **({"description": schema["description"]} if "description" in schema else {})}  # fmt: skip
        for field, schema in properties.items()
    ]
