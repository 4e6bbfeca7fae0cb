"""The HTTP front of saguaro.serve before a real tritonserver: request bodies Triton 2.51 would
crash on or answer 500 to get a 400/413 naming the problem, and everything else (generate, SSE
streams, health) passes through unchanged."""
from __future__ import annotations

import json
import urllib.error
import urllib.request

import pytest

from saguaro.http_front import MAX_DEPTH, HttpFront, check_json
from saguaro.tritonserver_process import free_port
from test_serving import PROMPTS

DEEP = b"[" * 50_000 + b"]" * 50_000       # 100 KB that crashes tritonserver 2.51 (recursive parser)


def test_check_json():
    assert check_json(b'{"text_input": "x", "max_tokens": 4}', None) is None
    assert check_json(b"", None) is None
    assert "malformed" in check_json(b'{"text_input": ', None)
    assert "deeper" in check_json(DEEP, None)
    assert "deeper" in check_json(b"[" * (MAX_DEPTH + 1) + b"]" * (MAX_DEPTH + 1), None)
    assert check_json(b"[" * MAX_DEPTH + b"]" * MAX_DEPTH, None) is None
    assert check_json(b'{"inputs": []}\x00\x01binary', "14") is None            # binary tensor extension
    assert "Inference-Header-Content-Length" in check_json(b"{}", "99")


@pytest.fixture(scope="module")
def front(serving):
    f = HttpFront("127.0.0.1", free_port(), serving.http_url).start()
    yield f"127.0.0.1:{f.port}"
    f.stop()


def post(url: str, body: bytes) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.mark.parametrize("body,code,words", [
    (b'{"text_input": "def f', 400, "malformed JSON"),
    (b"not json at all", 400, "malformed JSON"),
    (DEEP, 400, "nested deeper"),
    (b'{"text_input": "' + b"x" * 10_000_000 + b'"}', 413, "above the limit"),   # kills tritonserver 2.51
])
def test_bodies_triton_must_not_see_get_a_clear_error_and_the_server_keeps_serving(front, serving, reference,
                                                                                  body, code, words):
    status, text = post(f"http://{front}/v2/models/ensemble/generate", body)
    assert status == code and words in json.loads(text)["error"], (status, text[:200])
    with urllib.request.urlopen(f"http://{front}/v2/health/ready", timeout=10) as r:
        assert r.status == 200
    assert serving.proc.poll() is None


def test_generate_and_sse_pass_through_unchanged(front, reference):
    body = json.dumps({"text_input": PROMPTS[3], "max_tokens": 24, "exclude_input_in_output": True}).encode()
    status, text = post(f"http://{front}/v2/models/ensemble/generate", body)
    assert status == 200 and json.loads(text)["text_output"] == reference(PROMPTS[3], 24)
    req = urllib.request.Request(f"http://{front}/v2/models/ensemble/generate_stream", method="POST",
                                 data=json.dumps({"text_input": PROMPTS[3], "max_tokens": 24, "stream": True}).encode())
    with urllib.request.urlopen(req, timeout=60) as r:
        assert r.headers["Content-Type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in r.read().decode().splitlines() if line.startswith("data:")]
    assert len(events) > 1 and "".join(e["text_output"] for e in events) == reference(PROMPTS[3], 24)
    status, text = post(f"http://{front}/v2/models/ensemble/generate", b'{"max_tokens": 4}')   # Triton's own errors too
    assert status == 400 and "text_input" in json.loads(text)["error"]
