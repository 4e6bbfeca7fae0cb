"""preprocessing and postprocessing on a real tritonserver, over HTTP and gRPC."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from saguaro.text import StreamWindow, load_tokenizer
from saguaro.tritonserver_process import TritonServer

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "demo-code-target"

TEXTS = ["héllo → 世界 🌵", 'def f(x):\n    return {"ключ": x}  # ✓ 🌵🌵\n']


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(MODEL_DIR)


@pytest.fixture(scope="module", params=["http", "grpc"])
def client(request: pytest.FixtureRequest, triton: TritonServer) -> Any:
    triton.load("preprocessing", "postprocessing")
    if request.param == "http":
        return httpclient, httpclient.InferenceServerClient(triton.http_url)
    return grpcclient, grpcclient.InferenceServerClient(triton.grpc_url)


def tensor(mod: Any, name: str, array: np.ndarray, dtype: str) -> Any:
    t = mod.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def preprocess(client: Any, raw: bytes) -> tuple[list[int], int]:
    mod, c = client
    r = c.infer("preprocessing", [tensor(mod, "text_input", np.array([raw], dtype=object), "BYTES")])
    return r.as_numpy("input_ids").tolist(), int(r.as_numpy("input_length")[0])


def postprocess(client: Any, window: list[int], prefix_len: int) -> str:
    mod, c = client
    r = c.infer("postprocessing", [tensor(mod, "output_ids", np.array(window, dtype=np.int32), "INT32"),
                                   tensor(mod, "prefix_len", np.array([prefix_len], dtype=np.int32), "INT32")])
    return r.as_numpy("text_output")[0].decode("utf-8")


@pytest.mark.parametrize("text", TEXTS)
def test_preprocessing_ids_equal_the_tokenizers(client, tok, text):
    ids, length = preprocess(client, text.encode("utf-8"))
    assert ids == tok.encode(text).ids and length == len(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_windows_round_trip_exactly(client, tok, text):
    # The ssd side of the contract: one StreamWindow per request, one id per round.
    ids = tok.encode(text).ids
    sw, pieces = StreamWindow(tok), []
    for i in ids:
        sent = sw.push([i])
        if sent is not None:
            pieces.append(postprocess(client, *sent))
    sent = sw.finish()
    if sent is not None:
        pieces.append(postprocess(client, *sent))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)  # no multi-byte character split across pieces


def test_postprocessing_whole_window_and_empty_window(client, tok):
    ids = tok.encode(TEXTS[0]).ids
    assert postprocess(client, ids, 0) == TEXTS[0]
    assert postprocess(client, [], 0) == ""


@pytest.mark.parametrize("raw, field_error", [(b"\xff\xfeabc", "text_input: not valid UTF-8"),
                                              (b"", "text_input: empty")])
def test_bad_text_input_is_a_clear_error_and_server_keeps_serving(client, tok, raw, field_error):
    with pytest.raises(InferenceServerException, match=field_error):
        preprocess(client, raw)
    assert preprocess(client, b"ok")[0] == tok.encode("ok").ids


def test_bad_prefix_len_is_a_clear_error(client):
    with pytest.raises(InferenceServerException, match="prefix_len"):
        postprocess(client, [1, 2], 5)
    assert postprocess(client, [72], 0) == "h"
