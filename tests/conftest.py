"""Shared fixtures. `triton` is one real tritonserver per test session, on free 127.0.0.1 ports.

It serves a copy of the project's model repository in which the test-only switch
`allow_fault_injection` of the `ssd` model is on (so a request can make the draft fail), with
`models/` linked beside it so the repository's relative checkpoint paths resolve. It starts with
explicit model control and no model loaded: each test module loads what it needs
(the `serving` fixture loads SERVING_MODELS: `ensemble` relays to `ssd`, which reaches `target` and
`draft`). It stops, with its stub processes, at session end.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Iterator

import pytest

from saguaro.config import PROJECT_ROOT
from saguaro.tritonserver_process import DEFAULT_MODEL_REPOSITORY, TritonServer

SERVING_MODELS = ("target", "draft", "ssd", "ensemble", "ensemble_sync")


def test_repository(root: Path, **ssd_params: str) -> Path:
    """A copy of model_repository/ under root with fault injection allowed and the given `ssd`
    config parameters changed."""
    repo = root / "model_repository"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, repo)
    (root / "models").symlink_to(PROJECT_ROOT / "models")
    ssd = repo / "ssd" / "config.pbtxt"
    text = ssd.read_text()
    for key, value in {"allow_fault_injection": "true", **ssd_params}.items():
        text, n = re.subn(rf'(key: "{key}" value: {{ string_value: )"[^"]*"', rf'\1"{value}"', text)
        assert n == 1, f"ssd config has no parameter {key}"
    ssd.write_text(text)
    return repo


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A real tritonserver on a test copy of the model repository (HTTP, gRPC, metrics URLs on it).

    SAGUARO_TEST_LOG_VERBOSE=1 turns on the server's verbose log; the log is in the session's tmp dir.
    """
    root = tmp_path_factory.mktemp("triton")
    server = TritonServer(test_repository(root), http_port=0, grpc_port=0, metrics_port=0, models=[],
                          log_verbose=int(os.environ.get("SAGUARO_TEST_LOG_VERBOSE", "0")), log_path=root / "server.log")
    with server:
        yield server


@pytest.fixture(scope="session")
def serving(triton: TritonServer) -> TritonServer:
    """The server with the whole serving path loaded."""
    triton.load(*SERVING_MODELS)
    return triton


@pytest.fixture(scope="session")
def reference():
    """expected(prompt_text, max_tokens) -> the library's greedy text (target alone, AR)."""
    from saguaro.config import DEMO_TARGET, EngineConfig, SamplingParams
    from saguaro.llm import build_decoder
    from saguaro.text import load_tokenizer

    tok = load_tokenizer(DEMO_TARGET)
    decoder = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET)), draft=None)
    cache: dict[tuple[str, int], str] = {}

    def expected(prompt: str, max_tokens: int) -> str:
        if (prompt, max_tokens) not in cache:
            ids = decoder.generate([tok.encode(prompt).ids], SamplingParams(max_tokens=max_tokens), "ar")[0]
            cache[prompt, max_tokens] = tok.decode(ids)
        return cache[prompt, max_tokens]

    yield expected
    decoder.close()
