"""Fuzzing from the API's own description: schemathesis generates requests for every operation
of /openapi.json, valid and invalid, and checks that none is answered 5xx and that every answer
matches the description (status, content type, headers, body).

The operations are walked here rather than through schemathesis' pytest plugin, whose lazy
loader (`schemathesis.pytest.from_fixture`) does not run under pytest 9.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import positive_data_acceptance

#: Examples per operation and generation mode: enough to reach each error path, quick in CI.
EXAMPLES = 25

#: Operations whose requests can match the description and still be refused (422), rightly: a
#: submission naming an actor that is not registered, or arguments that do not fit its signature;
#: a cursor of the right alphabet that no page gave; a cron expression or time zone that is a
#: string but not a valid one. Every other check runs on them.
BEYOND_THE_DESCRIPTION = {"POST /api/jobs", "GET /api/jobs", "POST /api/schedules", "PATCH /api/schedules/{name}"}


@pytest.fixture
def mode() -> str:
    return "embedded"  # the description is one for both modes; tests/api/test_routes.py runs both


@pytest.mark.parametrize("generation", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
def test_no_operation_fails_or_breaks_its_description(serve, generation):
    client = serve()
    client.post("/api/jobs", {"actor": "echo", "args": [1]})
    described = schemathesis.openapi.from_url(f"{client.url}/openapi.json")
    failures: dict[str, str] = {}
    operations = [result.ok() for result in described.get_all_operations()]
    paths = client.get("/openapi.json").json["paths"]
    described_labels = {f"{method.upper()} {path}" for path, methods in paths.items() for method in methods}
    # every operation but the description itself, which schemathesis leaves out of what it loaded
    assert {operation.label for operation in operations} == described_labels - {"GET /openapi.json"}

    for operation in operations:

        @given(case=operation.as_strategy(generation_mode=generation))
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate(excluded_checks=excluded)

        excluded = [positive_data_acceptance] if operation.label in BEYOND_THE_DESCRIPTION else []
        try:
            check()
        except Unsatisfiable:
            assert generation == GenerationMode.NEGATIVE, f"{operation.label}: no valid request could be made"
            # nothing in it can be made invalid (no parameter, or only a path's string)
        except Exception as error:  # noqa: BLE001  (every operation is tried, all failures reported)
            failures[operation.label] = str(error)[:3000]
    assert not failures, "\n\n".join(f"{label}:\n{text}" for label, text in failures.items())
