"""Shared fixtures. `triton` is one real tritonserver per test session, on free 127.0.0.1 ports.

It starts with explicit model control and no model loaded, so each test module loads just what it
needs (`triton.load("preprocessing", "postprocessing")`, or "ensemble", which loads its parts) and
models that are not ready yet do not block others. It stops, with its stub processes, at session end.
"""
from __future__ import annotations

import os
from typing import Iterator

import pytest

from saguaro.triton_server import DEFAULT_MODEL_REPOSITORY, TritonServer


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """The project's model_repository/ served by a real tritonserver (HTTP, gRPC, metrics URLs on it).

    SAGUARO_TEST_LOG_VERBOSE=1 turns on the server's verbose log; the log is in the session's tmp dir.
    """
    log = tmp_path_factory.mktemp("triton") / "server.log"
    server = TritonServer(DEFAULT_MODEL_REPOSITORY, http_port=0, grpc_port=0, metrics_port=0, models=[],
                          log_verbose=int(os.environ.get("SAGUARO_TEST_LOG_VERBOSE", "0")), log_path=log)
    with server:
        yield server
