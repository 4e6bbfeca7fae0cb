"""Hostile payloads against a real tritonserver: pickles that would run a shell command, sent to
every model input and socket a client or another local process can reach, run nothing; the engine
models answer only the server's own orchestrator."""
from __future__ import annotations

import base64
import json
import os
import pickle
import stat
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from saguaro.http_front import HttpFront
from saguaro.ipc import connect
from saguaro.messages import EngineInfoQuery, encode
from saguaro.private_dir import runtime_dir
from saguaro.tritonserver_process import free_port
from test_ipc import send_without_handshake
from test_messages import MARKER, Hostile
from test_serving import PROMPTS, stream

PAYLOADS = {"pickle": pickle.dumps(Hostile()), "pickle-b64": base64.b64encode(pickle.dumps(Hostile())),
            "message": encode(EngineInfoQuery())}


@pytest.fixture(autouse=True)
def no_marker():
    if os.path.exists(MARKER):
        os.unlink(MARKER)
    yield
    assert not os.path.exists(MARKER), "a hostile payload ran"


def http(server, path: str, body: dict) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{server.http_url}{path}", data=json.dumps(body).encode(), method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("model", ["target", "draft"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
@pytest.mark.parametrize("auth", [None, "guess", "00" * 32])
def test_http_infer_to_an_engine_model_runs_nothing(serving, model, payload, auth):
    inputs = [{"name": "request", "shape": [1], "datatype": "BYTES", "data": [PAYLOADS[payload].decode("latin-1")]}]
    if auth is not None:
        inputs.append({"name": "auth", "shape": [1], "datatype": "BYTES", "data": [auth]})
    code, body = http(serving, f"/v2/models/{model}/infer", {"inputs": inputs})
    assert code >= 400, body
    if auth is not None:             # HTTP infer does not reach a decoupled model at all
        assert "answers only the server's own `ssd`" in body or (model == "draft" and "decoupled" in body), body


@pytest.mark.parametrize("model", ["target", "draft"])
def test_http_generate_to_an_engine_model_runs_nothing(serving, model):
    code, body = http(serving, f"/v2/models/{model}/generate",
                      {"request": PAYLOADS["pickle"].decode("latin-1"), "auth": "x"})
    assert code >= 400, body


@pytest.mark.parametrize("model", ["target", "draft"])
def test_grpc_infer_to_an_engine_model_runs_nothing(serving, model):
    client = grpcclient.InferenceServerClient(serving.grpc_url)
    inputs = []
    for name, value in (("request", PAYLOADS["pickle"]), ("auth", b"\0" * 32)):
        t = grpcclient.InferInput(name, [1], "BYTES")
        t.set_data_from_numpy(np.array([value], dtype=object))
        inputs.append(t)
    with pytest.raises(InferenceServerException, match="answers only"):
        if model == "draft":         # decoupled: streaming only
            import queue
            q = queue.Queue()
            client.start_stream(callback=lambda result, error: q.put(error))
            client.async_stream_infer(model, inputs)
            error = q.get(timeout=60)
            client.stop_stream()
            raise error
        client.infer(model, inputs)
    client.close()


@pytest.mark.parametrize("field", ["text_input", "stop_words", "decoding_mode"])
def test_pickles_in_orchestrator_inputs_are_only_text(serving, field):
    out = stream(serving, "ssd", {"text_input": PROMPTS[0], "max_tokens": 4, "stream": True,
                                  field: np.array([PAYLOADS["pickle"]], dtype=object)})
    assert out["error"] is not None or out["text"]


@pytest.mark.parametrize("model", ["target", "draft"])
def test_engine_sockets_are_private_and_refuse_peers_without_the_secret(serving, model):
    folder = runtime_dir(serving.proc.pid)
    path = folder / f"{model}.sock"
    assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700 and stat.S_IMODE(os.stat(path).st_mode) == 0o600
    with pytest.raises(OSError, match="authentication"):
        connect(path, b"\0" * 32)
    send_without_handshake(path, PAYLOADS["pickle"])
    good = stream(serving, "ensemble", {"text_input": PROMPTS[1], "max_tokens": 8, "stream": True})
    assert good["error"] is None and good["totals"]["generated_tokens"] == 8


def loaded_code() -> tuple[str, dict[str, bytes]]:
    """A python-backend model whose model.py writes MARKER when it loads: the config and files a
    repository load request may bring."""
    config = json.dumps({"name": "hostile", "backend": "python", "max_batch_size": 0,
                         "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [1]}],
                         "output": [{"name": "y", "data_type": "TYPE_FP32", "dims": [1]}]})
    code = (f"open({str(MARKER)!r}, 'w').write('loaded')\n"
            "class TritonPythonModel:\n    def execute(self, requests):\n        return []\n").encode()
    return config, {"file:1/model.py": code}


def test_clients_cannot_load_models_or_change_the_server(serving):
    # Triton's repository API loads a model with the files a request brings (code, run in the
    # server) and unloads any: it answered every client (HTTP, through our front too, and gRPC)
    config, files = loaded_code()
    body = {"parameters": {"config": config, **{k: base64.b64encode(v).decode() for k, v in files.items()}}}
    front = HttpFront("127.0.0.1", free_port(), serving.http_url).start()
    try:
        for base in (f"http://{serving.http_url}", f"http://127.0.0.1:{front.port}"):
            for path, sent in (("/v2/repository/models/hostile/load", body), ("/v2/repository/models/ensemble/unload", {}),
                               ("/v2/repository/index", {}), ("/v2/logging", {"log_verbose_level": 1}),
                               ("/v2/trace/setting", {"trace_level": ["TIMESTAMPS"]}),
                               ("/v2/systemsharedmemory/region/x/register", {"key": "/x", "offset": 0, "byte_size": 8})):
                req = urllib.request.Request(base + path, data=json.dumps(sent).encode(), method="POST")
                with pytest.raises(urllib.error.HTTPError) as refused:
                    urllib.request.urlopen(req, timeout=30)
                assert refused.value.code == 403, (base, path)
    finally:
        front.stop()
    client = grpcclient.InferenceServerClient(serving.grpc_url)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.load_model("hostile", config=config, files=files)
    with pytest.raises(InferenceServerException, match="restricted"):
        client.unload_model("ensemble")
    assert client.is_model_ready("ensemble")
    good = stream(serving, "ensemble", {"text_input": PROMPTS[1], "max_tokens": 8, "stream": True})
    assert good["error"] is None and good["totals"]["generated_tokens"] == 8
