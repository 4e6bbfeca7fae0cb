"""Admission in front of the KV slots: requests wait in a bounded queue for a slot (served in
order as slots free up), a full queue answers ServerBusy (retryable) at once, a request cancelled
while waiting leaves, and stopping ends whatever is left with a retryable error."""
from __future__ import annotations

import threading
import time

import pytest

from saguaro.config import DEMO_TARGET, EngineConfig, SamplingParams
from saguaro.errors import ServerBusy, Unavailable
from saguaro.llm import build_decoder
from saguaro.request_loop import Channel, Request, ServingLoop
from saguaro.text import load_tokenizer
from tiny_models import save_random_model

TOKENIZER = load_tokenizer(DEMO_TARGET)
PROMPT = TOKENIZER.encode("def quicksort(xs):\n").ids


class Recorder(Channel):
    def __init__(self, max_tokens: int, request: Request | None = None):
        super().__init__(request or Request(prompt=PROMPT, params=SamplingParams(max_tokens=max_tokens)), TOKENIZER)
        self.done, self.failure, self.cancel = threading.Event(), None, False
        self.started = self.finished = None

    def send(self, outputs, final):
        if final:
            self.finished = time.monotonic()
            self.done.set()

    def on_tokens(self, tokens):
        self.started = self.started or time.monotonic()
        super().on_tokens(tokens)

    def error(self, exc):
        self.failure = exc
        self.done.set()

    def cancelled(self):
        if self.cancel:
            self.done.set()
        return self.cancel


@pytest.fixture(scope="module")
def loop():
    cfg = EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=2, max_seq_len=512)
    decoder = build_decoder(cfg, draft=None)
    lp = ServingLoop(lambda: decoder, max_queue=2)
    yield lp
    lp.stop(grace_s=0)


def submit(loop, max_tokens: int) -> Recorder:
    ch = Recorder(max_tokens)
    loop.submit(Request(prompt=PROMPT, params=SamplingParams(max_tokens=max_tokens), mode="ar"), ch)
    return ch


def test_requests_wait_for_a_slot_and_a_full_queue_is_refused(loop):
    running = [submit(loop, 200) for _ in range(2)]       # both slots
    time.sleep(0.3)
    waiting = [submit(loop, 4) for _ in range(2)]         # the queue
    refused = submit(loop, 4)
    assert refused.done.wait(5) and isinstance(refused.failure, ServerBusy), refused.failure
    assert "max_queued_requests" in str(refused.failure)
    for ch in running + waiting:
        assert ch.done.wait(120) and ch.failure is None
    assert all(w.started >= min(r.finished for r in running) for w in waiting), "a waiting request ran without a slot"
    assert loop.decoder.free_slots == 2 and not loop.waiting


def test_a_request_cancelled_while_waiting_leaves_the_queue(loop):
    running = [submit(loop, 150) for _ in range(2)]
    time.sleep(0.3)
    waiting = submit(loop, 4)
    waiting.cancel = True
    assert waiting.done.wait(10) and waiting.started is None
    for ch in running:
        assert ch.done.wait(120) and ch.failure is None
    assert loop.decoder.free_slots == 2 and not loop.waiting


def test_stop_ends_requests_in_flight_with_a_retryable_error():
    cfg = EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=1, max_seq_len=1024)
    lp = ServingLoop(lambda: build_decoder(cfg, draft=None), max_queue=4)
    chans = [submit(lp, 1000), submit(lp, 1000)]
    deadline = time.monotonic() + 60    # the first decodes (a fixed sleep let it finish on a fast host)
    while chans[0].started is None and time.monotonic() < deadline:
        time.sleep(0.01)
    t0 = time.monotonic()
    lp.stop(grace_s=0.2)
    assert time.monotonic() - t0 < 3
    for ch in chans:
        assert ch.done.is_set() and isinstance(ch.failure, Unavailable), ch.failure
    late = submit(lp, 4)
    assert isinstance(late.failure, Unavailable) and "shutting down" in str(late.failure)


class Breaking(Recorder):
    """A request whose response cannot be built (its send raises, as a bug in one response's outputs would)."""

    def send(self, outputs, final):
        raise ValueError("this response cannot be built")


def test_a_request_whose_response_fails_ends_alone(loop):
    # it raised out of the round, and the loop failed every request in flight with its error
    others = [submit(loop, 40)]
    request = Request(prompt=PROMPT, params=SamplingParams(max_tokens=40), mode="ar", stream=True)
    broken = Breaking(40, request)
    loop.submit(request, broken)
    for ch in others + [broken]:
        assert ch.done.wait(120)
    assert isinstance(broken.failure, ValueError)
    assert others[0].failure is None and len(others[0].generated) == 40
    assert loop.decoder.active == 0 and loop.decoder.target.active_slots == 0


def test_ids_the_model_has_and_its_tokenizer_lacks_decode_to_nothing(tmp_path):
    # a vocabulary padded past the tokenizer's (Qwen2.5: 151936 rows, 151665 ids): a sampled
    # request that drew a padding id failed the round for every request in flight (INVALID_ARG,
    # "output_ids: ids must lie in 0..4095"), though no input was bad
    save_random_model(tmp_path / "padded", vocab_size=4200, max_position_embeddings=512)
    decoder = build_decoder(EngineConfig(checkpoint=str(tmp_path / "padded"), max_slots=4, max_seq_len=512), draft=None)
    lp = ServingLoop(lambda: decoder)
    try:
        sampled = SamplingParams(max_tokens=200, temperature=1.0, seed=3)
        chans = []
        for params, text in ((SamplingParams(max_tokens=200), True), (sampled, True), (SamplingParams(max_tokens=200), False)):
            request = Request(prompt=PROMPT, params=params, mode="ar", stream=True, text_out=text)
            chans.append(Recorder(200, request))
            lp.submit(request, chans[-1])
        for ch in chans:
            assert ch.done.wait(120)
        assert [ch.failure for ch in chans] == [None, None, None]
        assert max(chans[1].generated) >= TOKENIZER.get_vocab_size()      # it drew a padding id
    finally:
        lp.stop(grace_s=0)
