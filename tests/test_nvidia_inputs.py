"""Clients of NVIDIA's TensorRT-LLM Triton ensemble against ours, unchanged (`serving` fixture,
conftest.py): the tensors of NVIDIA's end_to_end_grpc_client.py, batched [B, 1] requests,
num_return_sequences, beam_width and the inputs we do not implement, exclude_input_in_output,
the penalties, bad words and log-probs, and perf_analyzer with NVIDIA-shaped input data.

Upstream followed: NVIDIA/TensorRT-LLM triton_backend/ at 2a9abd9536aa62ad3e4b9314be9286b1b1be523b
(inflight_batcher_llm/client/end_to_end_grpc_client.py, all_models/inflight_batcher_llm/ensemble/
config.pbtxt, tensorrt_llm/1/model.py).
"""
from __future__ import annotations

import json
import queue
import sys
import urllib.request
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from saguaro.config import DEMO_TARGET, EngineConfig, SamplingParams
from saguaro.errors import SaguaroError
from saguaro.request_loop import ServeLimits, nvidia_rows, parse_request
from saguaro.text import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root holds clients/

from clients.common import GenerateRequest, check_ready  # noqa: E402
from clients.grpc_stream import stream_generate  # noqa: E402
from clients.perf.make_input_data import NVIDIA_FIELDS, write_input_data  # noqa: E402
from clients.perf.sweep import PERF_ANALYZER, parse_export, run_perf_analyzer  # noqa: E402

PROMPT = "def fibonacci(n):\n"
PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\ndef list_files(path):\n"]
TOKENIZER = load_tokenizer(DEMO_TARGET)
PERF_OUTPUTS = ("kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks", "arrival_time_ns",
                "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "acceptance_rate",
                "total_accepted_draft_tokens", "total_draft_tokens")


# -- the client's side, as NVIDIA's end_to_end_grpc_client.py does it --------------------------------

def e2e_client_inputs(prompt: str, **changes: Any) -> dict[str, np.ndarray]:
    """prepare_inputs() with end_to_end_grpc_client.py's command-line defaults (output_len 100,
    streaming off, beam_width 1, temperature 1.0, num_return_sequences unset, exclude_input_in_output
    false; no stop/bad words, penalties, end/pad ids or return_* flags): [1, 1] tensors, then the
    changes (each a value for a [1, 1] tensor of its own dtype, or an array)."""
    inputs = {"text_input": np.array([[prompt]]).astype(object), "max_tokens": np.ones_like([[prompt]]).astype(np.int32) * 100,
              "stream": np.array([[False]], dtype=bool), "beam_width": np.array([[1]], dtype=np.int32),
              "temperature": np.array([[1.0]], dtype=np.float32), "exclude_input_in_output": np.array([[False]], dtype=bool)}
    for name, value in changes.items():
        inputs[name] = value if isinstance(value, np.ndarray) else np.array([[value]], dtype=_DTYPES[name])
    return inputs


_DTYPES = {"max_tokens": np.int32, "stream": bool, "beam_width": np.int32, "temperature": np.float32, "top_k": np.int32,
           "top_p": np.float32, "exclude_input_in_output": bool, "num_return_sequences": np.int32, "seed": np.uint64,
           "random_seed": np.uint64, "return_perf_metrics": bool, "return_log_probs": bool, "num_draft_tokens": np.int32,
           "decoding_mode": object, "repetition_penalty": np.float32, "presence_penalty": np.float32,
           "frequency_penalty": np.float32, "min_tokens": np.int32, "min_length": np.int32, "end_id": np.int32,
           "pad_id": np.int32, "length_penalty": np.float32, "return_context_logits": bool, "lora_task_id": np.uint64,
           "return_num_input_tokens": bool, "return_num_output_tokens": bool}


def tensors(inputs: dict[str, np.ndarray]) -> list:
    out = []
    for name, value in inputs.items():
        t = grpcclient.InferInput(name, list(value.shape), np_to_triton_dtype(value.dtype))
        t.set_data_from_numpy(value)
        out.append(t)
    return out


def send(server, inputs: dict[str, np.ndarray], outputs: tuple[str, ...] = (), model: str = "ensemble") -> list:
    """One request on a gRPC stream as the NVIDIA client sends it (start_stream, async_stream_infer,
    stop_stream, then what came): the results, or the InferenceServerException it got."""
    results: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(server.grpc_url)
    try:
        client.start_stream(callback=partial(lambda q, result, error: q.put(error or result), results))
        client.async_stream_infer(model, tensors(inputs), outputs=[grpcclient.InferRequestedOutput(n) for n in outputs] or None)
        client.stop_stream()
    finally:
        client.close()
    got = []
    while not results.empty():
        got.append(results.get())
    errors = [r for r in got if isinstance(r, InferenceServerException)]
    if errors:
        raise errors[0]
    return got


def text_of(result) -> str:
    return result.as_numpy("text_output")[0].decode("utf-8")       # as the NVIDIA client reads it


def index_of(result, name: str) -> int:
    value = result.as_numpy(name)
    return 0 if value is None else int(value[0][0])


@pytest.fixture(scope="module")
def client(serving):
    c = grpcclient.InferenceServerClient(serving.grpc_url)
    yield c
    c.close()


@pytest.fixture(scope="module")
def ours(serving, client):
    """text(prompt, max_tokens, **fields) of our own greedy request (clients/grpc_stream.py)."""
    shapes = check_ready(serving.grpc_url, "ensemble", "grpc")
    return lambda prompt, max_tokens, **fields: stream_generate(
        client, GenerateRequest(prompt, max_tokens=max_tokens, **fields), shapes=shapes).text


# -- NVIDIA's client, unchanged ---------------------------------------------------------------------

def test_end_to_end_client_defaults_give_our_greedy_text_with_perf_metrics(serving, ours):
    # --return-perf-metrics, and num_draft_tokens (the client's speculative-decoding input) so that
    # rounds draft: the round policy may otherwise pick AR rounds; greedy text is the same either way
    inputs = e2e_client_inputs(PROMPT, return_perf_metrics=True, num_draft_tokens=3)
    (result,) = send(serving, inputs, ("text_output",) + PERF_OUTPUTS)
    expected = ours(PROMPT, 100)
    assert text_of(result) == PROMPT + expected       # not streamed, exclude_input_in_output false: prompt first
    assert result.as_numpy("batch_index") is None and result.as_numpy("sequence_index") is None
    perf = {name: result.as_numpy(name)[0][0] for name in PERF_OUTPUTS}
    assert 0 < perf["total_accepted_draft_tokens"] <= perf["total_draft_tokens"]
    assert perf["acceptance_rate"] == pytest.approx(perf["total_accepted_draft_tokens"] / perf["total_draft_tokens"])
    assert 0 < perf["arrival_time_ns"] <= perf["first_scheduled_time_ns"] <= perf["first_token_time_ns"] <= perf["last_token_time_ns"]
    assert (perf["kv_cache_alloc_new_blocks"], perf["kv_cache_reused_blocks"], perf["kv_cache_alloc_total_blocks"]) == (1, 0, 1)

    streamed = send(serving, e2e_client_inputs(PROMPT, stream=True, return_perf_metrics=True, num_draft_tokens=3),
                    ("text_output",) + PERF_OUTPUTS)
    assert len(streamed) > 1 and "".join(map(text_of, streamed)) == expected   # streamed pieces never repeat the prompt
    for r in streamed:                      # the client reads every metric off every response
        assert all(r.as_numpy(name) is not None and r.as_numpy(name).shape == (1, 1) for name in PERF_OUTPUTS)
    drafted = [int(r.as_numpy("total_draft_tokens")[0][0]) for r in streamed]
    assert drafted == sorted(drafted) and drafted[-1] > 0                        # running totals


@pytest.mark.parametrize("model,stream", [("ensemble", True), ("ensemble_sync", False), ("ssd", True)])
def test_a_client_that_asks_for_some_outputs_gets_those_alone(serving, model, stream):
    """What the client asked for, and only that, whether our models leave the rest out (they do:
    Triton 2.51's stub frees the others without the GIL, test_triton_glue.py) or the server prunes it."""
    asked = ("text_output", "total_draft_tokens") if model != "ssd" else ("text_output",)
    changes = {"max_tokens": 8, "stream": stream, "return_perf_metrics": True}
    inputs = (e2e_client_inputs(PROMPT, **changes) if model != "ssd" else
              {"text_input": np.array([PROMPT], dtype=object), "max_tokens": np.array([8], dtype=np.int32),
               "stream": np.array([True])})
    results = send(serving, inputs, asked, model=model)
    assert results and all({o.name for o in r.get_response().outputs} == set(asked) for r in results)
    assert any(r.as_numpy("text_output") is not None for r in results)
    everything = send(serving, inputs, model=model)         # asked for none: every output it sends
    assert {"text_output"} < {o.name for o in everything[-1].get_response().outputs}


def test_batched_rows_each_equal_their_single_request(serving):
    one = lambda prompt: send(serving, e2e_client_inputs(prompt, max_tokens=16, exclude_input_in_output=True))
    singles = [text_of(one(p)[0]) for p in PROMPTS]
    batch = e2e_client_inputs(PROMPTS[0], max_tokens=16, exclude_input_in_output=True)
    batch = {name: np.concatenate([value] * 3) for name, value in batch.items()}
    batch["text_input"] = np.array([[p] for p in PROMPTS]).astype(object)
    results = send(serving, batch, ("text_output", "batch_index"))
    assert sorted(index_of(r, "batch_index") for r in results) == [0, 1, 2]
    assert {index_of(r, "batch_index"): text_of(r) for r in results} == dict(enumerate(singles))
    streamed = send(serving, {**batch, "stream": np.array([[True]] * 3)})
    texts = ["", "", ""]
    for r in streamed:
        texts[index_of(r, "batch_index")] += text_of(r)
    assert texts == singles

    sync = grpcclient.InferenceServerClient(serving.grpc_url).infer(
        "ensemble_sync", tensors({name: value[:2] for name, value in batch.items()}))
    assert [t.decode() for t in sync.as_numpy("text_output")] == singles[:2]
    assert sync.as_numpy("batch_index").tolist() == [[0], [1]]


def test_num_return_sequences_samples_each_sequence_with_its_own_seed(serving):
    sampled = dict(max_tokens=24, exclude_input_in_output=True, top_k=40, decoding_mode=np.array([[b"ar"]], dtype=object))
    results = send(serving, e2e_client_inputs(PROMPTS[1], num_return_sequences=2, seed=11, **sampled),
                   ("text_output", "sequence_index"))
    by_index = {index_of(r, "sequence_index"): text_of(r) for r in results}
    assert sorted(by_index) == [0, 1] and all(by_index.values())
    for j, seed in enumerate((11, 12)):     # sequence j: seed + j, the first one the single request's
        (alone,) = send(serving, e2e_client_inputs(PROMPTS[1], seed=seed, **sampled))
        assert by_index[j] == text_of(alone)


@pytest.mark.parametrize("model", ["ensemble", "ensemble_sync"])
@pytest.mark.parametrize("changes,named", [
    ({"beam_width": 2}, "beam_width"),
    ({"embedding_bias_words": np.array([[b"fibonacci"]], dtype=object),
      "embedding_bias_weights": np.array([[2.0]], dtype=np.float32)}, "embedding_bias_words"),
    ({"return_context_logits": True}, "return_context_logits"),
    ({"lora_task_id": 7}, "lora_task_id"),
    ({"num_return_sequences": 99}, "num_return_sequences"),
], ids=["beam_width", "embedding_bias", "context_logits", "lora", "too_many_sequences"])
def test_what_we_do_not_do_is_invalid_arg_naming_the_input(serving, model, changes, named):
    inputs = e2e_client_inputs(PROMPT, max_tokens=4, **changes)
    if model == "ensemble":
        with pytest.raises(InferenceServerException, match=named):
            send(serving, inputs)
    else:
        with pytest.raises(InferenceServerException, match=named) as e:
            grpcclient.InferenceServerClient(serving.grpc_url).infer(model, tensors(inputs))
        assert "INVALID_ARGUMENT" in str(e.value.status())


def test_unsupported_inputs_at_their_defaults_are_accepted(serving):
    inputs = e2e_client_inputs(PROMPT, max_tokens=8, exclude_input_in_output=True, return_context_logits=False,
                               lora_task_id=0, length_penalty=1.0, pad_id=0,
                               embedding_bias_words=np.array([[b""]], dtype=object),
                               bad_words=np.array([[b""]], dtype=object), stop_words=np.array([[b""]], dtype=object))
    (result,) = send(serving, inputs)
    assert text_of(result)


def test_exclude_input_in_output(serving, reference):
    expected = reference(PROMPTS[2], 8)
    for exclude, want in ((None, PROMPTS[2] + expected), (False, PROMPTS[2] + expected), (True, expected)):
        inputs = e2e_client_inputs(PROMPTS[2], max_tokens=8)
        if exclude is None:
            del inputs["exclude_input_in_output"]
        else:
            inputs["exclude_input_in_output"] = np.array([[exclude]])
        (result,) = send(serving, inputs)
        assert text_of(result) == want, exclude
    streamed = send(serving, e2e_client_inputs(PROMPTS[2], max_tokens=8, stream=True))
    assert "".join(map(text_of, streamed)) == expected


def test_return_log_probs_and_token_counts(serving):
    inputs = e2e_client_inputs(PROMPT, max_tokens=12, exclude_input_in_output=True, return_log_probs=True,
                               return_num_input_tokens=True, return_num_output_tokens=True)
    (result,) = send(serving, inputs)
    if result.as_numpy("output_log_probs") is None:
        pytest.skip("the decoder does not return log-probs yet (Event.log_probs)")
    log_probs = result.as_numpy("output_log_probs")
    assert log_probs.shape == (1, 1, 12) and (log_probs <= 0).all()
    assert result.as_numpy("cum_log_probs")[0][0] == pytest.approx(float(log_probs.sum()), abs=1e-3)
    assert result.as_numpy("num_input_tokens")[0][0] == len(TOKENIZER.encode(PROMPT).ids)
    assert result.as_numpy("num_output_tokens")[0][0] == 12


# -- the new inputs reach SamplingParams, and the decoder applies them ---------------------------------

def parsed(**fields) -> Any:
    inputs = {"text_input": np.array([PROMPT.encode()], dtype=object)}
    inputs.update({name: np.array([v], dtype=_DTYPES.get(name, object)) for name, v in fields.items()})
    return parse_request(inputs, TOKENIZER, ServeLimits())


def test_each_new_input_reaches_sampling_params():
    p = parsed(repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=-0.25, min_tokens=3,
               return_log_probs=True, random_seed=9).params
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.min_tokens, p.return_log_probs, p.seed) == (
        pytest.approx(1.2), 0.5, -0.25, 3, True, 9)
    assert parsed(min_length=4).params.min_tokens == 4
    words = parse_request({"text_input": np.array([PROMPT.encode()], dtype=object),
                           "bad_words": np.array([b" return", b""], dtype=object)}, TOKENIZER, ServeLimits())
    assert words.params.bad_words == (tuple(TOKENIZER.encode(" return", add_special_tokens=False).ids),)
    with pytest.raises(SaguaroError, match="random_seed"):
        parsed(seed=1, random_seed=2)
    # TensorRT-LLM's sampling rule: temperature alone is greedy; top_k or top_p > 0 samples
    assert parsed(temperature=0.7).params.greedy and parsed(top_p=0.0, temperature=0.7).params.greedy
    assert parsed(top_p=0.9).params.temperature == 1.0 and not parsed(top_k=5, temperature=0.5).params.greedy
    assert not parsed().exclude_input and parsed(exclude_input_in_output=True).exclude_input
    assert parsed(return_perf_metrics=True).perf_metrics


def test_rows_and_sequences_of_a_batched_request():
    rows = nvidia_rows({"text_input": np.array([[b"a"], [b"b"]], dtype=object),
                        "num_return_sequences": np.array([[3], [1]], dtype=np.int32),
                        "random_seed": np.array([[5], [5]], dtype=np.uint64)}, max_sequences=4)
    assert [(r.batch_index, r.sequence_index, r.sequences) for r in rows] == [(0, 0, 3), (0, 1, 3), (0, 2, 3), (1, 0, 1)]
    assert [int(r.inputs.get("seed", r.inputs.get("random_seed"))[0]) for r in rows] == [5, 6, 7, 5]
    assert all(r.inputs["text_input"].shape == (1,) and "num_return_sequences" not in r.inputs for r in rows)


@pytest.fixture(scope="module")
def library():
    """generate(prompt, params) -> the library's greedy token ids (target alone, AR)."""
    from saguaro.llm import build_decoder

    decoder = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET)), draft=None)
    yield lambda prompt, params: decoder.generate([TOKENIZER.encode(prompt).ids], params, "ar")[0]
    decoder.close()


def test_penalties_bad_words_and_min_tokens_change_greedy_output_as_the_library_does(serving, library):
    pytest.importorskip("saguaro.logits", reason="the decoder's logits processing has not landed")
    plain = library(PROMPTS[0], SamplingParams(max_tokens=24))
    # a generated token that is a word of its own (its text tokenizes back to it): banned
    banned = next(t for t in plain if TOKENIZER.encode(TOKENIZER.decode([t]), add_special_tokens=False).ids == [t])
    cases = [
        (dict(bad_words=np.array([[TOKENIZER.decode([banned]).encode()]], dtype=object)),
         SamplingParams(max_tokens=24, bad_words=((banned,),))),
        (dict(repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, min_tokens=6, end_id=banned),
         SamplingParams(max_tokens=24, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.3, min_tokens=6,
                        end_id=banned)),
    ]
    for fields, params in cases:
        want = library(PROMPTS[0], params)
        assert want != plain
        (result,) = send(serving, e2e_client_inputs(PROMPTS[0], max_tokens=24, exclude_input_in_output=True,
                                                    num_draft_tokens=3, **fields))
        assert text_of(result) == TOKENIZER.decode(want), fields
    assert banned not in library(PROMPTS[0], cases[0][1])


# -- perf_analyzer with NVIDIA-shaped input data ---------------------------------------------------

def test_perf_analyzer_with_nvidia_input_data_has_no_errors(serving, tmp_path):
    data = write_input_data(tmp_path / "input_nvidia.json", PROMPTS[:2], GenerateRequest("", max_tokens=16), NVIDIA_FIELDS)
    entry = json.loads(data.read_text())["data"][0]
    assert entry["beam_width"] == [1] and entry["exclude_input_in_output"] == [True] and "decoding_mode" not in entry
    failures = lambda: sum(float(line.split()[-1]) for line in urllib.request.urlopen(serving.metrics_url).read().decode()
                           .splitlines() if line.startswith("nv_inference_request_failure") and 'model="ensemble"' in line)
    before = failures()
    export, log = tmp_path / "export.json", tmp_path / "perf_analyzer.log"
    returncode, _ = run_perf_analyzer([str(PERF_ANALYZER), "-m", "ensemble", "-u", serving.grpc_url, "-i", "grpc", "--async",
                                       "--streaming", "--concurrency-range", "2", "--request-count", "4", "--input-data",
                                       str(data), "--profile-export-file", str(export)], export, log, timeout_s=300)
    assert returncode == 0, log.read_text()[-3000:]
    (experiment,) = parse_export(export)
    assert len(experiment["requests"]) >= 4
    assert all(r["responses"] > 0 and r["generated_tokens"] == 16 for r in experiment["requests"])
    assert failures() == before
