"""Engines and drafters in another process, behind the same interfaces as local ones.

Messages are plain picklable objects (our own models on both ends):
  ssd --BLS--> target: EngineServer.handle({"op": "forward", ...})  <- RemoteEngine is its client
  ssd --BLS--> draft:  DraftServer.handle(DraftRound) -> DraftReply  <- RemoteDraft is its client
The draft side builds the next speculation caches after its answer has been sent (Triton's
`draft` model after responding; the library's worker process after replying on its pipe).
q tensors travel as numpy arrays: torch's own pickling would route them through shared-memory
files, which costs more than the copy.
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from saguaro.draft import Drafter, DraftReply, DraftRound
from saguaro.engines.base import Engine
from saguaro.errors import DraftFailure, SaguaroError


def encode(obj) -> np.ndarray:
    """A message as a BYTES tensor (our own models on both ends of the call)."""
    return np.array([pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)], dtype=np.object_)


def decode(tensor: np.ndarray):
    return pickle.loads(tensor.reshape(-1)[0])


class EngineServer:
    """The `target` model's side: a real engine driven by RemoteEngine messages."""

    def __init__(self, engine: Engine):
        self.engine = engine

    def handle(self, msg: dict):
        e = self.engine
        if msg["op"] == "info":
            return {"vocab_size": e.vocab_size, "max_seq_len": e.max_seq_len, "max_slots": e.max_slots,
                    "max_draft_len": e.max_draft_len}
        if msg["op"] == "forward":
            for slot, start in zip(msg["slots"], msg["starts"]):
                e.truncate(slot, start)
            out = e.forward(msg["slots"], msg["tokens"], msg.get("logits", True))
            return [x.numpy() for x in out]
        raise SaguaroError(f"unknown engine op {msg['op']!r}")


class RemoteEngine(Engine):
    """The Engine interface over a call to an EngineServer in another process. Slot bookkeeping
    is local: each forward carries every slot's length, so rollback and release cost no call."""

    def __init__(self, call: Callable[[object], object]):
        self.call = call
        info = call({"op": "info"})
        self.vocab_size, self.max_seq_len = info["vocab_size"], info["max_seq_len"]
        self.max_slots, self.max_draft_len, self.max_branches = info["max_slots"], info["max_draft_len"], 0
        self.lengths = [0] * self.max_slots
        self.free = list(range(self.max_slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self.free:
            raise SaguaroError(f"all {self.max_slots} target KV slots are in use: raise max_slots or retry later")
        slot = self.free.pop()
        self.lengths[slot] = 0
        return slot

    def release(self, slot: int) -> None:
        if slot not in self.free:
            self.free.append(slot)

    @property
    def active_slots(self) -> int:
        return self.max_slots - len(self.free)

    def length(self, slot: int) -> int:
        return self.lengths[slot]

    def truncate(self, slot: int, length: int) -> None:
        self.lengths[slot] = min(self.lengths[slot], length)

    def forward(self, slots, tokens, logits: bool = True):
        out = self.call({"op": "forward", "slots": slots, "starts": [self.lengths[s] for s in slots],
                         "tokens": tokens, "logits": logits})
        for s, t in zip(slots, tokens):
            self.lengths[s] += len(t)
        return [torch.from_numpy(x) for x in out]

    def branch_step(self, parents, visible, tokens, depth):
        raise SaguaroError("the target engine does not decode branches")


class DraftServer:
    """The `draft` model's side: a Drafter answering rounds; `build()` after the answer is sent."""

    def __init__(self, drafter: Drafter):
        self.drafter = drafter

    def handle(self, msg):
        d = self.drafter
        if msg == "info":
            e = d.engine
            return {"vocab_size": e.vocab_size, "max_draft_len": e.max_draft_len, "max_branches": e.max_branches}
        if msg == "reset":
            d.release_all()
            return "ok"
        if msg.inject_fault:
            raise RuntimeError("injected draft fault (test switch)")
        reply = d.step(msg)
        for spec in reply.specs.values():
            if spec.q is not None:
                spec.q = spec.q.numpy()
        return reply


@dataclass
class RemoteDraft:
    """DraftClient over a call to a DraftServer in another process (Triton's `draft` model)."""
    call: Callable[[object], object]
    inject_fault: bool = False           # test switch: the next round makes the draft raise
    vocab_size: int = field(init=False)
    max_draft_len: int = field(init=False)
    max_branches: int = field(init=False)

    def __post_init__(self):
        info = self.call("info")
        self.vocab_size, self.max_draft_len, self.max_branches = info["vocab_size"], info["max_draft_len"], info["max_branches"]

    def step(self, rnd: DraftRound) -> DraftReply:
        rnd.inject_fault, self.inject_fault = self.inject_fault, False
        try:
            reply = self.call(rnd)
        except Exception as e:
            raise DraftFailure(str(e)) from e
        for spec in reply.specs.values():
            if spec.q is not None:
                spec.q = torch.from_numpy(spec.q)
        return reply

    def reset(self) -> None:
        self.call("reset")

    def close(self) -> None:
        try:
            self.reset()
        except Exception:
            pass                        # a dead drafter holds nothing
        if hasattr(self.call, "close"):
            self.call.close()
