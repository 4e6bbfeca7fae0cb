"""Processes dying under load, on a real tritonserver: a killed engine stub is found and reloaded
(its model reports not ready meanwhile), requests in flight end with a retryable error or, when
only the draft died, finish exactly on the target alone; a killed `ssd` stub ends the requests the
relays hold for it with a retryable error; service and speculation come back with no manual step; `saguaro.serve` starts a killed tritonserver again and stops within 5 s on SIGTERM."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import tritonclient.grpc as grpcclient

import conftest
from conftest import SERVING_MODELS
from saguaro.config import DEMO_TARGET
from saguaro.http_front import HttpFront
from saguaro.openai_front import OpenAIFront, scalar
from saguaro.supervisor import stub_processes
from saguaro.tritonserver_process import TritonServer, free_port
from test_serving import PROMPTS, decoding, grpc_inputs, stream, wait_slots_free

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from soak import server_pid, wait_ready  # noqa: E402

RECOVERY_S = 30


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("supervised")
    with TritonServer(conftest.test_repository(root), http_port=0, grpc_port=0, metrics_port=0, models=list(SERVING_MODELS),
                      log_path=root / "server.log") as srv:
        yield srv


def ready(server, model: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/models/{model}/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def kill_stub(server, model: str) -> None:
    pid = next(p for p, m in stub_processes(server.proc.pid).items() if m == model)
    os.kill(pid, signal.SIGKILL)


def streams_in_background(server, n: int, max_tokens: int, model: str = "ssd") -> tuple[list[dict], list[threading.Thread]]:
    results: list[dict] = [{} for _ in range(n)]

    def run(i):
        results[i] = stream(server, model, {"text_input": PROMPTS[i], "max_tokens": max_tokens, "stream": True},
                            timeout_s=RECOVERY_S)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    return results, threads


def watch_not_ready(server, model: str, stop: threading.Event, seen: list) -> threading.Thread:
    def run():
        while not stop.is_set():
            if not ready(server, model):
                seen.append(time.monotonic())
            time.sleep(0.05)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def serve_again(server, reference, t0: float, **fields) -> dict:
    while True:
        out = stream(server, "ensemble", {"text_input": PROMPTS[7], "max_tokens": 24, "stream": True, **fields})
        if out["error"] is None:
            assert out["text"] == reference(PROMPTS[7], 24)
            return out
        assert "retry" in out["error"] or "unavailable" in out["error"].lower(), out["error"]
        assert time.monotonic() - t0 < RECOVERY_S, f"not serving {RECOVERY_S} s after the kill: {out['error']}"
        time.sleep(0.5)


def ended_soon(threads: list[threading.Thread]) -> float:
    """Waits for the requests in flight at a kill (now) to end: within 5 s. Returns the kill's time."""
    t0 = time.monotonic()
    for t in threads:
        t.join(RECOVERY_S)
    assert all(not t.is_alive() for t in threads), "a request in flight was left hanging"
    assert time.monotonic() - t0 < 5, "what it held took more than 5 s to notice"
    return t0


def test_killed_target_fails_in_flight_requests_retryably_and_comes_back(server, reference):
    results, threads = streams_in_background(server, 3, 250)
    decoding(server, 3)
    stop, not_ready = threading.Event(), []
    watcher = watch_not_ready(server, "target", stop, not_ready)
    kill_stub(server, "target")
    t0 = time.monotonic()
    for t in threads:
        t.join(RECOVERY_S)
    assert all(not t.is_alive() for t in threads), "a request in flight was left hanging"
    for r in results:
        assert r["error"] is not None and "retry" in r["error"] and "target" in r["error"], r
    serve_again(server, reference, t0)
    assert time.monotonic() - t0 < RECOVERY_S
    stop.set()
    watcher.join()
    assert not_ready, "the target model never reported not ready while it was restarted"
    assert ready(server, "target")
    wait_slots_free(server)


def test_killed_draft_degrades_exactly_and_speculation_comes_back(server, reference):
    results, threads = streams_in_background(server, 3, 250)   # (at 120 a fast host could finish
    decoding(server, 3)                                          # them before all three were seen)
    kill_stub(server, "draft")
    t0 = time.monotonic()
    for t in threads:
        t.join(RECOVERY_S)
    for i, r in enumerate(results):
        assert r["error"] is None, r["error"]
        assert r["text"] == reference(PROMPTS[i], 250)      # finished on the target alone, exactly
    while True:     # K pinned: every round drafts once the draft is back (the policy may pick AR rounds)
        out = serve_again(server, reference, t0, num_draft_tokens=2)
        if out["totals"]["drafted_tokens"] > 0:
            break
        assert time.monotonic() - t0 < RECOVERY_S, "speculation did not come back"
        time.sleep(0.5)
    wait_slots_free(server)


def test_killed_ssd_ends_the_relayed_requests_retryably_and_comes_back(server, reference):
    # Triton 2.51 ends none of a dead stub's requests: the relays notice the stub died
    results, threads = streams_in_background(server, 2, 250, model="ensemble")
    unary: dict = {}

    def infer_sync():
        client = grpcclient.InferenceServerClient(server.grpc_url)
        inputs = grpc_inputs({"text_input": PROMPTS[2], "max_tokens": 250}, batched=True)
        try:
            client.infer("ensemble_sync", inputs, client_timeout=RECOVERY_S)
            unary["error"] = None
        except Exception as e:
            unary["error"] = str(e)
    threads.append(threading.Thread(target=infer_sync))
    threads[-1].start()
    decoding(server, 3)
    kill_stub(server, "ssd")
    t0 = ended_soon(threads)
    for error in [r["error"] for r in results] + [unary["error"]]:
        assert error is not None and "retry" in error and "'ssd'" in error, error
    serve_again(server, reference, t0)
    out = stream(server, "ensemble", {"text_input": PROMPTS[3], "max_tokens": 24, "stream": True})
    assert out["error"] is None and out["text"] == reference(PROMPTS[3], 24)
    wait_slots_free(server)


def http_stream(url: str, body: dict, timeout_s: float = RECOVERY_S) -> dict:
    """A streamed HTTP request (generate_stream, or an OpenAI completion with stream): its status, the
    `data:` payloads it got (parsed, but [DONE]) and the body of a refusal."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            events = [json.loads(line[5:]) for line in r if line.startswith(b"data:") and line[5:].strip() != b"[DONE]"]
            return {"status": r.status, "events": events}
    except urllib.error.HTTPError as e:
        return {"status": e.code, "body": e.read().decode()}
    except OSError as e:
        return {"status": None, "body": str(e)}


def test_a_killed_relay_stub_ends_the_http_and_openai_requests_it_held(server, reference):
    # Triton 2.51 never answers again a request whose model's stub died: when the `ensemble` stub
    # dies (no relay of ours is left to notice), the HTTP front and the OpenAI front end what they hold
    fronts = [HttpFront("127.0.0.1", free_port(), server.http_url, stub_deaths=server.stub_deaths).start(),
              OpenAIFront("127.0.0.1", free_port(), server.http_url, DEMO_TARGET, stub_deaths=server.stub_deaths).start()]
    http, openai = (f"http://127.0.0.1:{f.port}" for f in fronts)
    calls = [(f"{http}/v2/models/ensemble/generate_stream", {"text_input": PROMPTS[0], "max_tokens": 250, "stream": True}),
             (f"{openai}/v1/completions", {"model": "ensemble", "prompt": PROMPTS[1], "max_tokens": 250, "stream": True}),
             (f"{openai}/v1/completions", {"model": "ensemble", "prompt": PROMPTS[2], "max_tokens": 250})]
    results: list[dict] = [{} for _ in calls]

    def run(i):
        results[i] = http_stream(*calls[i])
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    try:
        for t in threads:
            t.start()
        decoding(server, 3)
        kill_stub(server, "ensemble")
        t0 = ended_soon(threads)
        streamed_http, streamed_openai, whole = results
        for r in (streamed_http, streamed_openai):      # streams under way: an error event ends each
            assert r["status"] == 200 and r["events"], r
            error = r["events"][-1]["error"]
            assert "'ensemble' model restarted" in (error if isinstance(error, str) else error["message"]), r
        assert whole["status"] == 503 and "'ensemble' model restarted" in whole["body"], whole
        # the supervisor reloads it, and `ssd`, which answered its calls (Triton 2.51 gives such a
        # model no more requests); meanwhile gRPC clients read Triton's "unknown model", ours a 503
        while not all(ready(server, m) for m in ("ensemble", "ssd")):
            assert time.monotonic() - t0 < RECOVERY_S
            time.sleep(0.2)
        again = http_stream(f"{openai}/v1/completions", {"model": "ensemble", "prompt": PROMPTS[3], "max_tokens": 16,
                                                          "stream": True})
        assert again["status"] == 200, again
        assert "".join(e["choices"][0]["text"] for e in again["events"] if e.get("choices")) == reference(PROMPTS[3], 16)
        again = http_stream(f"{http}/v2/models/ensemble/generate_stream", {"text_input": PROMPTS[3], "max_tokens": 16,
                                                                         "stream": True})
        assert again["status"] == 200, again
        assert "".join(scalar(e["text_output"]) for e in again["events"]) == reference(PROMPTS[3], 16)
        wait_slots_free(server, 60)
    finally:
        for f in fronts:
            f.stop()


def test_serve_restarts_a_killed_tritonserver_and_stops_within_5_s(tmp_path, reference):
    ports = [free_port() for _ in range(4)]
    http_url = f"127.0.0.1:{ports[0]}"
    proc = subprocess.Popen([sys.executable, "-m", "saguaro.serve", "--model-repository", str(conftest.test_repository(tmp_path)),
                             "--http-port", str(ports[0]), "--grpc-port", str(ports[1]), "--metrics-port", str(ports[2]),
                             "--openai-port", str(ports[3])],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()

    class Srv:                     # what stream() needs
        grpc_url = f"127.0.0.1:{ports[1]}"

    try:
        assert wait_ready(http_url, 300), "".join(lines)
        deadline = time.monotonic() + 60           # serve has finished starting (a crash before that
        while not any("saguaro: serving" in line for line in lines):   # is a failed start: serve exits 2)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        first = server_pid(proc.pid)
        os.kill(first, signal.SIGKILL)
        t0 = time.monotonic()
        time.sleep(1)
        assert wait_ready(http_url, 120), "".join(lines)
        assert server_pid(proc.pid) != first
        out = stream(Srv, "ensemble", {"text_input": PROMPTS[2], "max_tokens": 16, "stream": True})
        assert out["error"] is None and out["text"] == reference(PROMPTS[2], 16)
        assert time.monotonic() - t0 < 90
        # SIGTERM under load: every client gets its text or a clear error, the server is gone within 5 s
        results, threads = streams_in_background(Srv, 4, 240)
        time.sleep(1.0)
        second = server_pid(proc.pid)
        proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        proc.wait(10)
        assert time.monotonic() - t0 < 5.0, "".join(lines[-30:])
        for t in threads:
            t.join(30)
        for r in results:
            assert r.get("error") is None or "shut" in r["error"] or "unavailable" in r["error"].lower() \
                or "Socket closed" in r["error"], r
        assert not Path(f"/proc/{second}").exists()
        assert not any(stub_processes(second))
    finally:
        if proc.poll() is None:
            proc.kill()
