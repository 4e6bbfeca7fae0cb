"""The serving path through a real tritonserver (`serving` fixture, conftest.py) with tritonclient:
exact outputs over every protocol, concurrent streams, bad input, cancellation, draft failure and
the speculative metrics."""
from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from saguaro.config import DEV_PROMPTS

PROMPTS = [json.loads(line)["prompt"] for line in DEV_PROMPTS.read_text().splitlines()[:8]]
DTYPES = {"text_input": "BYTES", "decoding_mode": "BYTES", "max_tokens": "INT32", "stream": "BOOL", "temperature": "FP32",
          "top_p": "FP32", "top_k": "INT32", "num_draft_tokens": "INT32", "inject_draft_fault": "BOOL", "seed": "UINT64",
          "end_id": "INT32", "stop_words": "BYTES", "exclude_input_in_output": "BOOL"}


def grpc_inputs(fields: dict, dtypes: dict | None = None, batched: bool = False) -> list:
    """Tensors of one request: [1] for `ssd`, [1, ...] (a batch of one) for the `ensemble`'s
    NVIDIA shapes (batched)."""
    inputs = []
    for name, value in fields.items():
        if value is None:            # left out
            continue
        arr = value if isinstance(value, np.ndarray) else np.array(
            [value.encode() if isinstance(value, str) else value],
            dtype={"BYTES": object, "INT32": np.int32, "BOOL": bool, "FP32": np.float32, "UINT64": np.uint64}[DTYPES[name]])
        arr = arr.reshape(1, -1) if batched else arr
        dt = (dtypes or {}).get(name, DTYPES[name])
        t = grpcclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def stream(server, model: str, fields: dict, cancel_after: int | None = None, timeout_s: float = 120) -> dict:
    """One gRPC streaming request; returns {'text', 'pieces', 'totals', 'error'}."""
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    out = {"pieces": [], "totals": {}, "error": None}
    try:
        client.async_stream_infer(model, grpc_inputs(fields, batched=model != "ssd"), enable_empty_final_response=True)
        while True:
            result, error = q.get(timeout=timeout_s)
            if error is not None:
                out["error"] = str(error)
                break
            text = result.as_numpy("text_output")
            if text is not None and text.size:
                out["pieces"].append(text.reshape(-1)[0].decode())
            for name in ("generated_tokens", "rounds", "accepted_tokens", "drafted_tokens", "cache_hits"):
                v = result.as_numpy(name)
                if v is not None and v.size:
                    out["totals"][name] = int(v.reshape(-1)[0])
            if cancel_after is not None and len(out["pieces"]) >= cancel_after:
                client.stop_stream(cancel_requests=True)
                break
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        client.stop_stream()
        client.close()
    out["text"] = "".join(out["pieces"])
    return out


def metrics(server) -> dict[str, float]:
    text = urllib.request.urlopen(server.metrics_url).read().decode()
    return {m.group(1): float(m.group(2)) for m in re.finditer(r"^(saguaro_\S+) (\S+)$", text, re.M)}


def decoding(server, n: int) -> None:
    """Waits until n sequences are being decoded."""
    deadline = time.monotonic() + 30
    while metrics(server).get("saguaro_active_sequences", 0) < n:
        assert time.monotonic() < deadline, "the requests never started"
        time.sleep(0.02)


def wait_slots_free(server, timeout_s: float = 30) -> dict[str, float]:
    deadline = time.time() + timeout_s
    while True:
        m = metrics(server)
        held = [m.get('saguaro_kv_slots_in_use{engine="target"}'), m.get('saguaro_kv_slots_in_use{engine="draft"}'),
                m.get("saguaro_active_sequences")]
        if held == [0.0, 0.0, 0.0] or time.time() > deadline:
            return m
        time.sleep(0.2)


@pytest.mark.parametrize("model", ["ensemble", "ssd"])
@pytest.mark.parametrize("mode", ["ssd", "sd", "ar"])
def test_grpc_streaming_equals_library_greedy(serving, reference, model, mode):
    # K pinned: an unpinned ssd request lets the round policy pick AR rounds when they are faster
    pin = {} if mode == "ar" else {"num_draft_tokens": 3}
    out = stream(serving, model, {"text_input": PROMPTS[0], "max_tokens": 48, "stream": True, "decoding_mode": mode, **pin})
    assert out["error"] is None
    assert len(out["pieces"]) > 1, "not streamed"
    assert out["text"] == reference(PROMPTS[0], 48)
    t = out["totals"]
    assert t["generated_tokens"] == 48 and t["rounds"] > 0
    assert (t["drafted_tokens"] > 0) == (mode != "ar") and (t["cache_hits"] > 0) == (mode == "ssd")


def test_non_streaming_and_plain_infer_equal_library_greedy(serving, reference):
    # NVIDIA's default (exclude_input_in_output false): an unstreamed output starts with the prompt
    expected = reference(PROMPTS[1], 32)
    one = stream(serving, "ensemble", {"text_input": PROMPTS[1], "max_tokens": 32, "stream": False})
    assert len(one["pieces"]) == 1 and one["text"] == PROMPTS[1] + expected
    for client, mod in ((httpclient.InferenceServerClient(serving.http_url), httpclient),
                        (grpcclient.InferenceServerClient(serving.grpc_url), grpcclient)):
        inputs = []
        for name, arr, dt in (("text_input", np.array([[PROMPTS[1].encode()]], dtype=object), "BYTES"),
                              ("max_tokens", np.array([[32]], dtype=np.int32), "INT32"),
                              ("exclude_input_in_output", np.array([[True]]), "BOOL")):
            t = mod.InferInput(name, [1, 1], dt)
            t.set_data_from_numpy(arr)
            inputs.append(t)
        r = client.infer("ensemble_sync", inputs)
        assert r.as_numpy("text_output")[0].decode() == expected
        assert int(r.as_numpy("generated_tokens").reshape(-1)[0]) == 32


def test_http_generate_and_sse_equal_library_greedy(serving, reference):
    body = json.dumps({"text_input": PROMPTS[2], "max_tokens": 32, "decoding_mode": "ssd",
                       "exclude_input_in_output": True}).encode()
    url = f"http://{serving.http_url}/v2/models/ensemble"
    whole = json.loads(urllib.request.urlopen(urllib.request.Request(url + "/generate", body)).read())
    assert whole["text_output"] == reference(PROMPTS[2], 32) and whole["generated_tokens"] == 32
    sse_body = json.dumps({"text_input": PROMPTS[2], "max_tokens": 32, "stream": True}).encode()
    events = [json.loads(line[5:]) for line in urllib.request.urlopen(urllib.request.Request(url + "/generate_stream", sse_body))
              .read().decode().splitlines() if line.startswith("data:")]
    assert len(events) > 1 and "".join(e.get("text_output", "") for e in events) == whole["text_output"]


def test_eight_concurrent_streams_each_equal_their_output_alone(serving, reference):
    results: dict[int, dict] = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, stream(
        serving, "ensemble", {"text_input": PROMPTS[i], "max_tokens": 40, "stream": True,
                              "decoding_mode": ["ssd", "sd", "ar"][i % 3]})))
               for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    for i in range(8):
        assert results[i]["error"] is None
        assert results[i]["text"] == reference(PROMPTS[i], 40), f"stream {i} differs from its output alone"
    wait_slots_free(serving)


BAD_INPUTS = [
    ({"text_input": ""}, "text_input"),
    ({"text_input": "x " * 2000}, "max_input_len"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": 100000}, "max_tokens"),
    ({"temperature": -1.0}, "temperature"),
    ({"top_k": -1}, "top_k"),        # (top_p <= 0 means unset, as in TensorRT-LLM)
    ({"top_p": 1.5}, "top_p"),
    ({"decoding_mode": "turbo"}, "decoding_mode"),
    ({"num_draft_tokens": 99}, "num_draft_tokens"),
    ({"num_draft_tokens": 0}, "num_draft_tokens"),
    ({"max_tokens": np.array([8.5], dtype=np.float32)}, "max_tokens"),          # wrong dtype
    ({"max_tokens": np.array([8, 9], dtype=np.int32)}, "max_tokens"),           # wrong shape
    ({"text_input": np.array([b"\xff\xfe bad"], dtype=object)}, "UTF-8"),
    ({"text_input": None}, "text_input: missing"),
    ({"text_input": "x" * 10_000_000}, "bytes, above this server's limit"),     # refused before tokenizing
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"temperature": 1e-45}, "temperature"),
    ({"end_id": 10**6}, "end_id"),
    ({"end_id": -1}, "end_id"),
    ({"stop_words": np.array([b"\xff\xfe"], dtype=object)}, "stop_words"),
]


@pytest.mark.parametrize("model", ["ensemble", "ssd"])
@pytest.mark.parametrize("fields,named", BAD_INPUTS, ids=[n for _, n in BAD_INPUTS])
def test_bad_input_gets_a_clear_error_and_the_server_keeps_serving(serving, reference, model, fields, named):
    request = {"text_input": PROMPTS[3], "max_tokens": 8, "stream": True, **fields}
    dtypes = {k: "FP32" for k, v in fields.items() if isinstance(v, np.ndarray) and v.dtype == np.float32}
    q: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(serving.grpc_url)
    client.start_stream(callback=lambda result, error: q.put((result, error)))
    try:
        client.async_stream_infer(model, grpc_inputs(request, dtypes, batched=model != "ssd"))
        result, error = q.get(timeout=60)
    finally:
        client.stop_stream()
    assert error is not None, f"{fields} was accepted"
    assert named in str(error), f"error does not name {named}: {error}"
    good = stream(serving, model, {"text_input": PROMPTS[3], "max_tokens": 8, "stream": True})
    assert good["text"] == reference(PROMPTS[3], 8)


def http_generate(server, body: bytes) -> tuple[int, str]:
    req = urllib.request.Request(f"http://{server.http_url}/v2/models/ensemble/generate", data=body, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.mark.parametrize("body,named", [
    ({"max_tokens": 8}, "text_input"),                                   # no prompt: an error, not a 200
    ({"text_input": "def f():", "max_tokens": 2**40}, "wrap"),           # INT32 in JSON wraps to 0
    ({"text_input": "def f():", "max_tokens": 8, "temperature": 1e-45}, "temperature"),
])
def test_http_generate_bad_input_is_an_error_status_naming_the_field(serving, body, named):
    code, text = http_generate(serving, json.dumps(body).encode())
    assert code >= 400 and named in text, (code, text)


def test_a_huge_prompt_is_refused_at_once_and_does_not_stall_other_streams(serving, reference):
    results = {}
    t = threading.Thread(target=lambda: results.update(stream(serving, "ensemble", {
        "text_input": PROMPTS[2], "max_tokens": 64, "stream": True})))
    t.start()
    t0 = time.monotonic()        # (over HTTP, tritonserver 2.51 itself dies on a 10 MB body: see test_http_front)
    huge = stream(serving, "ensemble", {"text_input": "y" * 10_000_000, "max_tokens": 8, "stream": True})
    assert "bytes, above this server's limit" in huge["error"]
    assert time.monotonic() - t0 < 5.0
    t.join(60)
    assert results["error"] is None and results["text"] == reference(PROMPTS[2], 64)


@pytest.mark.parametrize("model", ["ensemble", "ssd"])
def test_cancelled_stream_frees_its_slots_in_both_engines_at_once(serving, model):
    before = metrics(serving).get("saguaro_accepted_length_sum", 0.0)
    out = stream(serving, model, {"text_input": PROMPTS[4], "max_tokens": 256, "stream": True}, cancel_after=2)
    assert out["error"] is None and len(out["pieces"]) == 2
    m = wait_slots_free(serving, timeout_s=2)
    # freed at once: the server did not go on decoding the 256 tokens nobody reads
    assert m["saguaro_accepted_length_sum"] - before < 200
    assert m['saguaro_kv_slots_in_use{engine="target"}'] == 0 and m['saguaro_kv_slots_in_use{engine="draft"}'] == 0
    assert m["saguaro_active_sequences"] == 0


def unary_rows(rows: list[str], max_tokens: list[int] | int, **flags: bool) -> list:
    """gRPC inputs of one batched ensemble_sync request: a row per prompt, [rows, 1] tensors."""
    n = len(rows)
    tokens = max_tokens if isinstance(max_tokens, list) else [max_tokens] * n
    arrays = [("text_input", np.array([[p.encode()] for p in rows], dtype=object), "BYTES"),
              ("max_tokens", np.array([[t] for t in tokens], dtype=np.int32), "INT32")]
    arrays += [(name, np.full((n, 1), value), "BOOL") for name, value in flags.items()]
    inputs = []
    for name, arr, dt in arrays:
        t = grpcclient.InferInput(name, list(arr.shape), dt)
        t.set_data_from_numpy(arr)
        inputs.append(t)
    return inputs


def failed_unary(serving, inputs: list, error: type, match: str, client_timeout: float, free_within_s: float) -> float:
    """Sends a batched ensemble_sync request that must fail (`error` matching `match`); checks that
    every slot is free within free_within_s after, and returns the tokens decoded meanwhile."""
    before = metrics(serving).get("saguaro_accepted_length_sum", 0.0)
    with pytest.raises(error, match=match):
        grpcclient.InferenceServerClient(serving.grpc_url).infer("ensemble_sync", inputs, client_timeout=client_timeout)
    m = wait_slots_free(serving, timeout_s=free_within_s)
    assert m["saguaro_kv_slots_in_use{engine=\"target\"}"] == 0 and m["saguaro_active_sequences"] == 0
    return m["saguaro_accepted_length_sum"] - before


def test_a_unary_request_the_client_gave_up_on_frees_its_slots(serving):
    # ensemble_sync waits on `ssd` for every row: a client's deadline cancels them there
    decoded = failed_unary(serving, unary_rows(PROMPTS[:4], 256), Exception, "Deadline", client_timeout=0.3, free_within_s=2)
    assert decoded < 700      # of the 1024 tokens nobody reads


def test_unary_requests_do_not_wait_for_each_other(serving, reference):
    # ensemble_sync answers a request only when all its rows are done; with one instance, a short
    # request sent while a long one ran waited for the long one (1.6 s against 0.08 s streamed)
    def unary(rows: list[str], max_tokens: int, out: dict) -> None:
        inputs = unary_rows(rows, max_tokens, exclude_input_in_output=True)
        result = grpcclient.InferenceServerClient(serving.grpc_url).infer("ensemble_sync", inputs, client_timeout=120)
        out.update(texts=[t.decode() for t in result.as_numpy("text_output").reshape(-1)], end=time.monotonic())
    long, short = {}, {}
    threads = [threading.Thread(target=unary, args=(PROMPTS[:4], 256, long))]
    threads[0].start()
    decoding(serving, 4)
    threads.append(threading.Thread(target=unary, args=(PROMPTS[4:5], 8, short)))
    threads[1].start()
    for t in threads:
        t.join(120)
    assert short["end"] < long["end"] - 0.5, "the short request waited for the long one"
    assert short["texts"] == [reference(PROMPTS[4], 8)] and long["texts"][0] == reference(PROMPTS[0], 256)
    wait_slots_free(serving)


def test_a_unary_request_whose_row_fails_ends_its_other_rows(serving):
    # the request fails with that row's error; its other rows decoded to their end for nobody
    decoded = failed_unary(serving, unary_rows([PROMPTS[0], PROMPTS[1], ""], 256), InferenceServerException, "text_input",
                           client_timeout=60, free_within_s=3)
    assert decoded < 256      # of the 512 tokens nobody reads


def test_draft_failure_degrades_to_exact_target_only_output(serving, reference):
    before = metrics(serving).get("saguaro_degraded_rounds_total", 0.0)
    # K pinned: the drafter is told the prompt at once (a policy far from paying defers it)
    out = stream(serving, "ensemble", {"text_input": PROMPTS[5], "max_tokens": 40, "stream": True, "inject_draft_fault": True,
                                       "num_draft_tokens": 3})
    assert out["error"] is None
    assert out["text"] == reference(PROMPTS[5], 40)
    assert metrics(serving)["saguaro_degraded_rounds_total"] > before
    after = stream(serving, "ensemble", {"text_input": PROMPTS[5], "max_tokens": 16, "stream": True,   # the draft serves again
                                         "num_draft_tokens": 3})
    assert after["totals"]["drafted_tokens"] > 0 and after["text"] == reference(PROMPTS[5], 16)
    wait_slots_free(serving)


def test_metrics_count_rounds_tokens_and_cache(serving):
    before = metrics(serving)
    stream(serving, "ensemble", {"text_input": PROMPTS[6], "max_tokens": 32, "stream": True, "num_draft_tokens": 3})
    after = metrics(serving)
    for name in ("saguaro_rounds_total", "saguaro_drafted_tokens_total", "saguaro_accepted_tokens_total",
                 "saguaro_cache_hits_total", "saguaro_verify_seconds_total", "saguaro_draft_build_seconds_total",
                 "saguaro_accepted_length_count"):
        assert after[name] > before.get(name, 0.0), f"{name} did not move"
    assert after["saguaro_accepted_length_sum"] - before.get("saguaro_accepted_length_sum", 0) == 32
    # SSD pinned: pre-drafting beside every verify after the first round, on the drafter's core
    rounds = after["saguaro_rounds_total"] - before.get("saguaro_rounds_total", 0.0)
    one_core = after["saguaro_one_core_rounds_total"] - before.get("saguaro_one_core_rounds_total", 0.0)
    assert 0 < one_core <= rounds


def test_bls_transport_serves_the_same_greedy_text(tmp_path, reference):
    """Rounds can also travel as Triton BLS requests instead of over the engine models' sockets."""
    from conftest import SERVING_MODELS, test_repository
    from saguaro.tritonserver_process import TritonServer

    with TritonServer(test_repository(tmp_path, transport="bls"), http_port=0, grpc_port=0, metrics_port=0,
                      models=list(SERVING_MODELS), log_path=tmp_path / "server.log") as server:
        for mode in ("ssd", "sd"):
            out = stream(server, "ensemble", {"text_input": PROMPTS[7], "max_tokens": 32, "stream": True, "decoding_mode": mode})
            assert out["error"] is None and out["text"] == reference(PROMPTS[7], 32)


def test_server_serves_a_torch_build_of_the_pair(tmp_path, reference):
    """build_engines --backend torch writes checkpoints and fills the repository; the server then
    serves from them with no hand edits."""
    from build_engines.build import build_torch
    from conftest import SERVING_MODELS, test_repository
    from saguaro.config import DEMO_DRAFT, DEMO_TARGET
    from saguaro.tritonserver_process import TritonServer

    repo = test_repository(tmp_path)
    result = build_torch(DEMO_TARGET, DEMO_DRAFT, tmp_path / "engines", onnx=False, model_repository=str(repo))
    assert f'string_value: "{result.target}"' in (repo / "target" / "config.pbtxt").read_text()
    with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0, models=list(SERVING_MODELS),
                      log_path=tmp_path / "server.log") as server:
        out = stream(server, "ensemble", {"text_input": PROMPTS[7], "max_tokens": 32, "stream": True})
        assert out["error"] is None and out["text"] == reference(PROMPTS[7], 32)
