"""Serving without Triton types: request parsing, the round loop and what goes back to clients.

The Triton models in model_repository/ are thin: they turn tensors into the calls below, so the
whole serving path (parse -> Decoder rounds -> streamed pieces -> totals) is the same code in
Triton and in tests.
"""
from __future__ import annotations

import collections
import queue
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Callable

import numpy as np

from saguaro.config import MODES, SamplingParams
from saguaro.decoder import Decoder, RoundStats, SeqStats
from saguaro.errors import PeerUnavailable, SaguaroError, ServerBusy, Unavailable
from saguaro.text import BYTES_PER_TOKEN, StreamWindow, decode_text_input, encode_prompt, window_text

# -- requests ---------------------------------------------------------------------------------------

# Optional inputs: name -> (numpy kinds accepted, converter). Names follow NVIDIA's ensemble/BLS.
_SCALARS: dict[str, tuple[str, Callable]] = {
    "max_tokens": ("iu", int), "temperature": ("f", float), "top_k": ("iu", int), "top_p": ("f", float),
    "seed": ("iu", int), "end_id": ("iu", int), "num_draft_tokens": ("iu", int), "fanout_budget": ("iu", int),
    "saguaro_c": ("f", float), "stream": ("b", bool), "inject_draft_fault": ("b", bool),
}


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


def _string(inputs: dict[str, np.ndarray], name: str, max_bytes: int | None = None) -> str | None:
    value = inputs.get(name)
    if value is None:
        return None
    if value.dtype.kind not in "OSU" or value.size != 1:
        raise SaguaroError(f"{name}: expected one BYTES string, got {value.dtype} shape {list(value.shape)}")
    return decode_text_input(value.reshape(-1)[0], name, max_bytes)


def parse_request(inputs: dict[str, np.ndarray], tokenizer, limits: ServeLimits) -> Request:
    """A request from its input tensors; SaguaroError naming the field for anything wrong."""
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
    vocab = getattr(tokenizer, "get_vocab_size", lambda: None)()
    if vocab and (min(prompt) < 0 or max(prompt) >= vocab):
        raise SaguaroError(f"input_ids: token ids must be in [0, {vocab})")
    v = {name: _scalar(inputs, name) for name in _SCALARS}
    max_tokens = limits.default_max_tokens if v["max_tokens"] is None else v["max_tokens"]
    if not 1 <= max_tokens <= limits.max_tokens:
        raise SaguaroError(f"max_tokens={max_tokens}: must be in [1, {limits.max_tokens}] (this server's limit); "
                           f"it is INT32, so JSON numbers of 2^31 or more wrap before they reach the server")
    if v["end_id"] is not None and vocab and not 0 <= v["end_id"] < vocab:
        raise SaguaroError(f"end_id={v['end_id']}: must be a token id in [0, {vocab})")
    if v["fanout_budget"] is not None and not 1 <= v["fanout_budget"] <= limits.max_budget:
        raise SaguaroError(f"fanout_budget={v['fanout_budget']}: must be in [1, {limits.max_budget}]")
    mode = (_string(inputs, "decoding_mode") or "ssd").strip().lower()
    if mode not in MODES:
        raise SaguaroError(f"decoding_mode={mode!r}: use one of {', '.join(MODES)}")
    stop_words = inputs.get("stop_words")
    if stop_words is not None and (stop_words.dtype.kind not in "OSU" or stop_words.size > MAX_STOP_WORDS):
        raise SaguaroError(f"stop_words: expected at most {MAX_STOP_WORDS} BYTES strings, got {stop_words.dtype} "
                           f"shape {list(stop_words.shape)}")
    stops = tuple(tuple(tokenizer.encode(decode_text_input(s, "stop_words", MAX_STOP_WORD_BYTES)).ids)
                  for s in (stop_words.reshape(-1) if stop_words is not None else []) if len(s))
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
            "drafted_tokens": i32(stats.drafted), "cache_hits": i32(stats.cache_hits),
            "ar_rounds": i32(stats.ar_rounds), "sd_rounds": i32(stats.sd_rounds), "ssd_rounds": i32(stats.ssd_rounds)}


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
            ch.on_tokens(e.tokens)
            if e.finish_reason is not None:
                ch.on_finish(e.stats)
                del self.channels[e.seq_id]

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
