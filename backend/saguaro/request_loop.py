"""Serving without Triton types: request parsing, the round loop and what goes back to clients.

The Triton models in model_repository/ are thin: they turn tensors into the calls below, so the
whole serving path (parse -> Decoder rounds -> streamed pieces -> totals) is the same code in
Triton and in tests.
"""
from __future__ import annotations

import collections
import math
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from saguaro.config import MODES, SamplingParams
from saguaro.decoder import Decoder, Event, RoundStats, SeqStats
from saguaro.errors import PeerUnavailable, SaguaroError, ServerBusy, Unavailable
from saguaro.text import BYTES_PER_TOKEN, StreamWindow, decode_text_input, encode_prompt, window_text

# -- requests ---------------------------------------------------------------------------------------
# Names, types and meanings follow NVIDIA's TensorRT-LLM Triton models (NVIDIA/TensorRT-LLM
# triton_backend/all_models/inflight_batcher_llm at 2a9abd9536aa62ad3e4b9314be9286b1b1be523b:
# ensemble/config.pbtxt, tensorrt_llm/1/model.py; older releases' names `random_seed` and
# `min_length` from triton-inference-server/tensorrtllm_backend v0.18.2) plus our own.

# Optional inputs: name -> (numpy kinds accepted, converter).
_SCALARS: dict[str, tuple[str, Callable]] = {
    "max_tokens": ("iu", int), "temperature": ("f", float), "top_k": ("iu", int), "top_p": ("f", float),
    "seed": ("iu", int), "random_seed": ("iu", int), "end_id": ("iu", int), "pad_id": ("iu", int),
    "min_tokens": ("iu", int), "min_length": ("iu", int), "repetition_penalty": ("f", float),
    "presence_penalty": ("f", float), "frequency_penalty": ("f", float), "return_log_probs": ("b", bool),
    "return_perf_metrics": ("b", bool), "return_kv_cache_reuse_stats": ("b", bool),
    "return_num_input_tokens": ("b", bool), "return_num_output_tokens": ("b", bool),
    "exclude_input_in_output": ("b", bool), "num_draft_tokens": ("iu", int), "fanout_budget": ("iu", int),
    "saguaro_c": ("f", float), "stream": ("b", bool), "inject_draft_fault": ("b", bool),
}
# NVIDIA's older name -> the name used here (both accepted; sent together they must agree).
_ALIASES = {"random_seed": "seed", "min_length": "min_tokens"}

MAX_STOP_WORDS, MAX_STOP_WORD_BYTES = 32, 256


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    mode: str = "ssd"
    k: int | None = None
    budget: int | None = None
    saguaro_c: float | None = None
    stream: bool = False
    text_out: bool = False          # called with text_input: detokenize here (no postprocessing step)
    inject_draft_fault: bool = False
    prompt_text: str | None = None  # text_input as sent (non-streamed text_output starts with it unless excluded)
    exclude_input: bool = False     # exclude_input_in_output: non-streamed output without the prompt
    perf_metrics: bool = False      # return_perf_metrics: NVIDIA's per-request metrics on every response
    num_input_tokens: bool = False  # return_num_input_tokens
    num_output_tokens: bool = False  # return_num_output_tokens


@dataclass(frozen=True)
class ServeLimits:
    """A server's limits on requests, and its defaults for what a request leaves out."""
    max_input_len: int = 768
    max_tokens: int = 256
    max_budget: int = 64
    default_max_tokens: int = 128
    exclude_input_in_output: bool = False   # TensorRT-LLM's model parameter of that name (default false)


def _scalar(inputs: dict[str, np.ndarray], name: str, table: dict[str, tuple[str, Callable]] = _SCALARS):
    kinds, convert = table[name]
    value = inputs.get(name)
    if value is None:
        return None
    if value.dtype.kind not in kinds:
        raise SaguaroError(f"{name}: wrong data type {value.dtype}; send {'/'.join(_kind_names(kinds))}")
    if value.size != 1:
        raise SaguaroError(f"{name}: expected one value, got shape {list(value.shape)}")
    return convert(value.reshape(-1)[0])


def _kind_names(kinds: str) -> list[str]:
    return [{"i": "INT32/INT64", "u": "UINT32/UINT64", "f": "FP32", "b": "BOOL"}[k] for k in kinds]


def _string(inputs: dict[str, np.ndarray], name: str, max_bytes: int | None = None) -> str | None:
    value = inputs.get(name)
    if value is None:
        return None
    if value.dtype.kind not in "OSU" or value.size != 1:
        raise SaguaroError(f"{name}: expected one BYTES string, got {value.dtype} shape {list(value.shape)}")
    return decode_text_input(value.reshape(-1)[0], name, max_bytes)


def _scalars(inputs: dict[str, np.ndarray]) -> dict:
    """Every optional scalar input (None when not sent), NVIDIA's older names folded into ours."""
    v = {name: _scalar(inputs, name) for name in _SCALARS}
    for old, name in _ALIASES.items():
        old_value = v.pop(old)
        if old_value is not None and v[name] is not None and old_value != v[name]:
            raise SaguaroError(f"{name}={v[name]} and {old}={old_value}: the same setting twice with different "
                               f"values; send one ({old} is TensorRT-LLM's older name)")
        if v[name] is None:
            v[name] = old_value
    return v


def _words(inputs: dict[str, np.ndarray], name: str, tokenizer) -> tuple[tuple[int, ...], ...]:
    """stop_words/bad_words: BYTES strings, each tokenized alone without special tokens (as
    NVIDIA's preprocessing does); empty strings are skipped."""
    words = inputs.get(name)
    if words is None:
        return ()
    if words.dtype.kind not in "OSU" or words.size > MAX_STOP_WORDS:
        raise SaguaroError(f"{name}: expected at most {MAX_STOP_WORDS} BYTES strings, got {words.dtype} "
                           f"shape {list(words.shape)}")
    texts = (decode_text_input(w, name, MAX_STOP_WORD_BYTES) for w in words.reshape(-1) if len(w))
    return tuple(ids for ids in (tuple(tokenizer.encode(t, add_special_tokens=False).ids) for t in texts) if ids)


def _prompt(inputs: dict[str, np.ndarray], tokenizer, limits: ServeLimits) -> tuple[list[int], str | None]:
    """(prompt ids, prompt text or None when sent as input_ids)."""
    text = _string(inputs, "text_input", max_bytes=limits.max_input_len * BYTES_PER_TOKEN)
    if text is not None:
        prompt = encode_prompt(tokenizer, text)
    elif inputs.get("input_ids") is not None:
        ids = inputs["input_ids"]
        if ids.dtype.kind not in "iu":
            raise SaguaroError(f"input_ids: wrong data type {ids.dtype}; send INT32 token ids")
        prompt = ids.reshape(-1).astype(np.int64).tolist()
    else:
        raise SaguaroError("text_input: missing; send the prompt as text_input (BYTES)")
    if not prompt:
        raise SaguaroError("text_input: empty; send a non-empty prompt")
    if len(prompt) > limits.max_input_len:
        raise SaguaroError(f"text_input: the prompt is {len(prompt)} tokens, above max_input_len={limits.max_input_len}; shorten it")
    vocab = _vocab(tokenizer)
    if vocab and (min(prompt) < 0 or max(prompt) >= vocab):
        raise SaguaroError(f"input_ids: token ids must be in [0, {vocab})")
    return prompt, text


def _vocab(tokenizer) -> int | None:
    return getattr(tokenizer, "get_vocab_size", lambda: None)()


def _check_limits(v: dict, vocab: int | None, limits: ServeLimits) -> int:
    """max_tokens (its default filled in), after the checks that need this server's limits."""
    max_tokens = limits.default_max_tokens if v["max_tokens"] is None else v["max_tokens"]
    if not 1 <= max_tokens <= limits.max_tokens:
        raise SaguaroError(f"max_tokens={max_tokens}: must be in [1, {limits.max_tokens}] (this server's limit); "
                           f"it is INT32, so JSON numbers of 2^31 or more wrap before they reach the server")
    for name in ("end_id", "pad_id"):
        if v[name] is not None and vocab and not 0 <= v[name] < vocab:
            raise SaguaroError(f"{name}={v[name]}: must be a token id in [0, {vocab})")
    if v["fanout_budget"] is not None and not 1 <= v["fanout_budget"] <= limits.max_budget:
        raise SaguaroError(f"fanout_budget={v['fanout_budget']}: must be in [1, {limits.max_budget}]")
    return max_tokens


def _sampling_params(v: dict, max_tokens: int, stops, bad_words) -> SamplingParams:
    """SamplingParams with TensorRT-LLM's meaning of temperature, top_k and top_p: sampling only
    when top_k > 0 or top_p > 0, greedy search otherwise; temperature 1.0 when unset; top_p <= 0
    means unset (TensorRT-LLM docs/source/advanced/gpt-runtime.md, "Sampling Parameters";
    tensorrt_llm/1/model.py get_sampling_config_from_request). temperature 0 is greedy too. The
    values sent are validated even when greedy makes them moot."""
    top_p = None if v["top_p"] is None or v["top_p"] <= 0 else v["top_p"]     # NaN stays, to be refused
    params = SamplingParams(
        max_tokens=max_tokens, temperature=1.0 if v["temperature"] is None else v["temperature"],
        top_k=v["top_k"] or 0, top_p=1.0 if top_p is None else top_p, seed=v["seed"], end_id=v["end_id"],
        stop=stops, repetition_penalty=1.0 if v["repetition_penalty"] is None else v["repetition_penalty"],
        presence_penalty=v["presence_penalty"] or 0.0, frequency_penalty=v["frequency_penalty"] or 0.0,
        min_tokens=v["min_tokens"] or 0, bad_words=bad_words, return_log_probs=bool(v["return_log_probs"])).validate()
    if params.top_k == 0 and top_p is None:
        params = params.with_(temperature=0.0)
    return params


def parse_request(inputs: dict[str, np.ndarray], tokenizer, limits: ServeLimits) -> Request:
    """A request from its input tensors; SaguaroError naming the field for anything wrong."""
    prompt, text = _prompt(inputs, tokenizer, limits)
    v = _scalars(inputs)
    max_tokens = _check_limits(v, _vocab(tokenizer), limits)
    mode = (_string(inputs, "decoding_mode") or "ssd").strip().lower()
    if mode not in MODES:
        raise SaguaroError(f"decoding_mode={mode!r}: use one of {', '.join(MODES)}")
    params = _sampling_params(v, max_tokens, _words(inputs, "stop_words", tokenizer), _words(inputs, "bad_words", tokenizer))
    exclude = limits.exclude_input_in_output if v["exclude_input_in_output"] is None else v["exclude_input_in_output"]
    return Request(prompt, params, mode, v["num_draft_tokens"], v["fanout_budget"], v["saguaro_c"],
                   bool(v["stream"]), text is not None, bool(v["inject_draft_fault"]), text, exclude,
                   bool(v["return_perf_metrics"] or v["return_kv_cache_reuse_stats"]),
                   bool(v["return_num_input_tokens"]), bool(v["return_num_output_tokens"]))


# -- NVIDIA's batched requests (`ensemble`, `ensemble_sync`) -----------------------------------------
# NVIDIA's ensemble has max_batch_size > 0: every input is [B, ...] and each of the B rows is a
# request of its own, which with num_return_sequences n gives n sequences. The relays send every
# (row, sequence) to `ssd` as a request of its own and tag what comes back with batch_index and
# sequence_index where TensorRT-LLM does (tensorrt_llm/1/model.py convert_response: batch_index
# when B > 1, sequence_index when n > 1, both [1, 1]).

# Inputs NVIDIA's ensemble declares that this server does not implement: sent with anything but
# their default (left out, empty, false or 0) they are refused, named.
UNSUPPORTED_INPUTS: dict[str, str] = {
    "return_context_logits": "logits are not returned", "return_generation_logits": "logits are not returned",
    "decoder_text_input": "encoder-decoder models are not served",
    "prompt_embedding_table": "prompt tuning is not supported", "prompt_table_extra_id": "prompt tuning is not supported",
    "prompt_vocab_size": "prompt tuning is not supported",
    "embedding_bias_words": "embedding bias is not supported", "embedding_bias_weights": "embedding bias is not supported",
    "lora_task_id": "LoRA adapters are not supported", "lora_weights": "LoRA adapters are not supported",
    "lora_config": "LoRA adapters are not supported",
    "guided_decoding_guide_type": "guided decoding is not supported", "guided_decoding_guide": "guided decoding is not supported",
}
# Read by the relays, not forwarded to `ssd`.
_RELAY_SCALARS: dict[str, tuple[str, Callable]] = {
    "beam_width": ("iu", int), "num_return_sequences": ("iu", int), "length_penalty": ("f", float)}


@dataclass(frozen=True)
class Row:
    """One sequence of one batch row of a client's request: a request for `ssd` of its own."""
    batch_index: int
    sequence_index: int
    sequences: int                  # the row's num_return_sequences
    batch_size: int
    inputs: dict[str, np.ndarray]   # shaped for `ssd`: the batch dimension taken off


def nvidia_rows(inputs: dict[str, np.ndarray], max_sequences: int) -> list[Row]:
    """The requests for `ssd` in a batched request, row by row; SaguaroError naming the input for
    what this server does not do (beam search, logits, prompt tuning, LoRA, ...)."""
    batch = _batch_size(inputs)
    for name, why in UNSUPPORTED_INPUTS.items():
        if name in inputs and inputs[name].size and np.any(inputs[name].astype(bool)):
            raise SaguaroError(f"{name}: {why} by this server; leave it out (or send its default: empty, false or 0)")
    rows = []
    for b in range(batch):
        row = {name: value[b] for name, value in inputs.items() if name not in UNSUPPORTED_INPUTS}
        n = _sequences(row, max_sequences)
        forward = {name: value for name, value in row.items() if name not in _RELAY_SCALARS}
        rows += [Row(b, j, n, batch, _with_seed(forward, j)) for j in range(n)]
    return rows


def _batch_size(inputs: dict[str, np.ndarray]) -> int:
    sizes = {name: value.shape[0] if value.ndim else 0 for name, value in inputs.items()}
    batch = max(sizes.values(), default=0)
    if batch < 1:
        raise SaguaroError("text_input: missing; send the prompt as text_input (BYTES), shaped [batch, 1]")
    for name, size in sizes.items():
        if size != batch:
            raise SaguaroError(f"{name}: batch size {size}, other inputs {batch}; send every input as [batch, ...]")
    return batch


def _sequences(row: dict[str, np.ndarray], max_sequences: int) -> int:
    """The row's num_return_sequences, after the checks of what only the relay reads. 0 means 1
    for beam_width and num_return_sequences, as in tensorrt_llm/1/model.py."""
    beam = _scalar(row, "beam_width", _RELAY_SCALARS)
    if beam not in (None, 0, 1):
        raise SaguaroError(f"beam_width={beam}: beam search is not supported by this server; send beam_width 1 "
                           f"(num_return_sequences gives several sampled sequences)")
    penalty = _scalar(row, "length_penalty", _RELAY_SCALARS)
    if penalty is not None and not math.isfinite(penalty):   # it scores beams: no effect at beam_width 1, as in TensorRT-LLM
        raise SaguaroError(f"length_penalty={penalty}: must be a finite number")
    n = _scalar(row, "num_return_sequences", _RELAY_SCALARS) or 1
    if not 1 <= n <= max_sequences:
        raise SaguaroError(f"num_return_sequences={n}: must be in [1, {max_sequences}] (this server's limit)")
    return n


def _with_seed(inputs: dict[str, np.ndarray], sequence: int) -> dict[str, np.ndarray]:
    """Sequence j > 0 of a row with a seed gets seed + j: n distinct reproducible samples, the
    first of them the row's single-sequence result. Without a seed each draws its own."""
    base = next((_scalar(inputs, name) for name in ("seed", "random_seed") if name in inputs), None)
    if base is None or sequence == 0:
        return inputs
    out = {name: value for name, value in inputs.items() if name != "random_seed"}
    out["seed"] = np.array([(base + sequence) % 2**64], dtype=np.uint64)
    return out


def nvidia_outputs(outputs: dict[str, np.ndarray], row: Row) -> dict[str, np.ndarray]:
    """One response of `ssd` in NVIDIA's shapes: text_output [1] (as NVIDIA's postprocessing
    returns it: clients read text_output[0]), output_log_probs [1, 1, tokens], the rest [1, 1];
    batch_index and sequence_index added."""
    out = {name: _nvidia_shape(name, value) for name, value in outputs.items()}
    if row.batch_size > 1:
        out["batch_index"] = np.array([[row.batch_index]], dtype=np.int32)
    if row.sequences > 1:
        out["sequence_index"] = np.array([[row.sequence_index]], dtype=np.int32)
    return out


def _nvidia_shape(name: str, value: np.ndarray) -> np.ndarray:
    if name == "text_output":
        return value.reshape(-1)
    return value.reshape(1, 1, -1) if name == "output_log_probs" else value.reshape(1, -1)


def stacked(responses: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Per-row responses (nvidia_outputs) as one unary response, rows in order: the outputs every
    row has, output_log_probs padded with 0 to the longest row."""
    names = [name for name in responses[0] if all(name in r for r in responses[1:])]
    out = {}
    for name in names:
        parts = [r[name] for r in responses]
        if name == "output_log_probs":
            longest = max(p.shape[-1] for p in parts)
            parts = [np.pad(p, ((0, 0), (0, 0), (0, longest - p.shape[-1]))) for p in parts]
        out[name] = np.concatenate(parts, axis=0)
    return out


# -- responses --------------------------------------------------------------------------------------

def totals(stats: SeqStats, generated: int) -> dict[str, np.ndarray]:
    """Per-request speculative totals, sent with the final response."""
    i32 = lambda x: np.array([x], dtype=np.int32)
    return {"generated_tokens": i32(generated), "rounds": i32(stats.rounds), "accepted_tokens": i32(stats.accepted),
            "drafted_tokens": i32(stats.drafted), "cache_hits": i32(stats.cache_hits),
            "ar_rounds": i32(stats.ar_rounds), "sd_rounds": i32(stats.sd_rounds), "ssd_rounds": i32(stats.ssd_rounds)}


@dataclass
class Timing:
    """NVIDIA's per-request timing metrics, steady-clock ns (time.monotonic_ns, as TensorRT-LLM's
    std::chrono::steady_clock)."""
    arrival: int = 0
    first_scheduled: int = 0
    first_token: int = 0
    last_token: int = 0


def perf_metrics(stats: SeqStats, timing: Timing) -> dict[str, np.ndarray]:
    """return_perf_metrics: TensorRT-LLM's outputs (tensorrt_llm/1/model.py convert_response) from
    the request's stats so far. KV cache: one slot per sequence, allocated at admission and not
    shared, so 1 new block, 0 reused, 1 in all."""
    i32, i64 = (lambda x: np.array([x], dtype=np.int32)), (lambda x: np.array([x], dtype=np.int64))
    return {"acceptance_rate": np.array([stats.accepted / stats.drafted if stats.drafted else 0.0], dtype=np.float32),
            "total_accepted_draft_tokens": i32(stats.accepted), "total_draft_tokens": i32(stats.drafted),
            "kv_cache_alloc_new_blocks": i32(1), "kv_cache_reused_blocks": i32(0), "kv_cache_alloc_total_blocks": i32(1),
            "arrival_time_ns": i64(timing.arrival), "first_scheduled_time_ns": i64(timing.first_scheduled),
            "first_token_time_ns": i64(timing.first_token), "last_token_time_ns": i64(timing.last_token)}


class Channel:
    """One request's way back to its client. Subclasses send outputs (Triton's response sender);
    this class decides what to send: streamed windows of ids (for the postprocessing step) or text,
    what the request asked for beside them (log-probs, perf metrics, token counts) and totals at
    the end."""

    def __init__(self, request: Request, tokenizer, stream_interval_s: float = 0.0):
        """stream_interval_s: the least time between two streamed pieces (the first goes at once);
        tokens that come sooner ride with the next piece. Every response costs the server a
        trip through Triton (and the relay) on the cores that decode."""
        self.request, self.tokenizer = request, tokenizer
        self.window = StreamWindow(tokenizer)
        self.generated: list[int] = []
        self.interval, self.last_sent = stream_interval_s, None
        self.stats, self.timing = SeqStats(), Timing(arrival=time.monotonic_ns())
        self.unsent = 0                             # tokens not yet in a response
        self.log_probs: list[float] = []            # of the unsent tokens
        self.cum_log_prob = 0.0

    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None:
        raise NotImplementedError

    def error(self, exc: BaseException) -> None:
        raise NotImplementedError

    def cancelled(self) -> bool:
        return False

    def on_admitted(self) -> None:
        self.timing.first_scheduled = time.monotonic_ns()

    def on_event(self, event: Event) -> None:
        """One round's outcome for this request: its stats and log-probs noted, then its tokens."""
        self.stats = event.stats
        now = time.monotonic_ns()
        self.timing.first_token = self.timing.first_token or now
        self.timing.last_token = now
        if event.log_probs is not None:
            self.log_probs += event.log_probs
            self.cum_log_prob += sum(event.log_probs)
        self.on_tokens(event.tokens)

    def _piece(self, window: tuple[list[int], int] | None, prefix_text: str = "") -> dict[str, np.ndarray]:
        ids, prefix = window if window else ([], 0)
        if self.request.text_out:
            text = prefix_text + window_text(self.tokenizer, ids, prefix, check_ids=False)
            return {"text_output": np.array([text.encode()], dtype=np.object_)}
        return {"output_ids": np.array(ids, dtype=np.int32), "prefix_len": np.array([prefix], dtype=np.int32)}

    def _asked(self, extra_tokens: int = 0) -> dict[str, np.ndarray]:
        """What the request asked for beside the text, for the tokens since the last response."""
        out: dict[str, np.ndarray] = {}
        if self.request.params.return_log_probs and (self.log_probs or not self.unsent):
            out["output_log_probs"] = np.array(self.log_probs, dtype=np.float32)
            out["cum_log_probs"] = np.array([self.cum_log_prob], dtype=np.float32)
        if self.request.perf_metrics:
            out.update(perf_metrics(self.stats, self.timing))
        if self.request.num_input_tokens:
            out["num_input_tokens"] = np.array([len(self.request.prompt)], dtype=np.int32)
        if self.request.num_output_tokens:
            out["num_output_tokens"] = np.array([self.unsent + extra_tokens], dtype=np.int32)
        self.unsent, self.log_probs = 0, []
        return out

    def on_tokens(self, tokens: list[int]) -> None:
        self.generated += tokens
        self.unsent += len(tokens)
        if not self.request.stream:
            return
        now = time.monotonic()
        if self.last_sent is not None and now - self.last_sent < self.interval:
            self.window.hold(tokens)
            return
        window = self.window.push(tokens)
        if window:
            self.send({**self._piece(window), **self._asked()}, final=False)
            self.last_sent = now

    def on_finish(self, stats: SeqStats) -> None:
        self.stats = stats
        if self.request.stream:      # streamed pieces never repeat the prompt (NVIDIA's streaming)
            piece = self._piece(self.window.finish())
        elif self.request.exclude_input:
            piece = self._piece((self.generated, 0))
        else:
            piece = self._with_prompt()
        extra = 0 if self.request.stream or self.request.exclude_input else len(self.request.prompt)
        self.send({**piece, **self._asked(extra), **totals(stats, len(self.generated))}, final=True)

    def _with_prompt(self) -> dict[str, np.ndarray]:
        """The non-streamed output with the prompt first (exclude_input_in_output false): the
        prompt text as sent, or with input_ids the prompt's ids."""
        if self.request.prompt_text is not None:
            return self._piece((self.generated, 0), prefix_text=self.request.prompt_text)
        return self._piece((self.request.prompt + self.generated, 0))


class ServingLoop:
    """Owns a Decoder on one thread: requests wait in a bounded queue for a KV slot, join between
    rounds, and every round serves all of them. Triton's execute() only submits; cancellation is
    polled between rounds, for waiting requests too.

    A lost target engine (PeerUnavailable: its process died or stopped answering) ends every
    request in flight with a retryable error, and the next request builds a new Decoder: the
    restarted target holds nothing of the old one. A lost draft only makes rounds plain target
    steps (Decoder) until it is back."""

    def __init__(self, make_decoder: Callable[[], Decoder],
                 on_change: Callable[[Decoder, RoundStats | None], None] = lambda d, r: None, max_queue: int = 64):
        """on_change(decoder, round) after every round (round stats) and cancellation (None);
        max_queue: requests that may wait for a slot, beyond it they get ServerBusy."""
        self.make_decoder, self.on_change, self.max_queue = make_decoder, on_change, max_queue
        self.inbox: queue.SimpleQueue[tuple[Request, Channel]] = queue.SimpleQueue()
        self.waiting: collections.deque[tuple[Request, Channel]] = collections.deque()
        self.channels: dict[int, Channel] = {}
        self.decoder: Decoder | None = None
        self.accepting, self.cut, self.stopping = True, False, False
        self.thread = threading.Thread(target=self._run, name="saguaro-rounds", daemon=True)
        self.thread.start()

    def submit(self, request: Request, channel: Channel) -> None:
        if not self.accepting:
            channel.error(Unavailable("the server is shutting down; retry the request on a running server"))
            return
        self.inbox.put((request, channel))

    @property
    def busy(self) -> bool:
        return bool(self.channels or self.waiting or not self.inbox.empty())

    def drain(self, grace_s: float = 1.0) -> None:
        """Stop admitting (new requests get a retryable error), let requests in flight finish for
        up to grace_s, then end the rest with a retryable error and free what they held. Returns
        once none is left."""
        self.accepting = False
        deadline = time.monotonic() + grace_s
        while self.busy and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)
        self.cut = True                  # the loop thread ends the rest, between rounds
        deadline = time.monotonic() + 2.0
        while self.busy and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.02)

    def stop(self, grace_s: float = 1.0) -> None:
        """drain(), then stop the loop and close the decoder."""
        self.drain(grace_s)
        self.stopping = True
        self.thread.join(5)
        if not self.thread.is_alive():   # never under a running round
            self._fail_everything(Unavailable("the server shut down before the request finished; retry it"))
            if self.decoder is not None:
                self.decoder.close()

    def _run(self) -> None:
        while not self.stopping:
            try:
                if self.cut and self.busy:
                    self._fail_everything(Unavailable("the server is shutting down; retry the request on a running server"))
                self._admit(block=not self.channels)
                self._drop_cancelled()
                if self.decoder is not None and self.decoder.active:
                    self._round()
                elif self.decoder is not None and self.decoder.unsettled:
                    self.decoder.settle()        # idle: the drafter's last answers read, its slots freed
                    self.on_change(self.decoder, None)
            except PeerUnavailable as e:   # the target's process is gone, and its KV caches with it
                self._fail_all(Unavailable(f"the target engine was lost mid-request ({e}); retry the request"))
                self.decoder = None
            except Exception as e:  # a bug in a round must not take the server down
                traceback.print_exc()
                self._fail_all(e)

    def _admit(self, block: bool) -> None:
        try:
            items = [self.inbox.get(timeout=0.1)] if block and not self.waiting else []
        except queue.Empty:
            return
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for req, ch in items:
            if len(self.waiting) >= self.max_queue:
                ch.error(ServerBusy(f"all KV slots are in use and {self.max_queue} requests are waiting "
                                    f"(max_queued_requests); retry later"))
            else:
                self.waiting.append((req, ch))
        while self.waiting and (self.decoder is None or self.decoder.free_slots > 0):
            req, ch = self.waiting.popleft()
            try:
                if self.decoder is None:
                    self.decoder = self.make_decoder()
                seq_id = self.decoder.add(req.prompt, req.params, req.mode, req.k, req.budget, req.saguaro_c)
                if req.inject_draft_fault and self.decoder.draft is not None:   # (once admitted: a refused
                    self.decoder.draft.inject_fault = True                      # request arms nothing)
                self.channels[seq_id] = ch
                ch.on_admitted()
            except Exception as e:
                ch.error(e)

    def _drop_cancelled(self) -> None:
        for seq_id, ch in list(self.channels.items()):
            if ch.cancelled():
                self.decoder.abort(seq_id)
                del self.channels[seq_id]
                self.on_change(self.decoder, None)
        if self.waiting:                 # cancelled() answers True once (it sends the final response)
            self.waiting = collections.deque((r, ch) for r, ch in self.waiting if not ch.cancelled())

    def _round(self) -> None:
        events = self.decoder.step()
        # metrics first: a client that reads them after its final response must see its round
        self.on_change(self.decoder, self.decoder.history[-1])
        self.decoder.history.clear()
        for e in events:
            ch = self.channels.get(e.seq_id)
            if ch is None:
                continue
            try:
                ch.on_event(e)
                if e.finish_reason is not None:
                    ch.on_finish(e.stats)
                    del self.channels[e.seq_id]
            except Exception as exc:    # building one request's response: that request's error alone
                traceback.print_exc()
                self._fail_one(e.seq_id, exc)

    def _fail_one(self, seq_id: int, exc: BaseException) -> None:
        ch = self.channels.pop(seq_id)
        ch.error(exc)
        self.decoder.abort(seq_id)
        self.on_change(self.decoder, None)

    def _fail_everything(self, exc: BaseException) -> None:
        """_fail_all, the requests not yet taken from the inbox included."""
        while not self.inbox.empty():
            self.waiting.append(self.inbox.get_nowait())
        self._fail_all(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for seq_id, ch in list(self.channels.items()):
            ch.error(exc)
            if self.decoder is not None:
                self.decoder.abort(seq_id)
        self.channels.clear()
        while self.waiting:
            self.waiting.popleft()[1].error(exc)
        if self.decoder is not None:
            self.on_change(self.decoder, None)
