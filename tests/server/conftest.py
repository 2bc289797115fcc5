from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from exitserve.server.app import create_app
from exitserve.server.settings import Settings


def make_client(checkpoint, **settings) -> TestClient:
    return TestClient(create_app(Settings(checkpoint=checkpoint, **settings)))


@pytest.fixture
def client(tiny_checkpoint):
    with make_client(tiny_checkpoint, max_inputs_per_request=8, max_chars=500, max_body_bytes=20_000) as c:
        yield c
