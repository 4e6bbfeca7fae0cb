"""Engines and drafters in another process, behind the same interfaces as local ones.

Messages are saguaro.messages types (data only, validated on receipt):
  ssd -> target: EngineServer.handle(Forward | EngineInfoQuery | ResetEngine)  <- RemoteEngine
  ssd -> draft:  DraftServer.handle(DraftRound) -> DraftReply, then NextCaches  <- RemoteDraft
A handler yields its answers; the draft's second answer comes after the cache build, which runs
while the caller verifies. Transports: saguaro.ipc (`serve_wire` on one end, `WireClient` on the
other: the library's worker pipe and, in Triton, an authenticated Unix socket between the model
processes, 0.1 ms a round trip), or Triton BLS (triton_models.bls_call).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

from saguaro.draft import Drafter, DraftRound, PendingRound
from saguaro.engines.base import Engine, SlotTable
from saguaro.errors import DraftFailure, SaguaroError
from saguaro.messages import (Done, DraftInfo, DraftInfoQuery, EngineInfo, EngineInfoQuery, Forward, ForwardResult,
                              NextCaches, ResetDraft, ResetEngine)


class EngineServer:
    """The `target` model's side: a real engine driven by RemoteEngine messages."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self.slots: dict[int, int] = {}   # the client's slot ids -> this engine's

    def _slot(self, remote: int) -> int:
        if remote not in self.slots:
            self.slots[remote] = self.engine.allocate()
        return self.slots[remote]

    def handle(self, msg) -> Iterator:
        """One answer per message (a generator, like DraftServer.handle, for the same transports)."""
        e = self.engine
        if isinstance(msg, EngineInfoQuery):
            yield EngineInfo(vocab_size=e.vocab_size, max_seq_len=e.max_seq_len, max_slots=e.max_slots,
                             max_draft_len=e.max_draft_len)
        elif isinstance(msg, ResetEngine):
            for slot in self.slots.values():
                e.release(slot)
            self.slots.clear()
            yield Done()
        elif isinstance(msg, Forward):
            if not len(msg.slots) == len(msg.starts) == len(msg.tokens):
                raise SaguaroError("Forward: slots, starts and tokens must have one entry per sequence")
            for remote in msg.released:
                if remote in self.slots:
                    e.release(self.slots.pop(remote))
            e.use_all_cores(msg.all_cores)
            slots = [self._slot(r) for r in msg.slots]
            for slot, start in zip(slots, msg.starts):
                e.truncate(slot, start)
            if msg.greedy:
                out = e.forward_greedy(slots, msg.tokens)
            else:
                out = e.forward(slots, msg.tokens, msg.logits)
            yield ForwardResult(outputs=list(out))
        else:
            raise SaguaroError(f"the target engine does not answer {type(msg).__name__}")


class RemoteEngine(SlotTable, Engine):
    """The Engine interface over call(msg) -> iterator of replies (one) to an EngineServer in
    another process (Triton's `target` model). Slot bookkeeping is local: each forward carries
    every slot's length, so rollback and release cost no call. A new client starts the server
    over (ResetEngine): it is the server's only client, and what an earlier one held is stale."""

    def __init__(self, call: Callable[[object], Iterator]):
        self.call = call
        info = next(call(EngineInfoQuery()))
        next(call(ResetEngine()))
        self.vocab_size, self.max_seq_len = info.vocab_size, info.max_seq_len
        self.max_draft_len, self.max_branches = info.max_draft_len, 0
        self.init_slots(info.max_slots)
        self.released: list[int] = []   # told to the server with the next forward
        self.all_cores = False           # told to the server with every forward

    def use_all_cores(self, on: bool) -> None:
        self.all_cores = on

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
        msg = Forward(slots=list(slots), starts=[self.lengths[s] for s in slots], tokens=[list(t) for t in tokens],
                      released=self.released, all_cores=self.all_cores, **output)
        result = next(self.call(msg))
        self.released = []
        for s, t in zip(slots, tokens):
            self.lengths[s] += len(t)
        return result.outputs

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
        if isinstance(msg, DraftInfoQuery):
            e = d.engine
            yield DraftInfo(vocab_size=e.vocab_size, max_draft_len=e.max_draft_len, max_branches=e.max_branches)
        elif isinstance(msg, ResetDraft):
            d.release_all()
            yield Done()
        elif isinstance(msg, DraftRound):
            if msg.inject_fault:
                raise RuntimeError("injected draft fault (test switch)")
            yield from d.answer(msg)
        else:
            raise SaguaroError(f"the drafter does not answer {type(msg).__name__}")


@dataclass
class RemoteDraft:
    """DraftClient over a DraftServer in another process (Triton's `draft` model, the library's
    worker): call(msg) yields the server's answers, in order, as they arrive."""
    call: Callable[[object], Iterator]
    info: DraftInfo | None = None        # None: ask the server
    inject_fault: bool = False           # test switch: the next round makes the draft raise
    vocab_size: int = field(init=False)
    max_draft_len: int = field(init=False)
    max_branches: int = field(init=False)

    def __post_init__(self):
        if self.info is None:
            self.info = next(self.call(DraftInfoQuery()))
        info = self.info
        self.vocab_size, self.max_draft_len, self.max_branches = info.vocab_size, info.max_draft_len, info.max_branches

    def start(self, rnd: DraftRound) -> PendingRound:
        """Sends the round now (so the drafter works while the caller verifies)."""
        rnd.inject_fault, self.inject_fault = self.inject_fault, False
        try:
            answers = self.call(rnd)
        except Exception as e:
            raise DraftFailure(str(e)) from e
        return PendingRound(self._answers(answers), getattr(self.call, "ready", None))

    def _answers(self, answers: Iterator) -> Iterator:
        try:
            yield next(answers)
            caches = next(answers, None)
            yield caches if isinstance(caches, NextCaches) else NextCaches(keys={})
        except DraftFailure:
            raise
        except Exception as e:
            raise DraftFailure(str(e)) from e

    def reset(self) -> None:
        next(self.call(ResetDraft()))

    def close(self) -> None:
        try:
            self.reset()
        except Exception:
            pass                        # a dead drafter holds nothing
        getattr(self.call, "close", lambda: None)()
