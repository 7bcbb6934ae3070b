"""Property-based API testing from the app's own OpenAPI document (schemathesis) through real Ray Serve
(loopback): every operation, 50 generated requests each (valid and invalid bodies), derandomized.

Checks per response: no 5xx, the status is one the document declares, the content type is declared, and the
body conforms to the declared schema (the OpenAI error model for every 4xx). App ``st``: one simulated replica,
speed-up 50, ``max_output_tokens`` 16 so valid generations finish fast.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.ray, pytest.mark.timeout(300)]

CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def st_url(ray_cluster):
    url = ray_cluster.deploy("st", {"num_replicas": 1, "speedup": 50.0, "max_output_tokens": 16,
                                    "request_timeout_s": 10.0})
    yield url
    ray_cluster.delete("st")


@pytest.fixture(scope="module")
def api_schema(st_url):
    return schemathesis.openapi.from_dict(httpx.get(f"{st_url}/openapi.json", timeout=10).json())


OPERATIONS = ["POST /v1/completions", "POST /v1/chat/completions", "POST /tokenize", "POST /detokenize",
              "GET /v1/models", "GET /health", "GET /metrics"]


def test_every_operation_is_tested(api_schema):
    assert sorted(op.ok().label for op in api_schema.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("label", OPERATIONS, ids=[op.split()[1].strip("/").replace("/", "-") for op in OPERATIONS])
def test_operation_conforms_to_the_openapi_document(api_schema, st_url, label):
    operation = api_schema.find_operation_by_label(label)

    @given(case=operation.as_strategy())
    @settings(max_examples=50, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
    def check(case):
        case.call_and_validate(base_url=st_url, checks=CHECKS, timeout=15)

    check()
