"""Schemathesis against the server's own OpenAPI spec: every route, valid and invalid requests.

Every response must be a non-5xx whose status, content type, headers and body the spec documents,
and requests that violate the spec must be refused (4xx). The suite runs a short version; the long
one is the same test with more examples per route and mode (prints the number of cases sent):

    EXITSERVE_FUZZ_EXAMPLES=600 .venv/bin/python -m pytest tests/server/test_fuzz.py -q -s
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation import GenerationMode
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from exitserve.server.app import create_app
from exitserve.server.settings import Settings

EXAMPLES = int(os.environ.get("EXITSERVE_FUZZ_EXAMPLES", "150"))
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]
API_ROUTES = {"POST /predict", "GET /health", "GET /ready", "GET /info", "GET /metrics"}


@pytest.fixture(scope="module")
def api_schema(tiny_checkpoint):
    # schemathesis runs the app's lifespan itself (loads the model, starts the scheduler)
    app = create_app(Settings(checkpoint=tiny_checkpoint, max_inputs_per_request=8, max_chars=500,
                              max_body_bytes=20_000, warmup=False))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_spec_covers_every_route(api_schema):
    assert {op.ok().label for op in api_schema.get_all_operations()} == API_ROUTES


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_every_response_matches_the_spec(api_schema, mode):
    sent: Counter[str] = Counter()
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            continue  # a GET without parameters has nothing to get wrong

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            response = case.call_and_validate(checks=CHECKS)
            sent[f"{case.operation.label} -> {response.status_code}"] += 1

        fuzz()
    print(f"\n{mode.value}: {sum(sent.values())} cases; {dict(sorted(sent.items()))}")
    assert sum(n for key, n in sent.items() if key.startswith("POST /predict")) >= min(EXAMPLES, 20)
