#!/usr/bin/env python3
"""Soak test: N minutes at concurrency C of mixed requests against a real server.

    .venv/bin/python scripts/soak.py --minutes 10 --concurrency 8 --faults

Starts `python -m saguaro.serve` on free 127.0.0.1 ports (or uses --url HOST:GRPC_PORT with
--metrics-url), then C client threads send, in random mix: greedy streams in each decoding mode
(checked token for token against the first answer for the same prompt), sampled streams, unary
requests, streams cancelled after a few pieces (through `ssd` and through `ensemble`), streams
whose client disconnects, and bad inputs (which must get an error naming the field). With
--faults (own server only) it kills with SIGKILL, in turn, the draft stub, the target stub and
tritonserver itself, spread over the run.

Every report interval it prints: sent, ok, cancelled, errors by message, tokens/s, RSS per process,
KV slots in use. It exits non-zero on any lost request (no final answer or error within
--request-timeout), a greedy output that differs, a KV slot still held after the run, or a
resident-memory growth of the server's processes over --max-rss-growth between the end of the
first interval and the end of the run. The server's own output goes to SOAK_SERVER_LOG (a file)
when set; otherwise its last lines are shown when the soak fails or the server exits before it
is ready (the soak stops waiting then).
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import queue
import random
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "backend"))

from saguaro.supervisor import stub_processes  # noqa: E402
from saguaro.tritonserver_process import free_port  # noqa: E402

PROMPTS = [json.loads(line)["prompt"] for line in (ROOT / "prompts" / "dev.jsonl").read_text().splitlines()]
KINDS = {                    # kind -> weight
    "greedy": 30, "sampled": 12, "unary": 8, "cancel-ssd": 8, "cancel-ensemble": 4, "disconnect": 6, "bad": 6,
}
BAD = [({"temperature": float("nan")}, "temperature"), ({"text_input": ""}, "text_input"),
       ({"max_tokens": 0}, "max_tokens"), ({"decoding_mode": "turbo"}, "decoding_mode"),
       ({"top_p": 2.0}, "top_p"), ({"end_id": -4}, "end_id")]
DTYPES = {"text_input": ("BYTES", object), "max_tokens": ("INT32", np.int32), "stream": ("BOOL", bool),
          "temperature": ("FP32", np.float32), "top_p": ("FP32", np.float32), "seed": ("UINT64", np.uint64),
          "decoding_mode": ("BYTES", object), "end_id": ("INT32", np.int32),
          "exclude_input_in_output": ("BOOL", bool)}
RETRYABLE = re.compile(r"retry|unavailable|shut|Socket closed|failed to connect|Connection refused|unknown model|"
                       r"no available versions|not ready|Broken pipe|GOAWAY|UNAVAILABLE", re.I)


@dataclass
class Stats:
    sent: int = 0
    ok: int = 0
    cancelled: int = 0
    rejected: int = 0              # bad inputs refused, as they must be
    tokens: int = 0
    errors: collections.Counter = field(default_factory=collections.Counter)
    lost: list[str] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)

    def add_error(self, message: str) -> None:
        self.errors[re.sub(r"\d+", "N", message.strip().splitlines()[0])[:140]] += 1


class Soak:
    def __init__(self, args):
        self.args, self.stats, self.lock = args, Stats(), threading.Lock()
        self.reference: dict[tuple[str, int], str] = {}
        self.stop = threading.Event()
        self.rng = random.Random(args.seed)

    # -- one request ----------------------------------------------------------------------------
    def inputs(self, fields: dict, model: str) -> list:
        """The request's tensors: [1, 1] for `ensemble` (NVIDIA's batched shapes), [1] for `ssd`."""
        shape = [1] if model == "ssd" else [1, 1]
        out = []
        for name, value in fields.items():
            dt, np_dtype = DTYPES[name]
            arr = np.array([value.encode() if isinstance(value, str) else value], dtype=np_dtype).reshape(shape)
            t = grpcclient.InferInput(name, shape, dt)
            t.set_data_from_numpy(arr)
            out.append(t)
        return out

    def request(self, rng: random.Random) -> None:
        kind = rng.choices(list(KINDS), weights=list(KINDS.values()))[0]
        prompt = rng.choice(PROMPTS[:12])
        max_tokens = rng.choice([16, 32, 64])
        fields = {"text_input": prompt, "max_tokens": max_tokens, "stream": True}
        model, cancel_after, disconnect, expect_error = "ensemble", None, False, None
        if kind == "greedy":
            fields["decoding_mode"] = rng.choice(["ssd", "ssd", "sd", "ar"])
        elif kind == "sampled":
            # top_p: NVIDIA's rule samples only with top_k or top_p set (temperature alone is greedy)
            fields.update(temperature=0.7, top_p=1.0, seed=rng.randrange(1 << 30))
        elif kind == "unary":
            fields.update(stream=False, exclude_input_in_output=True)   # the completion alone, as streamed
        elif kind.startswith("cancel"):
            model, cancel_after = ("ssd" if kind == "cancel-ssd" else "ensemble"), rng.randint(1, 3)
            fields["max_tokens"] = 200
        elif kind == "disconnect":
            disconnect, fields["max_tokens"] = True, 200
        else:
            change, expect_error = rng.choice(BAD)
            fields.update(change)
        with self.lock:
            self.stats.sent += 1
        try:
            self._send(kind, model, fields, cancel_after, disconnect, expect_error)
        except Exception as e:     # a client-side failure is an error too
            with self.lock:
                self.stats.add_error(f"client: {type(e).__name__}: {e}")

    def _send(self, kind, model, fields, cancel_after, disconnect, expect_error) -> None:
        q: queue.Queue = queue.Queue()
        client = grpcclient.InferenceServerClient(self.args.url)
        client.start_stream(callback=lambda result, error: q.put((result, error)))
        pieces, error = [], None
        try:
            client.async_stream_infer(model, self.inputs(fields, model), enable_empty_final_response=True)
            while True:
                try:
                    result, error = q.get(timeout=self.args.request_timeout)
                except queue.Empty:
                    with self.lock:
                        self.stats.lost.append(f"{kind}: no answer within {self.args.request_timeout} s")
                    return
                if error is not None:
                    break
                text = result.as_numpy("text_output")
                if text is not None and text.size:
                    pieces.append(text.reshape(-1)[0].decode())
                if disconnect and len(pieces) >= 2:
                    client.close()             # gone without a word
                    with self.lock:
                        self.stats.cancelled += 1
                    return
                if cancel_after is not None and len(pieces) >= cancel_after:
                    client.stop_stream(cancel_requests=True)
                    with self.lock:
                        self.stats.cancelled += 1
                    return
                if result.get_response().parameters["triton_final_response"].bool_param:
                    break
        finally:
            try:
                client.stop_stream()
                client.close()
            except Exception:
                pass
        with self.lock:
            if expect_error is not None:
                if error is not None and expect_error in str(error):
                    self.stats.rejected += 1
                elif error is not None:
                    self.stats.add_error(str(error))
                else:
                    self.stats.mismatches.append(f"bad input {expect_error} was accepted")
                return
            if error is not None:
                self.stats.add_error(str(error))
                return
            self.stats.ok += 1
            text = "".join(pieces)
            self.stats.tokens += fields["max_tokens"]
            if kind == "greedy" or (kind == "unary" and "temperature" not in fields):
                key = (fields["text_input"], fields["max_tokens"])
                ref = self.reference.setdefault(key, text)
                if ref != text:
                    self.stats.mismatches.append(f"greedy {fields.get('decoding_mode', 'ssd')} output differs for "
                                                 f"{key[0][:30]!r}")

    def worker(self, i: int) -> None:
        rng = random.Random(self.args.seed * 1000 + i)
        while not self.stop.is_set():
            errors = sum(self.stats.errors.values())
            self.request(rng)
            if sum(self.stats.errors.values()) > errors:
                time.sleep(0.5)    # back off after an error, as a client would (the server may be down)


# -- the server under test ----------------------------------------------------------------------

def rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def server_pid(serve_pid: int) -> int | None:
    out = subprocess.run(["pgrep", "-P", str(serve_pid), "-f", "tritonserver"], capture_output=True, text=True).stdout
    return int(out.split()[0]) if out.split() else None


def processes(serve_pid: int | None) -> dict[str, float]:
    """name -> RSS MiB of tritonserver and each stub (by model)."""
    if serve_pid is None:
        return {}
    pid = server_pid(serve_pid)
    if pid is None:
        return {}
    out = {"tritonserver": rss_mb(pid)}
    for stub, model in stub_processes(pid).items():
        if model:
            out[model] = out.get(model, 0.0) + rss_mb(stub)
    return out


def slots(metrics_url: str) -> dict[str, float]:
    try:
        text = urllib.request.urlopen(metrics_url, timeout=5).read().decode()
    except OSError:
        return {}
    return {m.group(1): float(m.group(2)) for m in
            re.finditer(r'^saguaro_(kv_slots_in_use\{engine="\w+"\}|active_sequences) (\S+)$', text, re.M)}


def wait_ready(http_url: str, timeout_s: float, proc: subprocess.Popen | None = None) -> bool:
    """Whether the server answers ready within timeout_s; False at once when proc (the server
    started for the soak) exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (proc is None or proc.poll() is None):
        try:
            with urllib.request.urlopen(f"http://{http_url}/v2/health/ready", timeout=2):
                return True
        except OSError:
            time.sleep(0.5)
    return False


def show_log(path: str, lines: int = 40) -> None:
    """The end of the server's output (a tritonserver crash: "Signal (11) received" and its frames)."""
    tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
    print(f"soak: the server's log ({path}), its last {len(tail)} lines:", *("    " + t for t in tail), sep="\n", flush=True)


def kill_stub(serve_pid: int, model: str) -> str:
    pid = server_pid(serve_pid)
    stubs = {m: p for p, m in stub_processes(pid).items() if m} if pid else {}
    if model == "tritonserver":
        os.kill(pid, signal.SIGKILL)
        return f"killed tritonserver (pid {pid})"
    os.kill(stubs[model], signal.SIGKILL)
    return f"killed the {model} stub (pid {stubs[model]})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--faults", action="store_true", help="kill -9 the draft stub, the target stub and tritonserver")
    ap.add_argument("--url", default=None, help="gRPC HOST:PORT of a running server (default: start one)")
    ap.add_argument("--metrics-url", default=None, help="its metrics URL (with --url)")
    ap.add_argument("--report-s", type=float, default=60.0, help="seconds between report lines")
    ap.add_argument("--request-timeout", type=float, default=120.0, help="a request unanswered this long is lost")
    ap.add_argument("--max-rss-growth", type=float, default=0.10)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    if args.faults and args.url:
        ap.error("--faults needs the soak's own server (leave out --url)")

    serve = None
    if args.url is None:
        ports = [free_port() for _ in range(4)]
        args.url, http_url = f"127.0.0.1:{ports[1]}", f"127.0.0.1:{ports[0]}"
        args.metrics_url = f"http://127.0.0.1:{ports[2]}/metrics"
        # the server's output, kept where SOAK_SERVER_LOG says; else shown in part if the soak fails
        log_path = keep_log = os.environ.get("SOAK_SERVER_LOG")
        if not keep_log:
            fd, log_path = tempfile.mkstemp(prefix="soak-server-", suffix=".log")
            os.close(fd)
        log = open(log_path, "w")
        serve = subprocess.Popen([sys.executable, "-m", "saguaro.serve", "--http-port", str(ports[0]), "--grpc-port",
                                  str(ports[1]), "--metrics-port", str(ports[2]), "--openai-port", str(ports[3])],
                                 stdout=log, stderr=log)
        print(f"soak: starting saguaro.serve (pid {serve.pid}) on {http_url}", flush=True)
        if not wait_ready(http_url, 600, serve):
            rc = serve.poll()
            print(f"soak: the server {'exited (rc %d)' % rc if rc is not None else 'did not become ready'}", flush=True)
            serve.kill()
            show_log(log_path)
            return 2
    soak = Soak(args)
    threads = [threading.Thread(target=soak.worker, args=(i,), daemon=True) for i in range(args.concurrency)]
    faults = ["draft", "target", "tritonserver"] if args.faults else []
    fault_times = [args.minutes * 60 * (i + 1) / (len(faults) + 1) for i in range(len(faults))]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    baseline_rss, last, last_tokens, failed = None, t0, 0, []
    print(f"soak: {args.minutes:g} min, concurrency {args.concurrency}, faults: {', '.join(faults) or 'none'}", flush=True)
    try:
        while time.monotonic() - t0 < args.minutes * 60:
            time.sleep(0.5)
            now = time.monotonic()
            if faults and now - t0 >= fault_times[0]:
                fault_times.pop(0)
                print(f"soak: {now - t0:6.0f}s  {kill_stub(serve.pid, faults.pop(0))}", flush=True)
            if now - last >= args.report_s:
                with soak.lock:
                    s = soak.stats
                    line = (f"soak: {now - t0:6.0f}s  sent {s.sent}  ok {s.ok}  cancelled {s.cancelled}  rejected "
                            f"{s.rejected}  errors {sum(s.errors.values())}  lost {len(s.lost)}  "
                            f"{(s.tokens - last_tokens) / (now - last):.0f} tok/s")
                    errors, last_tokens = dict(s.errors), s.tokens
                procs = processes(serve.pid if serve else None)
                baseline_rss = baseline_rss or sum(procs.values())
                print(line, flush=True)
                print("      rss MiB  " + "  ".join(f"{k} {v:.0f}" for k, v in sorted(procs.items())), flush=True)
                print("      slots    " + "  ".join(f"{k} {v:g}" for k, v in sorted(slots(args.metrics_url).items())),
                      flush=True)
                for msg, n in sorted(errors.items(), key=lambda kv: -kv[1]):
                    print(f"      error x{n}: {msg}", flush=True)
                last = now
    finally:
        soak.stop.set()
        for t in threads:
            t.join(args.request_timeout + 10)
        # the end: slots free, memory, what was lost or wrong
        deadline, held = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            held = {k: v for k, v in slots(args.metrics_url).items() if v}
            if not held:
                break
            time.sleep(1)
        procs = processes(serve.pid if serve else None)
        s = soak.stats
        print(f"soak: done in {time.monotonic() - t0:.0f}s  sent {s.sent}  ok {s.ok}  cancelled {s.cancelled}  "
              f"rejected {s.rejected}  errors {sum(s.errors.values())}  lost {len(s.lost)}  "
              f"greedy mismatches {len(s.mismatches)}", flush=True)
        for msg, n in sorted(s.errors.items(), key=lambda kv: -kv[1]):
            print(f"      error x{n}: {msg}", flush=True)
        unexpected = {m: n for m, n in s.errors.items() if not RETRYABLE.search(m)}
        if s.lost:
            failed.append(f"{len(s.lost)} requests lost: {s.lost[:3]}")
        if s.mismatches:
            failed.append(f"{len(s.mismatches)} wrong answers: {s.mismatches[:3]}")
        if unexpected and not args.faults:
            failed.append(f"{sum(unexpected.values())} errors that are neither bad input nor retryable: "
                          f"{list(unexpected)[:3]}")
        if held:
            failed.append(f"slots still held after the run: {held}")
        if baseline_rss and procs:
            growth = sum(procs.values()) / baseline_rss - 1
            print(f"soak: server RSS {baseline_rss:.0f} MiB after the first interval, {sum(procs.values()):.0f} MiB "
                  f"at the end ({growth:+.1%})", flush=True)
            if growth > args.max_rss_growth:
                failed.append(f"RSS grew {growth:.1%} (limit {args.max_rss_growth:.0%})")
        if s.ok == 0:
            failed.append("no request succeeded")
        if serve is not None:
            serve.send_signal(signal.SIGTERM)
            try:
                serve.wait(30)
            except subprocess.TimeoutExpired:
                serve.kill()
    for f in failed:
        print(f"soak: FAILED: {f}", flush=True)
    if serve is not None:
        if failed:
            show_log(log_path)
        elif not keep_log:
            os.unlink(log_path)
    print("soak: PASSED" if not failed else "soak: FAILED", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
