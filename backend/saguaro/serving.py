"""Serving without Triton types: request parsing, the round loop and what goes back to clients.

The Triton models in model_repository/ are thin: they turn tensors into the calls below, so the
whole serving path (parse -> Decoder rounds -> streamed pieces -> totals) is the same code in
Triton and in tests.
"""
from __future__ import annotations

import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from saguaro.config import MODES, SamplingParams
from saguaro.decoder import Decoder, RoundStats, SeqStats
from saguaro.errors import SaguaroError
from saguaro.text import StreamWindow, decode_text_input, encode_prompt, window_text

# -- requests ---------------------------------------------------------------------------------------

# Optional inputs: name -> (numpy kinds accepted, converter). Names follow NVIDIA's ensemble/BLS.
_SCALARS: dict[str, tuple[str, Callable]] = {
    "max_tokens": ("iu", int), "temperature": ("f", float), "top_k": ("iu", int), "top_p": ("f", float),
    "seed": ("iu", int), "end_id": ("iu", int), "num_draft_tokens": ("iu", int), "fanout_budget": ("iu", int),
    "saguaro_c": ("f", float), "stream": ("b", bool), "inject_draft_fault": ("b", bool),
}


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


@dataclass(frozen=True)
class ServeLimits:
    max_input_len: int = 768
    max_tokens: int = 256
    max_budget: int = 64
    default_max_tokens: int = 128


def _scalar(inputs: dict[str, np.ndarray], name: str):
    kinds, convert = _SCALARS[name]
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


def _string(inputs: dict[str, np.ndarray], name: str) -> str | None:
    value = inputs.get(name)
    if value is None:
        return None
    if value.dtype.kind not in "OSU" or value.size != 1:
        raise SaguaroError(f"{name}: expected one BYTES string, got {value.dtype} shape {list(value.shape)}")
    return decode_text_input(value.reshape(-1)[0], name)


def parse_request(inputs: dict[str, np.ndarray], tokenizer, limits: ServeLimits) -> Request:
    """A request from its input tensors; SaguaroError naming the field for anything wrong."""
    text = _string(inputs, "text_input")
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
    vocab = getattr(tokenizer, "get_vocab_size", lambda: None)()
    if vocab and (min(prompt) < 0 or max(prompt) >= vocab):
        raise SaguaroError(f"input_ids: token ids must be in [0, {vocab})")
    v = {name: _scalar(inputs, name) for name in _SCALARS}
    max_tokens = limits.default_max_tokens if v["max_tokens"] is None else v["max_tokens"]
    if max_tokens > limits.max_tokens:
        raise SaguaroError(f"max_tokens={max_tokens}: above this server's limit {limits.max_tokens}; ask for fewer")
    if v["fanout_budget"] is not None and not 1 <= v["fanout_budget"] <= limits.max_budget:
        raise SaguaroError(f"fanout_budget={v['fanout_budget']}: must be in [1, {limits.max_budget}]")
    mode = (_string(inputs, "decoding_mode") or "ssd").strip().lower()
    if mode not in MODES:
        raise SaguaroError(f"decoding_mode={mode!r}: use one of {', '.join(MODES)}")
    stop_words = inputs.get("stop_words")
    stops = tuple(tuple(tokenizer.encode(s.decode() if isinstance(s, bytes) else str(s)).ids)
                  for s in (stop_words.reshape(-1) if stop_words is not None else []) if s)
    params = SamplingParams(
        max_tokens=max_tokens, temperature=v["temperature"] or 0.0, top_k=v["top_k"] or 0,
        top_p=1.0 if v["top_p"] is None else v["top_p"], seed=v["seed"], end_id=v["end_id"], stop=stops).validate()
    return Request(prompt, params, mode, v["num_draft_tokens"], v["fanout_budget"], v["saguaro_c"],
                   bool(v["stream"]), text is not None, bool(v["inject_draft_fault"]))


# -- responses --------------------------------------------------------------------------------------

def totals(stats: SeqStats, generated: int) -> dict[str, np.ndarray]:
    """Per-request speculative totals, sent with the final response."""
    i32 = lambda x: np.array([x], dtype=np.int32)
    return {"generated_tokens": i32(generated), "rounds": i32(stats.rounds), "accepted_tokens": i32(stats.accepted),
            "drafted_tokens": i32(stats.drafted), "cache_hits": i32(stats.cache_hits)}


class Channel:
    """One request's way back to its client. Subclasses send outputs (Triton's response sender);
    this class decides what to send: streamed windows of ids (for the postprocessing step) or text,
    and totals at the end."""

    def __init__(self, request: Request, tokenizer, stream_interval_s: float = 0.0):
        """stream_interval_s: the least time between two streamed pieces (the first goes at once);
        tokens that come sooner ride with the next piece. Every response costs the server a
        trip through the ensemble and postprocessing on the cores that decode."""
        self.request, self.tokenizer = request, tokenizer
        self.window = StreamWindow(tokenizer)
        self.generated: list[int] = []
        self.interval, self.last_sent = stream_interval_s, None

    def send(self, outputs: dict[str, np.ndarray], final: bool) -> None:
        raise NotImplementedError

    def error(self, exc: BaseException) -> None:
        raise NotImplementedError

    def cancelled(self) -> bool:
        return False

    def _piece(self, window: tuple[list[int], int] | None) -> dict[str, np.ndarray]:
        ids, prefix = window if window else ([], 0)
        if self.request.text_out:
            return {"text_output": np.array([window_text(self.tokenizer, ids, prefix).encode()], dtype=np.object_)}
        return {"output_ids": np.array(ids, dtype=np.int32), "prefix_len": np.array([prefix], dtype=np.int32)}

    def on_tokens(self, tokens: list[int]) -> None:
        self.generated += tokens
        if not self.request.stream:
            return
        now = time.monotonic()
        if self.last_sent is not None and now - self.last_sent < self.interval:
            self.window.hold(tokens)
            return
        window = self.window.push(tokens)
        if window:
            self.send(self._piece(window), final=False)
            self.last_sent = now

    def on_finish(self, stats: SeqStats) -> None:
        window = self.window.finish() if self.request.stream else (self.generated, 0)
        self.send({**self._piece(window), **totals(stats, len(self.generated))}, final=True)


class ServingLoop:
    """Owns a Decoder on one thread: requests join between rounds, every round serves all of them.
    Triton's execute() only submits; cancellation is polled between rounds."""

    def __init__(self, make_decoder: Callable[[], Decoder],
                 on_change: Callable[[Decoder, RoundStats | None], None] = lambda d, r: None):
        """on_change(decoder, round) after every round (round stats) and cancellation (None)."""
        self.make_decoder, self.on_change = make_decoder, on_change
        self.inbox: queue.Queue[tuple[Request, Channel]] = queue.Queue()
        self.channels: dict[int, Channel] = {}
        self.decoder: Decoder | None = None
        self.stopping = False
        self.thread = threading.Thread(target=self._run, name="saguaro-rounds", daemon=True)
        self.thread.start()

    def submit(self, request: Request, channel: Channel) -> None:
        self.inbox.put((request, channel))

    def stop(self) -> None:
        self.stopping = True
        self.thread.join(10)
        if self.decoder is not None and not self.thread.is_alive():   # never under a running round
            self.decoder.close()

    def _run(self) -> None:
        while not self.stopping:
            try:
                self._admit(block=not self.channels)
                self._drop_cancelled()
                if self.decoder is not None and self.decoder.active:
                    self._round()
            except Exception as e:  # a bug in a round must not take the server down
                traceback.print_exc()
                self._fail_all(e)

    def _admit(self, block: bool) -> None:
        try:
            items = [self.inbox.get(timeout=0.1)] if block else []
        except queue.Empty:
            return
        while True:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        for req, ch in items:
            try:
                if self.decoder is None:
                    self.decoder = self.make_decoder()
                if req.inject_draft_fault and self.decoder.draft is not None:
                    self.decoder.draft.inject_fault = True
                seq_id = self.decoder.add(req.prompt, req.params, req.mode, req.k, req.budget, req.saguaro_c)
                self.channels[seq_id] = ch
            except Exception as e:
                ch.error(e)

    def _drop_cancelled(self) -> None:
        for seq_id, ch in list(self.channels.items()):
            if ch.cancelled():
                self.decoder.abort(seq_id)
                del self.channels[seq_id]
                self.on_change(self.decoder, None)

    def _round(self) -> None:
        events = self.decoder.step()
        # metrics first: a client that reads them after its final response must see its round
        self.on_change(self.decoder, self.decoder.history[-1])
        self.decoder.history.clear()
        for e in events:
            ch = self.channels.get(e.seq_id)
            if ch is None:
                continue
            ch.on_tokens(e.tokens)
            if e.finish_reason is not None:
                ch.on_finish(e.stats)
                del self.channels[e.seq_id]

    def _fail_all(self, exc: BaseException) -> None:
        for seq_id, ch in list(self.channels.items()):
            ch.error(exc)
            if self.decoder is not None:
                self.decoder.abort(seq_id)
        self.channels.clear()
