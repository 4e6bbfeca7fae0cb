"""The OpenAI-compatible endpoints (saguaro.openai_front), through the official `openai` client,
against the real `ensemble` of the session's tritonserver: the front serves what a direct ensemble
request returns (greedy text, token counts, sampled choices for their seeds), streamed and not;
stop strings, chat, errors in OpenAI's format. Last, NVIDIA's load tool aiperf profiles it (skipped
where aiperf is not installed)."""
from __future__ import annotations

import json
import re
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from saguaro.config import DEMO_TARGET
from saguaro.openai_front import ChatTemplate, OpenAIFront, StopCut, upstream_error
from saguaro.text import load_tokenizer
from saguaro.tritonserver_process import free_port
from test_http_front import post as post_bytes
from test_serving import PROMPTS, metrics, wait_slots_free

PROMPT = PROMPTS[4]
AIPERF = shutil.which("aiperf") or os.environ.get("SAGUARO_AIPERF")


@pytest.fixture(scope="module")
def front(serving):
    f = OpenAIFront("127.0.0.1", free_port(), serving.http_url, DEMO_TARGET).start()
    yield f
    f.stop()


@pytest.fixture(scope="module")
def client(front) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{front.port}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def ensemble(serving):
    """ensemble(prompt, **fields) -> the final response of a direct (non-streamed) ensemble request."""
    with urllib.request.urlopen(f"http://{serving.http_url}/v2/models/ensemble/config", timeout=30) as r:
        inputs = {i["name"] for i in json.load(r)["input"]}
    seed_name = "seed" if "seed" in inputs else "random_seed"

    def request(prompt: str, seed: int | None = None, **fields) -> dict:
        body = {"text_input": prompt, **fields}
        if "exclude_input_in_output" in inputs:
            body["exclude_input_in_output"] = True
        if seed is not None:
            body[seed_name] = seed
        status, reply = post(f"http://{serving.http_url}/v2/models/ensemble/generate", body)
        assert status == 200, reply
        return {k: v[0] if isinstance(v, list) else v for k, v in json.loads(reply).items()}

    return request


def post(url: str, body: dict | bytes) -> tuple[int, bytes]:
    return post_bytes(url, body if isinstance(body, bytes) else json.dumps(body).encode())


# -- pure parts --------------------------------------------------------------------------------------

def test_stop_strings_are_cut_across_pieces():
    cut = StopCut(["\n\n", "END"])
    assert [cut.push(p) for p in ["abc\n", "def E", "N", "D more"]] == ["abc", "\ndef ", "", ""]
    assert cut.stopped and cut.finish() == ""
    cut = StopCut(["xyz"])
    assert [cut.push(p) for p in ["ax", "y", "q"]] == ["a", "", "xyq"] and not cut.stopped


def test_chat_template_from_the_tokenizer_config_or_the_plain_one(tmp_path: Path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "def f():"}]
    plain = ChatTemplate(DEMO_TARGET)          # the demo pair has no chat template
    assert plain.plain and plain.render(messages) == "System: Be brief.\n\nUser: def f():\n\nAssistant:"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "chat_template": "{{ bos_token }}{% for m in messages %}[{{ m.role }}]{{ m.content }}"
                                              "{% endfor %}{% if add_generation_prompt %}[assistant]{% endif %}"}))
    own = ChatTemplate(tmp_path)
    assert not own.plain and own.render(messages) == "<s>[system]Be brief.[user]def f():[assistant]"


def test_upstream_errors_keep_their_status_and_name_the_field():
    e = upstream_error(400, "max_tokens=100000: must be in [1, 256] (this server's limit)")
    assert (e.status, e.param, e.error()["type"]) == (400, "max_tokens", "invalid_request_error")
    assert upstream_error(503, "every KV slot is in use and the queue is full; retry later").status == 503
    assert upstream_error(None, "the target engine was lost mid-request; retry the request").status == 503
    assert upstream_error(404, "Request for unknown model: 'ensemble' is not found").status == 503
    assert upstream_error(400, "the 'ssd' model is not ready (restarting or unloading); retry the request").status == 503
    assert upstream_error(400, "max_tokens: must be at least 1").status == 400
    assert upstream_error(400, "num_draft_tokens (K)=0: must be at least 1").param == "num_draft_tokens"


# -- against the ensemble ------------------------------------------------------------------------------

def test_models(client):
    assert [m.id for m in client.models.list()] == ["ensemble"]
    assert client.models.retrieve("ensemble").id == "ensemble"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")


def test_completion_is_the_ensembles_greedy_text_with_usage(client, ensemble):
    expected = ensemble(PROMPT, max_tokens=24)
    c = client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=24, temperature=0)
    assert c.choices[0].text == expected["text_output"] and c.object == "text_completion"
    prompt_tokens = len(load_tokenizer(DEMO_TARGET).encode(PROMPT).ids)
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (
        prompt_tokens, expected["generated_tokens"], prompt_tokens + expected["generated_tokens"])
    assert c.choices[0].finish_reason == ("length" if expected["generated_tokens"] == 24 else "stop")
    assert c.to_dict()["speculation"]["rounds"] >= 1
    # our extensions: plain SD with K=2 is still the greedy text, and it drafted
    sd = client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=24, temperature=0,
                                   extra_body={"decoding_mode": "sd", "num_draft_tokens": 2})
    assert sd.choices[0].text == expected["text_output"] and sd.to_dict()["speculation"]["drafted_tokens"] > 0


def test_streamed_completion_joins_to_the_same_text_and_ends_with_done(client, ensemble, front):
    expected = ensemble(PROMPT, max_tokens=32)
    chunks = list(client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=32, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == expected["text_output"]
    assert chunks[-1].usage.completion_tokens == expected["generated_tokens"] and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] in ("length", "stop")
    status, raw = post(f"http://127.0.0.1:{front.port}/v1/completions",
                       {"model": "ensemble", "prompt": PROMPT, "max_tokens": 8, "stream": True})
    events = [line[len("data: "):] for line in raw.decode().split("\n\n") if line.startswith("data: ")]
    assert status == 200 and events[-1] == "[DONE]" and all(json.loads(e)["choices"] for e in events[:-1])


def test_chat_streams_the_ensembles_text_for_the_templated_prompt(client, ensemble):
    messages = [{"role": "user", "content": PROMPT}]
    expected = ensemble(ChatTemplate(DEMO_TARGET).render(messages), max_tokens=32)["text_output"]
    chunks = list(client.chat.completions.create(model="ensemble", messages=messages, max_tokens=32, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    pieces = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert len(pieces) >= 1 and "".join(pieces) == expected
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")
    whole = client.chat.completions.create(model="ensemble", messages=messages, max_completion_tokens=32)
    assert whole.choices[0].message.content == expected and whole.choices[0].message.role == "assistant"


def test_n_choices_are_independent_requests_with_distinct_seeds(client, ensemble):
    fields = {"max_tokens": 16, "temperature": 1.0, "top_p": 1.0, "decoding_mode": "ar"}   # top_p: the front's
    c = client.completions.create(model="ensemble", prompt=PROMPT, n=2, seed=11, max_tokens=16, temperature=1.0,
                                  extra_body={"decoding_mode": "ar"})
    assert [ch.index for ch in c.choices] == [0, 1]
    assert [ch.text for ch in c.choices] == [ensemble(PROMPT, seed=11, **fields)["text_output"],
                                             ensemble(PROMPT, seed=12, **fields)["text_output"]]
    assert c.usage.completion_tokens == sum(ensemble(PROMPT, seed=s, **fields)["generated_tokens"] for s in (11, 12))


def test_stop_ends_the_text_before_the_stop_string(client, ensemble):
    full = ensemble(PROMPT, max_tokens=32)["text_output"]
    stop = full[12:15]
    c = client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=32, stop=[stop])
    assert c.choices[0].text == full[:full.find(stop)] and c.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=32, stop=stop, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == full[:full.find(stop)]


def test_errors_come_back_as_openai_exceptions_with_our_message(client, front):
    with pytest.raises(openai.BadRequestError, match="max_tokens") as e:    # the ensemble's own check
        client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=100_000)
    assert e.value.status_code == 400
    with pytest.raises(openai.BadRequestError, match="max_tokens"):          # ... streamed too
        list(client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=100_000, stream=True))
    with pytest.raises(openai.BadRequestError, match=r"presence_penalty=3: must be in \[-2, 2\]"):
        client.completions.create(model="ensemble", prompt=PROMPT, presence_penalty=3)
    # beyond the ensemble's INT32 and FP32 inputs (they wrapped: max_tokens 2**32 + 3 gave 3 tokens)
    for field, value, match in (("max_tokens", 2 ** 32 + 3, "max_tokens=4294967299: must be an integer of at least 1 and at most 2147483647"),
                                ("top_k", 2 ** 32 + 1, r"top_k=4294967297: must be an integer in \[-2147483648, 2147483647\]"),
                                ("repetition_penalty", 10 ** 400, "repetition_penalty=.*: must be a number float32 holds")):
        status, raw = post(f"http://127.0.0.1:{front.port}/v1/completions",
                           f'{{"model": "ensemble", "prompt": "x", "{field}": {value}}}'.encode())
        assert status == 400 and re.search(match, json.loads(raw)["error"]["message"]), raw
    with pytest.raises(openai.BadRequestError, match="logprobs: not supported"):
        client.chat.completions.create(model="ensemble", messages=[{"role": "user", "content": "x"}], logprobs=True)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt=PROMPT)
    status, raw = post(f"http://127.0.0.1:{front.port}/v1/completions", b'{"model": "ensemble", "prompt": ')
    error = json.loads(raw)["error"]
    assert status == 400 and "malformed JSON" in error["message"] and set(error) == {"message", "type", "param", "code"}

    # one request of 20 prompts x n=16 held the server alone for a minute (320 sequences); a lone
    # surrogate in the text reached Triton, which answered 500
    for body, param, match in (
            ({"prompt": ["def f(x):"] * 20, "n": 16}, "prompt", "20 prompts x n=16 choices is more than 64 sequences"),
            ({"prompt": "def f(x):\ud800"}, "prompt", "prompt: not valid Unicode text"),
            ({"prompt": ["ok", "x\udfff"]}, "prompt", r"prompt\[1\]: not valid Unicode text"),
            ({"prompt": "x", "stop": ["\ud800"]}, "stop", "stop: not valid Unicode text")):
        status, raw = post(f"http://127.0.0.1:{front.port}/v1/completions", {"model": "ensemble", "max_tokens": 4, **body})
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == param and re.search(match, error["message"]), raw
    status, raw = post(f"http://127.0.0.1:{front.port}/v1/chat/completions",
                       {"model": "ensemble", "messages": [{"role": "user", "content": "x\ud800"}]})
    assert status == 400 and "messages[0].content: not valid Unicode text" in json.loads(raw)["error"]["message"], raw


def test_a_client_that_goes_away_frees_its_slots_at_once(client, front, serving):
    """Streamed: the client closes after two chunks; not streamed: it hangs up while waiting. Either
    way the upstream request is cancelled at its next piece, not decoded to its 256 tokens."""
    before = metrics(serving).get("saguaro_accepted_length_sum", 0.0)
    stream = client.completions.create(model="ensemble", prompt=PROMPT, max_tokens=256, stream=True)
    for _, _ in zip(range(2), stream):
        pass
    stream.close()
    body = json.dumps({"model": "ensemble", "prompt": PROMPT, "max_tokens": 256}).encode()
    with socket.create_connection(("127.0.0.1", front.port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        time.sleep(0.2)
    m = wait_slots_free(serving, timeout_s=2)
    assert m["saguaro_active_sequences"] == 0 and m['saguaro_kv_slots_in_use{engine="target"}'] == 0
    assert m["saguaro_accepted_length_sum"] - before < 300      # two requests of 256 tokens were not decoded


# -- NVIDIA's load tool ----------------------------------------------------------------------------------

@pytest.mark.skipif(AIPERF is None, reason="aiperf is not installed (pip install aiperf, or set SAGUARO_AIPERF "
                                            "to its binary); see clients/README.md")
def test_aiperf_profiles_the_openai_endpoint_without_errors(front, tmp_path):
    out = subprocess.run([AIPERF, "profile", "--model", "ensemble", "--url", f"http://127.0.0.1:{front.port}",
                          "--endpoint-type", "completions", "--streaming", "--tokenizer", str(DEMO_TARGET),
                          "--concurrency", "2", "--request-count", "6", "--synthetic-input-tokens-mean", "64",
                          "--output-tokens-mean", "16", "--ui-type", "none", "--artifact-dir", str(tmp_path)],
                         check=False, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    export = json.loads(next(tmp_path.rglob("profile_export_aiperf.json")).read_text())
    assert export["request_count"]["avg"] == 6 and not export.get("error_summary")
