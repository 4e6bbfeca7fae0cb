"""The client examples and the perf_analyzer sweep against the real server (`triton` fixture, conftest.py).

Every client must return the same greedy text for a prompt: gRPC streaming, HTTP generate, HTTP
generate_stream (SSE), the asyncio client, each decoding mode, and the library's own greedy output
the library's own greedy output (`reference` fixture, conftest.py). perf_analyzer then
runs a few seconds at concurrency 1 and 2 with zero errors and the sweep writes its report.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the repo root holds clients/

import tritonclient.grpc as grpcclient  # noqa: E402

from clients.async_load import run_load, summarize  # noqa: E402
from clients.common import (  # noqa: E402
    DEFAULT_PROMPTS_FILE, TOTALS, ClientError, GenerateRequest, Generation, check_ready, load_prompts,
)
from clients.grpc_stream import stream_generate  # noqa: E402
from clients.http_generate import generate, generate_stream  # noqa: E402

PROMPT = "def fibonacci(n):\n"
PROMPTS = ["def fibonacci(n):\n", "class Stack:\n    def __init__(self):\n", "import os\n\ndef list_files(path):\n"]
MAX_TOKENS = 24


@pytest.fixture(scope="module")
def server(serving: Any) -> Any:
    return serving


@pytest.fixture(scope="module")
def shapes(server: Any) -> dict[str, list[int]]:
    return check_ready(server.grpc_url, "ensemble", "grpc")


@pytest.fixture(scope="module")
def grpc_client(server: Any) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    yield client
    client.close()


def assert_totals(gen: Generation, mode: str = "ssd") -> None:
    assert set(TOTALS) <= set(gen.totals), f"missing totals: {set(TOTALS) - set(gen.totals)}"
    t = gen.totals
    assert 0 < t["generated_tokens"] <= MAX_TOKENS and t["rounds"] > 0
    assert 0 <= t["accepted_tokens"] <= t["drafted_tokens"] and 0 <= t["cache_hits"] <= t["rounds"]
    if mode == "ar":
        assert t["drafted_tokens"] == 0 and t["cache_hits"] == 0
    elif mode == "sd":
        assert t["drafted_tokens"] > 0
    # ssd: the round policy may run AR rounds when they are faster (test_serving pins K to see drafting)


def test_all_clients_return_the_same_greedy_text(server: Any, shapes: dict[str, list[int]], reference: Any,
                                                 grpc_client: grpcclient.InferenceServerClient) -> None:
    req = GenerateRequest(PROMPT, max_tokens=MAX_TOKENS)
    seen: list[str] = []
    streamed = stream_generate(grpc_client, req, shapes=shapes, on_piece=seen.append)
    assert streamed.text and len(streamed.pieces) > 1, "gRPC response was not streamed in pieces"
    assert "".join(seen) == streamed.text
    assert_totals(streamed)

    whole = generate(server.http_url, req)
    assert whole.text == streamed.text
    assert_totals(whole)

    sse = generate_stream(server.http_url, req)
    assert len(sse.pieces) > 1 and sse.text == streamed.text
    assert sse.totals["generated_tokens"] == streamed.totals["generated_tokens"]  # hits may vary with timing
    assert streamed.text == reference(PROMPT, MAX_TOKENS)


@pytest.mark.parametrize("mode", ["sd", "ar"])
def test_every_decoding_mode_streams_the_same_text(grpc_client: grpcclient.InferenceServerClient,
                                                   shapes: dict[str, list[int]], mode: str) -> None:
    ssd = stream_generate(grpc_client, GenerateRequest(PROMPT, max_tokens=MAX_TOKENS), shapes=shapes)
    other = stream_generate(grpc_client, GenerateRequest(PROMPT, max_tokens=MAX_TOKENS, decoding_mode=mode),
                            shapes=shapes)
    assert other.text == ssd.text
    assert_totals(other, mode)


def test_async_client_concurrent_requests_match_sequential(server: Any, shapes: dict[str, list[int]],
                                                           grpc_client: grpcclient.InferenceServerClient) -> None:
    reqs = [GenerateRequest(p, max_tokens=MAX_TOKENS) for p in PROMPTS]
    alone = [stream_generate(grpc_client, r, shapes=shapes).text for r in reqs]
    gens, wall_s = asyncio.run(run_load(server.grpc_url, reqs, concurrency=len(reqs), shapes=shapes, verbose=False))
    assert [g.text for g in gens] == alone
    for g in gens:
        assert_totals(g)
        assert g.ttft_s is not None and 0 < g.ttft_s <= g.latency_s
    s = summarize(gens, wall_s)
    assert s["tokens_per_s"] > 0 and s["ttft_p50_ms"] <= s["latency_p99_ms"] and "itl_p50_ms" in s


def test_server_error_reaches_the_client(server: Any, shapes: dict[str, list[int]],
                                         grpc_client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(ClientError, match="decoding_mode"):
        stream_generate(grpc_client, GenerateRequest(PROMPT, max_tokens=4, decoding_mode="bogus"), shapes=shapes)
    with pytest.raises(ClientError, match="decoding_mode"):
        generate(server.http_url, GenerateRequest(PROMPT, max_tokens=4, decoding_mode="bogus"))
    with pytest.raises(ClientError, match="model 'no_such_model' is not ready"):
        check_ready(server.grpc_url, "no_such_model", "grpc")


@pytest.mark.parametrize("script,url_attr,extra", [
    ("grpc_stream.py", "grpc_url", []),
    ("http_generate.py", "http_url", []),
    ("http_generate.py", "http_url", ["--stream"]),
    ("async_load.py", "grpc_url", ["--concurrency", "2", "--requests", "2"]),
])
def test_client_scripts_run_as_documented(server: Any, script: str, url_attr: str, extra: list[str]) -> None:
    ref = generate(server.http_url, GenerateRequest(PROMPT, max_tokens=MAX_TOKENS))
    out = subprocess.run([sys.executable, str(ROOT / "clients" / script), "--url", getattr(server, url_attr),
                          "--prompt", PROMPT, "--max-tokens", str(MAX_TOKENS), *extra],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    if script == "async_load.py":
        assert "ttft" in out.stdout and "p99" in out.stdout
    else:
        assert ref.text in out.stdout and "generated_tokens=" in out.stdout


@pytest.mark.parametrize("script", ["grpc_stream.py", "http_generate.py", "async_load.py"])
def test_client_scripts_say_how_to_start_the_server(script: str) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        url = f"127.0.0.1:{s.getsockname()[1]}"
    out = subprocess.run([sys.executable, str(ROOT / "clients" / script), "--url", url],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert f"cannot reach Triton at {url}" in out.stderr and "python -m saguaro.serve" in out.stderr


def test_perf_analyzer_wrapper_runs() -> None:
    out = subprocess.run([str(ROOT / "clients" / "perf" / "perf_analyzer.sh"), "--version"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Perf Analyzer Version 2.51.0" in out.stdout + out.stderr  # it prints the version on stderr


def test_perf_analyzer_sweep_and_report(server: Any, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    run = subprocess.run([sys.executable, str(ROOT / "clients" / "perf" / "sweep.py"), "--url", server.grpc_url,
                          "--metrics-url", server.metrics_url, "--modes", "ssd,sd", "--concurrency", "1,2",
                          "--num-prompts", "2", "--max-tokens", "16", "--out", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "[4/4] sd concurrency 2:" in run.stdout  # progress lines
    rows = json.loads((out / "rows.json").read_text())
    assert {(r["mode"], r["concurrency"]) for r in rows} == {("ssd", 1), ("ssd", 2), ("sd", 1), ("sd", 2)}
    for r in rows:
        # prompts x concurrency requests: each perf_analyzer thread decodes each prompt once
        assert r["errors"] == 0 and r["requests"] == 2 * r["concurrency"]
        assert r["tokens_per_s"] and r["latency_p50_ms"] and r["ttft_p50_ms"] is not None
        assert 0.0 < r["held"] <= 1.0
    for c in (1, 2):
        sent = [req["request_inputs"]["text_input"] for req in json.loads((out / f"ssd_c{c}.json").read_text())["experiments"][0]["requests"]]
        assert sorted(sent) == sorted(load_prompts(DEFAULT_PROMPTS_FILE)[:2] * c), "every prompt, once per thread"
    for c in (1, 2):
        deltas = json.loads((out / f"ssd_c{c}.metrics.json").read_text())
        assert deltas.get("nv_inference_request_failure", 0) == 0
        assert any(k.startswith("saguaro_") and v > 0 for k, v in deltas.items()), "no saguaro_* counter moved"
    report = (out / "report.md").read_text()
    assert report.count("\n| ssd |") == 2 and report.count("\n| sd |") == 2
    assert "ssd" in report and ("disappears" in report or "stays ahead" in report or "not faster" in report)
    assert (out / "report.png").stat().st_size > 10_000
