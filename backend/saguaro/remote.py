"""Engines and drafters in another process, behind the same interfaces as local ones.

Messages are plain picklable objects (our own code on both ends):
  ssd -> target: EngineServer.handle({"op": "forward", ...})   <- RemoteEngine is its client
  ssd -> draft:  DraftServer.handle(DraftRound) -> DraftReply, then the next cache keys
                                                               <- RemoteDraft is its client
A handler yields its answers; the draft's second answer comes after the cache build, which runs
while the caller verifies. Transports: a multiprocessing connection (`serve_wire` on one end,
`WireClient` on the other: the library's worker pipe and, in Triton, a Unix socket between the
model processes, 0.1 ms a round trip), or Triton BLS (triton_glue.bls_call). q tensors travel as
numpy arrays: torch's own pickling would route them through shared-memory files.
"""
from __future__ import annotations

import pickle
import traceback
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from saguaro.draft import Drafter, DraftRound, PendingRound
from saguaro.engines.base import Engine, SlotTable
from saguaro.errors import DraftFailure, SaguaroError


def serve_wire(conn, handle: Callable[[object], Iterator]) -> None:
    """Answer messages on a connection until it closes or sends None: each answer as soon as the
    handler yields it, then an end marker; a failure as one error answer."""
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg is None:
            return
        try:
            for answer in handle(msg):
                conn.send(("ok", answer))
            conn.send(("end", None))
        except Exception:
            conn.send(("error", traceback.format_exc()))


class WireClient:
    """call(msg) -> iterator of the answers from a serve_wire peer, read as they arrive. A reply
    missing for timeout_s, or a closed connection, raises DraftFailure after `on_broken()` (which
    may replace the peer: its state is gone)."""

    def __init__(self, conn, timeout_s: float, on_broken: Callable[[], None] | None = None):
        self.conn, self.timeout_s = conn, timeout_s
        self.on_broken = on_broken or (lambda: None)
        self.open = False            # answers of the last call not read yet

    def __call__(self, msg) -> Iterator:
        while self.open:             # what the previous caller left unread, up to its end marker
            self.open = self._recv()[0] == "ok"
        self.conn.send(msg)
        self.open = True
        return self._answers()

    def _answers(self) -> Iterator:
        while self.open:
            status, answer = self._recv()
            self.open = status == "ok"
            if status == "error":
                raise DraftFailure(f"remote failure: {answer}")
            if status == "ok":
                yield answer

    def _recv(self):
        try:
            if not self.conn.poll(self.timeout_s):
                raise TimeoutError(f"no answer within {self.timeout_s} s")
            return self.conn.recv()
        except (EOFError, OSError, TimeoutError) as e:
            self.open = False
            self.close()             # late answers must not be read as the next call's
            try:
                self.on_broken()
            except Exception as replacement_failed:
                raise DraftFailure(f"remote peer failed ({e}) and could not be replaced: {replacement_failed}") from e
            raise DraftFailure(f"remote peer failed: {e}") from e

    def close(self) -> None:
        self.conn.close()


def encode(obj) -> np.ndarray:
    """A message as a BYTES tensor (our own models on both ends of the call)."""
    return np.array([pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)], dtype=np.object_)


def decode(tensor: np.ndarray):
    return pickle.loads(tensor.reshape(-1)[0])


class EngineServer:
    """The `target` model's side: a real engine driven by RemoteEngine messages."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.slots: dict[int, int] = {}   # the client's slot ids -> this engine's

    def _slot(self, remote: int) -> int:
        if remote not in self.slots:
            self.slots[remote] = self.engine.allocate()
        return self.slots[remote]

    def handle(self, msg: dict) -> Iterator:
        """One answer per message (a generator, like DraftServer.handle, for the same transports)."""
        e = self.engine
        if msg["op"] == "info":
            yield {"vocab_size": e.vocab_size, "max_seq_len": e.max_seq_len, "max_slots": e.max_slots,
                   "max_draft_len": e.max_draft_len}
        elif msg["op"] == "forward":
            for remote in msg.get("released", []):
                if remote in self.slots:
                    e.release(self.slots.pop(remote))
            slots = [self._slot(r) for r in msg["slots"]]
            for slot, start in zip(slots, msg["starts"]):
                e.truncate(slot, start)
            if msg.get("greedy"):
                out = e.forward_greedy(slots, msg["tokens"])
            else:
                out = e.forward(slots, msg["tokens"], msg.get("logits", True))
            yield [x.numpy() for x in out]
        else:
            raise SaguaroError(f"unknown engine op {msg['op']!r}")


class RemoteEngine(SlotTable, Engine):
    """The Engine interface over call(msg) -> iterator of replies (one) to an EngineServer in
    another process (Triton's `target` model). Slot bookkeeping
    is local: each forward carries every slot's length, so rollback and release cost no call."""

    def __init__(self, call: Callable[[object], object]):
        self.call = call
        info = next(call({"op": "info"}))
        self.vocab_size, self.max_seq_len = info["vocab_size"], info["max_seq_len"]
        self.max_draft_len, self.max_branches = info["max_draft_len"], 0
        self.init_slots(info["max_slots"])
        self.released: list[int] = []   # told to the server with the next forward

    def release(self, slot: int) -> None:
        if slot not in self.free:
            self.released.append(slot)
        super().release(slot)

    def close(self) -> None:
        getattr(self.call, "close", lambda: None)()

    def forward(self, slots, tokens, logits: bool = True):
        return self._forward(slots, tokens, logits=logits)

    def forward_greedy(self, slots, tokens):
        return self._forward(slots, tokens, greedy=True)

    def _forward(self, slots, tokens, **output):
        out = next(self.call({"op": "forward", "slots": slots, "starts": [self.lengths[s] for s in slots],
                              "tokens": tokens, "released": self.released, **output}))
        self.released = []
        for s, t in zip(slots, tokens):
            self.lengths[s] += len(t)
        return [torch.from_numpy(x) for x in out]

    def branch_step(self, parents, visible, tokens, depth):
        raise SaguaroError("the target engine does not decode branches")


class DraftServer:
    """The `draft` model's side: a Drafter answering rounds. `handle` yields the answers to one
    message; for a round the second (the cache keys) comes after the build, so the caller's
    transport must send the first as soon as it is yielded."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter

    def handle(self, msg) -> Iterator:
        d = self.drafter
        if msg == "info":
            e = d.engine
            yield {"vocab_size": e.vocab_size, "max_draft_len": e.max_draft_len, "max_branches": e.max_branches}
        elif msg == "reset":
            d.release_all()
            yield "ok"
        elif msg.inject_fault:
            raise RuntimeError("injected draft fault (test switch)")
        else:
            answers = d.answer(msg)
            reply = next(answers)
            for spec in reply.specs.values():
                if spec.q is not None:
                    spec.q = spec.q.numpy()
            yield reply
            yield from answers


@dataclass
class RemoteDraft:
    """DraftClient over a DraftServer in another process (Triton's `draft` model, the library's
    worker): call(msg) yields the server's answers, in order, as they arrive."""
    call: Callable[[object], Iterator]
    inject_fault: bool = False           # test switch: the next round makes the draft raise
    vocab_size: int = field(init=False)
    max_draft_len: int = field(init=False)
    max_branches: int = field(init=False)

    def __post_init__(self):
        info = next(self.call("info"))
        self.vocab_size, self.max_draft_len, self.max_branches = info["vocab_size"], info["max_draft_len"], info["max_branches"]

    def start(self, rnd: DraftRound) -> PendingRound:
        """Sends the round now (so the drafter works while the caller verifies)."""
        rnd.inject_fault, self.inject_fault = self.inject_fault, False
        try:
            answers = self.call(rnd)
        except Exception as e:
            raise DraftFailure(str(e)) from e
        return PendingRound(self._answers(answers))

    def _answers(self, answers: Iterator) -> Iterator:
        try:
            reply = next(answers)
            for spec in reply.specs.values():
                if spec.q is not None:
                    spec.q = torch.from_numpy(spec.q)
            yield reply
            yield next(answers, {})
        except DraftFailure:
            raise
        except Exception as e:
            raise DraftFailure(str(e)) from e

    def reset(self) -> None:
        next(self.call("reset"))

    def close(self) -> None:
        try:
            self.reset()
        except Exception:
            pass                        # a dead drafter holds nothing
        getattr(self.call, "close", lambda: None)()
