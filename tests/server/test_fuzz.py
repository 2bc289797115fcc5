"""Schemathesis against the server's own OpenAPI spec: every route, valid and invalid requests, those
of the TEI / Hugging Face and Open Inference Protocol APIs included (their model routes addressed at
the served model, so bodies reach the model's own checks).

Every response must be a non-5xx whose status, content type, headers and body the spec documents,
every error body must be in the format of the API called (exitserve's, TEI's or the protocol's), and
requests that violate the spec must be refused (4xx). The suite runs a short version; the long one is
the same test with more examples per route and mode (prints the number of cases sent):

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
from exitserve.server.error_format import dialect_of
from exitserve.server.settings import Settings

EXAMPLES = int(os.environ.get("EXITSERVE_FUZZ_EXAMPLES", "150"))
MODEL = "tiny-sst2"  # the served model: what the {name} of every model route is set to
V2 = "/v2/models/{name}"
API_ROUTES = {
    "POST /predict", "GET /health", "GET /ready", "GET /info", "GET /models", "GET /metrics",
    "POST /", "POST /invocations", "POST /models/{name}",
    "GET /v2", "GET /v2/health/live", "GET /v2/health/ready", f"GET {V2}", f"GET {V2}/ready", f"POST {V2}/infer",
    f"GET {V2}/versions/{{version}}", f"GET {V2}/versions/{{version}}/ready", f"POST {V2}/versions/{{version}}/infer",
    "POST /admin/models/{name}/reload",
}
# fuzzed with every example; each other route (a GET, a route whose body another one shares, the admin
# route refused before its body) with a few: more of the same requests would find nothing new
FULLY_FUZZED = ("POST /predict", "POST /models/{name}", f"POST {V2}/infer")
ERROR_KEYS = {"exitserve": {"error"}, "tei": {"error", "error_type"}, "oip": {"error"}}


def error_in_the_apis_format(ctx, response, case) -> None:
    """A 4xx's body is the error format of the API the path belongs to (server/error_format.py)."""
    if response.status_code < 400:
        return
    body, dialect = response.json(), dialect_of(case.formatted_path)
    assert isinstance(body, dict) and set(body) == ERROR_KEYS[dialect], (case.formatted_path, body)
    message = body["error"]["message"] if dialect == "exitserve" else body["error"]
    assert isinstance(message, str) and message, body


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, error_in_the_apis_format]


@pytest.fixture(scope="module")
def api_schema(tiny_checkpoint):
    # schemathesis runs the app's lifespan itself (loads the model, starts the scheduler)
    app = create_app(Settings(checkpoint=tiny_checkpoint, max_inputs_per_request=8, max_chars=500,
                              max_body_bytes=20_000, warmup=False))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    # a body over max_body_bytes is refused unread (413): as much a rejection of invalid data as a 422
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


def test_the_spec_covers_every_route(api_schema):
    assert {op.ok().label for op in api_schema.get_all_operations()} == API_ROUTES


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_no_server_error_and_every_response_matches_the_spec(api_schema, mode):
    sent: Counter[str] = Counter()
    for result in api_schema.get_all_operations():
        operation = result.ok()
        if mode is GenerationMode.NEGATIVE and not len(operation.body):
            continue  # a GET without parameters has nothing to get wrong

        examples = EXAMPLES if operation.label in FULLY_FUZZED else min(EXAMPLES, 20)

        @given(case=operation.as_strategy(generation_mode=mode))
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case) -> None:
            if "name" in (case.path_parameters or {}):
                case.path_parameters["name"] = MODEL
            response = case.call_and_validate(checks=CHECKS)
            sent[f"{case.operation.label} -> {response.status_code}"] += 1

        fuzz()
    print(f"\n{mode.value}: {sum(sent.values())} cases; {dict(sorted(sent.items()))}")
    for route in FULLY_FUZZED:
        assert sum(n for key, n in sent.items() if key.startswith(route + " ")) >= min(EXAMPLES, 20), route
