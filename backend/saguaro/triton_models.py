"""What the model_repository's model.py files share: config parameters, tensors in and out, BLS
calls to our own models, error responses and the Prometheus metrics. Imported only inside Triton's
Python-backend stubs (pb_utils is passed in, so the rest of the package never needs it)."""
from __future__ import annotations

import collections
import json
import math
import os
import queue
import re
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, Mapping

import numpy as np

from saguaro.config import EngineConfig, SpecConfig
from saguaro.decoder import Decoder, RoundStats
from saguaro.errors import PeerUnavailable, SaguaroError, Unavailable
from saguaro.ipc import SocketServer, WireClient, connect, listen
from saguaro.private_dir import runtime_dir, same_secret, server_secret
from saguaro.messages import decode, encode
from saguaro.request_loop import ServeLimits
from saguaro.supervisor import restarted_message, stub_alive, stub_processes


class Params:
    """A model's config.pbtxt `parameters`, read as typed values: the one place the Triton models
    turn them into settings and typed configs (engine_config, spec_config, serve_limits). A value
    that is missing where there is no default, or does not parse, is a SaguaroError naming the
    model's config.pbtxt, the key, the value and what it must be; ranges are the typed configs'
    validate(). An empty value counts as left out."""

    def __init__(self, model: str, values: Mapping[str, str]):
        self.model, self.values = model, {k: v.strip() for k, v in values.items()}

    def text(self, key: str, default: str | None = None) -> str:
        value = self.values.get(key) or default
        if value is None:
            raise SaguaroError(f"{self.model}/config.pbtxt: parameter {key!r} is missing; add "
                               f'{{ key: "{key}" value: {{ string_value: "..." }} }} to its parameters')
        return value

    def integer(self, key: str, default: int | None = None) -> int:
        return self._parsed(key, default, int, "an integer")

    def number(self, key: str, default: float | None = None) -> float:
        return self._parsed(key, default, float, "a finite number")

    def optional_integer(self, key: str) -> int | None:
        return self.integer(key) if self.values.get(key) else None

    def optional_number(self, key: str) -> float | None:
        return self.number(key) if self.values.get(key) else None

    def integers(self, key: str) -> tuple[int, ...]:
        """Comma-separated integers ("0,1"); left out: none."""
        value = self.values.get(key, "")
        try:
            return tuple(int(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise self._bad(key, value, 'integers separated by commas (e.g. "0,1")') from None

    def choice(self, key: str, options: tuple[str, ...], default: str) -> str:
        value = self.text(key, default)
        if value not in options:
            raise self._bad(key, value, " or ".join(options))
        return value

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.values.get(key, "").lower()
        if value not in ("", "true", "false"):
            raise self._bad(key, self.values[key], "true or false")
        return default if not value else value == "true"

    def _parsed(self, key: str, default, parse: Callable, what: str):
        if not self.values.get(key) and default is not None:
            return default
        value = self.text(key)
        try:
            parsed = parse(value)
        except ValueError:
            parsed = math.nan
        if not math.isfinite(parsed):
            raise self._bad(key, value, what)
        return parsed

    def _bad(self, key: str, value: str, what: str) -> SaguaroError:
        return SaguaroError(f"{self.model}/config.pbtxt: parameter {key}={value!r} must be {what}")


def model_params(args: Mapping[str, str]) -> Params:
    """The model's config.pbtxt `parameters`, from initialize()'s args."""
    config: dict[str, Any] = json.loads(args["model_config"])
    return Params(config.get("name") or args.get("model_name", "model"),
                  {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()})


def sibling_params(args: Mapping[str, str], model: str) -> Params:
    """Another model's config.pbtxt parameters (the ssd model reads its engines' checkpoints)."""
    text = (Path(args["model_repository"]).resolve().parent / model / "config.pbtxt").read_text(encoding="utf-8")
    return Params(model, dict(re.findall(r'key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)))


def resolve_repo_path(value: str, args: Mapping[str, str]) -> Path:
    """A path from a config parameter: `${model_repository}` and relative paths mean the repository folder.

    Keeps the repository relocatable: "${model_repository}/../models/demo-code-target" works wherever
    the project is checked out.
    """
    # args["model_repository"] is the model's own folder (<repository>/<model name>).
    repo = Path(args["model_repository"]).resolve().parent
    value = value.replace("${model_repository}", str(repo))
    path = Path(value)
    return (path if path.is_absolute() else repo / path).resolve()


def engine_config(params: Params, args: Mapping[str, str], draft_core: int | None = None) -> EngineConfig:
    """An engine model's EngineConfig: KIND_GPU instances run on their GPU, KIND_CPU on the CPU
    (the target's forwards on its `threads` off draft_core, the core the draft is pinned to)."""
    gpu = args.get("model_instance_kind") == "GPU"
    return EngineConfig(
        checkpoint=str(resolve_repo_path(params.text("checkpoint"), args)), engine=params.text("engine", "torch"),
        device=f"cuda:{args.get('model_instance_device_id', 0)}" if gpu else "cpu", dtype=params.text("dtype", "auto"),
        max_slots=params.integer("max_slots", 16), max_seq_len=params.integer("max_seq_len", 1024),
        max_draft_len=params.integer("max_draft_len", 8), max_branches=params.integer("max_branches", 64),
        threads=params.integer("threads", 1), prefill_threads=params.integer("prefill_threads", 0),
        draft_core=None if gpu else draft_core, device_ids=params.integers("gpu_device_ids"),
        kv_cache_free_gpu_memory_fraction=params.number("kv_cache_free_gpu_memory_fraction", 0.4)).validate()


def spec_config(params: Params) -> SpecConfig:
    """How the `ssd` model speculates by default (each request may pin K, the budget and C): its
    num_draft_tokens, fanout_budget, saguaro_c and draft_timeout_s; or, for the `draft` model, how it
    drafts (fanout, backup, accept_rate, power). What one model leaves out is SpecConfig's default."""
    d = SpecConfig()
    return SpecConfig(
        k=params.integer("num_draft_tokens", d.k), budget=params.integer("fanout_budget", d.budget),
        saguaro_c=params.number("saguaro_c", d.saguaro_c), draft_timeout_s=params.number("draft_timeout_s", d.draft_timeout_s),
        fanout=params.text("fanout", d.fanout), backup=params.text("backup", d.backup),
        accept_rate=params.optional_number("accept_rate"), power=params.optional_number("power"))


def serve_limits(params: Params, draft_params: Params) -> ServeLimits:
    """`ssd`'s limits on requests and defaults for what they leave out, from its parameters (the
    fan-out budget's limit from the draft's max_branches)."""
    return ServeLimits(max_input_len=params.integer("max_input_len"), max_tokens=params.integer("max_tokens"),
                       max_budget=draft_params.integer("max_branches", 64),
                       exclude_input_in_output=params.flag("exclude_input_in_output"))


def cpu_core(params: Params) -> int | None:
    """`cpu_core` pins an engine's process to one core (target and draft on different ones)."""
    return params.optional_integer("cpu_core")


# What `ensemble` and `ensemble_sync` ask of `ssd` for each row they relay: NVIDIA's outputs
# (saguaro.request_loop: the pieces, log-probs, perf metrics, token counts), our totals, and an error
# that follows streamed responses.
RELAYED_OUTPUTS = [
    "text_output", "cum_log_probs", "output_log_probs", "acceptance_rate", "total_accepted_draft_tokens",
    "total_draft_tokens", "kv_cache_alloc_new_blocks", "kv_cache_reused_blocks", "kv_cache_alloc_total_blocks",
    "arrival_time_ns", "first_scheduled_time_ns", "first_token_time_ns", "last_token_time_ns", "num_input_tokens",
    "num_output_tokens", "generated_tokens", "rounds", "accepted_tokens", "drafted_tokens", "cache_hits",
    "ar_rounds", "sd_rounds", "ssd_rounds", "relay_error"]


def inputs_of(request) -> dict[str, np.ndarray]:
    return {t.name(): t.as_numpy() for t in request.inputs()}


def outputs_of(reply) -> dict[str, np.ndarray]:
    """A BLS reply's output tensors by name."""
    return {t.name(): t.as_numpy() for t in reply.output_tensors()}


def response(pb_utils, outputs: Mapping[str, np.ndarray], wanted: Collection[str] = ()):
    """A response of the outputs the request asked for (wanted: its requested_output_names(); empty:
    all). The others are never built: Triton 2.51's stub prunes them in ResponseSender::Send with the
    GIL released (python_backend r24.10, src/response_sender.cc), freeing their numpy arrays there."""
    return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in outputs.items() if not wanted or k in wanted])


class KeptCalls:
    """Finished decoupled BLS calls, held KEEP_S before Python lets them go. Triton 2.51's stub
    (python_backend r24.10, Stub::SendCleanupId) drops its own reference to a finished call's
    response iterator on a C++ thread without the GIL; where that reference was the last, every
    response of the call and its numpy arrays were freed there, beside our Python threads, which
    corrupts the interpreter's heap. The `ensemble` stub segfaulted in libpython about once in two
    hours of load (upstream frees them with the GIL from r24.12, python_backend PR #390). Held here,
    the last reference is ours, let go with the GIL."""

    KEEP_S = 5.0

    def __init__(self):
        self.lock, self.calls = threading.Lock(), collections.deque()

    def keep(self, replies) -> None:
        now = time.monotonic()
        with self.lock:
            self.calls.append((now, replies))
            while now - self.calls[0][0] > self.KEEP_S:
                self.calls.popleft()


def relayed_error(pb_utils: Any, reply) -> Any:
    """An error reply of `ssd` to a relay as the client's error response, or None. To a relayed
    request `ssd` sends its errors as data (relay_error: a BLS caller loses error responses that
    follow streamed ones in Triton 2.51)."""
    if reply.has_error():
        return pb_utils.InferenceResponse(error=reply.error())
    error = pb_utils.get_output_tensor_by_name(reply, "relay_error")
    if error is None:
        return None
    code, message = (x.decode() for x in error.as_numpy().reshape(-1))
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code)))


def relay_tag(pb_utils: Any, relay_id: int, secret: np.ndarray) -> list:
    """The inputs that make a request to `ssd` a relayed one, which a relay can cancel."""
    return [pb_utils.Tensor("relay_id", np.array([relay_id], dtype=np.uint64)), pb_utils.Tensor("auth", secret)]


def cancel_relayed(pb_utils: Any, relay_id: int, secret: np.ndarray, kept: KeptCalls) -> None:
    """Tells `ssd` a relay's client cancelled: the sequence ends and frees its slots before the next round."""
    cancel = pb_utils.InferenceRequest(
        model_name="ssd", requested_output_names=[],
        inputs=[pb_utils.Tensor("cancel_relay_id", np.array([relay_id], dtype=np.uint64)), pb_utils.Tensor("auth", secret)])
    replies = cancel.exec(decoupled=True)
    for _ in replies:
        pass
    kept.keep(replies)


class StubWatch:
    """The stub process of the model a relay calls (`ssd`), and whether the model restarted under
    a call. Triton 2.51 ends none of the requests a dead stub held: a BLS call to it never gets
    another response, and the relay's client waited forever. A relay notes the stub's pid when it
    calls and checks it while it waits (one /proc read); the supervisor reloads the model meanwhile
    (docs/design.md, "Supervision")."""

    def __init__(self, model: str, ready: Callable[[], bool]):
        self.model, self.ready = model, ready
        self.pid: int | None = None
        self.seen, self.lock = False, threading.Lock()

    def current(self) -> int | None:
        """The model's live stub (None: none is running), looked for among the server's children
        (~5 ms) only when the one known is gone."""
        with self.lock:
            if self.pid is None or not stub_alive(self.pid):
                self.pid = next((pid for pid, m in stub_processes(os.getppid()).items() if m == self.model), None)
                self.seen = self.seen or self.pid is not None
            return self.pid

    @staticmethod
    def died(pid: int | None) -> bool:
        return pid is not None and not stub_alive(pid)

    def restarted(self, pid: int | None) -> Unavailable | None:
        """The client's error where the model was restarting under a failed call sent while `pid`
        was its stub (None: none was running): that stub died, or none was running though one had
        been, or the model is not ready. None: the error is the model's own (or readiness could not
        be asked), to pass on as it came."""
        try:
            down = self.died(pid) or (pid is None and self.seen) or not self.ready()
        except Exception:
            down = False
        return self.error(pid) if down else None

    def error(self, pid: int | None) -> Unavailable:
        """The client's error for a call sent while `pid` was the stub, which is down."""
        if self.died(pid):
            return Unavailable(restarted_message(self.model))
        return Unavailable(f"the {self.model!r} model is not ready (restarting or unloading); retry the request")


class Outbox:
    """Responses leave from their own thread, in the order given: a decoupled send is a round
    trip to the server (about 0.4 ms here) that the next decoding round need not wait for."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name="saguaro-responses", daemon=True)
        self.thread.start()

    def send(self, sender, make_response: Callable[[], Any] | None, flags: int) -> None:
        self.queue.put((sender, make_response, flags))

    def close(self, timeout_s: float = 2.0) -> None:
        """Sends what is queued (final responses above all: a request without one is never
        released, and holds up the server's shutdown), then stops."""
        self.queue.put(None)
        self.thread.join(timeout_s)

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            sender, make_response, flags = item
            try:
                if make_response is None:
                    sender.send(flags=flags)
                else:
                    sender.send(make_response(), flags=flags)
            except Exception:            # a client gone mid-stream: nothing to tell it
                traceback.print_exc()


def error_code(exc: BaseException) -> str:
    """The Triton error code for an exception: bad input (SaguaroError) INVALID_ARG, a retryable
    condition (Unavailable: engine restarting, server full, shutting down) UNAVAILABLE, anything
    else INTERNAL."""
    return "INVALID_ARG" if isinstance(exc, SaguaroError) else "UNAVAILABLE" if isinstance(exc, Unavailable) else "INTERNAL"


def error_message(exc: BaseException) -> str:
    return str(exc) if isinstance(exc, (SaguaroError, Unavailable)) else f"{type(exc).__name__}: {exc}"


def error_response(pb_utils: Any, exc: BaseException) -> Any:
    """An error InferenceResponse, coded by error_code()."""
    return pb_utils.InferenceResponse(
        error=pb_utils.TritonError(error_message(exc), getattr(pb_utils.TritonError, error_code(exc))))


def engine_socket(model: str) -> Path:
    """Where an engine model listens: in this tritonserver's private folder (saguaro.ipc)."""
    return runtime_dir() / f"{model}.sock"


def serve_socket(model: str, handle: Callable[[object], Iterator]) -> SocketServer:
    """Answer saguaro.messages on the model's authenticated Unix socket: the per-round path between
    `ssd` and the engine models, off BLS (a round trip costs ~0.1 ms, not ~1 ms)."""
    return listen(engine_socket(model), server_secret(runtime_dir()), handle, model)


def socket_call(model: str, timeout_s: float, hello=None) -> WireClient:
    """call(msg) -> answers from an engine model's socket; reconnects in the background when the
    model's process is replaced, sending `hello` first (see WireClient)."""
    path, secret = engine_socket(model), server_secret(runtime_dir())
    return WireClient(lambda: connect(path, secret), timeout_s, peer=model, hello=hello)


def bls_call(pb_utils, model: str, decoupled: bool, timeout_s: float | None = None) -> Callable[[object], Iterator]:
    """call(msg) -> the answers of one of our engine models (messages: saguaro.messages), with the
    server's secret. The request is sent at once; a decoupled model's answers are read as they arrive."""
    auth = np.array([server_secret(runtime_dir())], dtype=np.object_)
    kept = KeptCalls()

    def call(msg) -> Iterator:
        req = pb_utils.InferenceRequest(model_name=model, requested_output_names=["response"],
                                        inputs=[pb_utils.Tensor("request", np.array([encode(msg)], dtype=np.object_)),
                                                pb_utils.Tensor("auth", auth)],
                                        **({"timeout": int(timeout_s * 1e6)} if timeout_s else {}))
        if not decoupled:
            return _answers(pb_utils, model, [req.exec()])
        replies = req.exec(decoupled=True)
        return _answers(pb_utils, model, replies, lambda: kept.keep(replies))
    return call


def _answers(pb_utils, model: str, responses, done: Callable[[], None] = lambda: None) -> Iterator:
    try:
        for r in responses:
            if r.has_error():
                raise PeerUnavailable(f"{model}: {r.error().message()}")
            out = pb_utils.get_output_tensor_by_name(r, "response")
            if out is not None:
                yield decode(out.as_numpy().reshape(-1)[0])
    finally:
        done()


def carries_secret(auth: np.ndarray | None, secret: bytes) -> bool:
    """Whether a request's `auth` input (one BYTES value) is the server's secret."""
    return auth is not None and auth.size == 1 and same_secret(auth.reshape(-1)[0], secret)


def bls_message(pb_utils, request, secret: bytes):
    """The message of a BLS request to an engine model, after its `auth` is checked against the
    server's secret: only `ssd` holds it, so clients that reach the model get an error, and
    nothing they send is decoded."""
    auth = pb_utils.get_input_tensor_by_name(request, "auth")
    if not carries_secret(None if auth is None else auth.as_numpy(), secret):
        raise SaguaroError("this model answers only the server's own `ssd` model; send requests to `ensemble` or `ssd`")
    return decode(pb_utils.get_input_tensor_by_name(request, "request").as_numpy().reshape(-1)[0])


def message_response(pb_utils, answer):
    return response(pb_utils, {"response": np.array([encode(answer)], dtype=np.object_)})


class Metrics:
    """Speculative-decoding metrics on Triton's metrics port (pb_utils.MetricFamily)."""

    ACCEPTED_BUCKETS = [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 16]
    FLUSH_S = 0.5

    def __init__(self, pb_utils):
        fam = lambda name, doc, kind: pb_utils.MetricFamily(name=name, description=doc, kind=kind)
        C, G = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        self._families = [
            rounds := fam("saguaro_rounds_total", "Decoding rounds (one batched target verify each)", C),
            drafted := fam("saguaro_drafted_tokens_total", "Draft tokens sent to verification", C),
            accepted := fam("saguaro_accepted_tokens_total", "Draft tokens the target accepted", C),
            hits := fam("saguaro_cache_hits_total", "SSD rounds whose outcome was in the speculation cache", C),
            misses := fam("saguaro_cache_misses_total", "SSD rounds that needed a backup speculation, by backup", C),
            degraded := fam("saguaro_degraded_rounds_total", "Rounds run on the target alone after a draft failure", C),
            one_core := fam("saguaro_one_core_rounds_total",
                            "Rounds whose target forward left the drafter's cores to it (CPU: the target on its own core)", C),
            verify := fam("saguaro_verify_seconds_total", "Time in target verification", C),
            wait := fam("saguaro_draft_wait_seconds_total", "Time the round loop waited for the draft", C),
            build := fam("saguaro_draft_build_seconds_total", "Time the draft spent pre-drafting (hidden under SSD)", C),
            active := fam("saguaro_active_sequences", "Sequences being decoded", G),
            slots := fam("saguaro_kv_slots_in_use", "KV-cache slots held, by engine", G),
            hist := fam("saguaro_accepted_length", "Tokens emitted per sequence per round (bonus included)",
                        pb_utils.MetricFamily.HISTOGRAM),
            by_type := fam("saguaro_sequence_rounds_total", "Sequence-rounds by type (the round policy's choices)", C),
        ]
        self.by_type = {t: by_type.Metric(labels={"type": t}) for t in ("ar", "sd", "ssd")}
        self.rounds, self.drafted, self.accepted = rounds.Metric(), drafted.Metric(), accepted.Metric()
        self.hits = hits.Metric()
        self.misses = {b: misses.Metric(labels={"backup": b}) for b in ("neural", "fast")}
        self.degraded, self.verify, self.wait, self.build = degraded.Metric(), verify.Metric(), wait.Metric(), build.Metric()
        self.one_core = one_core.Metric()
        self.active = active.Metric()
        self.slots = {e: slots.Metric(labels={"engine": e}) for e in ("target", "draft")}
        self.accepted_len = hist.Metric(buckets=self.ACCEPTED_BUCKETS)
        self.pending: dict = {}          # metric -> increment not yet published
        self.observed: list[int] = []    # accepted lengths not yet published
        self.flushed_at = 0.0

    def update(self, decoder: Decoder, r: RoundStats | None) -> None:
        """Accumulate a round; publish at most every FLUSH_S, and whenever the server goes idle.
        Each metric call is a message from this stub to the server, and a round lasts a few ms."""
        if r is not None:
            add = lambda metric, v: self.pending.__setitem__(metric, self.pending.get(metric, 0) + v)
            add(self.rounds, 1)
            add(self.drafted, r.drafted)
            add(self.accepted, r.accepted)
            add(self.hits, r.hits)
            add(self.misses[r.backup or "neural"], r.misses)
            add(self.degraded, int(r.degraded))
            add(self.one_core, int(r.one_core))
            add(self.verify, r.verify_ms / 1e3)
            add(self.wait, r.draft_wait_ms / 1e3)
            add(self.build, r.build_ms / 1e3)
            for t in ("ar", "sd", "ssd"):
                add(self.by_type[t], getattr(r, t))
            self.observed += r.emitted
        now = time.monotonic()
        if decoder.active == 0 or now - self.flushed_at > self.FLUSH_S:
            self.flushed_at = now
            for metric, v in self.pending.items():
                if v:
                    metric.increment(v)
            for n in self.observed:
                self.accepted_len.observe(n)
            self.pending, self.observed = {}, []
            self.active.set(decoder.active)
            self.slots["target"].set(decoder.target.active_slots)
            self.slots["draft"].set(decoder.draft_slots)
