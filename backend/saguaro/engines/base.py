"""The engine interface the decoding core drives.

An engine owns one model's weights and a preallocated KV cache divided into slots, one slot per
live sequence. The core never sees tensors of the cache: it asks for logits of new tokens and
moves a slot's length back (rollback) when draft tokens are rejected.

Draft engines also decode *branches*: many short continuations off one sequence's prefix in one
batched forward (tree attention). A branch sees its parent slot's first `visible` cached
positions plus its own earlier branch tokens, which live in scratch KV reused every round.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from saguaro.errors import SaguaroError
from saguaro.sampling import greedy


class Engine(ABC):
    vocab_size: int
    max_seq_len: int      # positions one slot can hold
    max_slots: int        # sequences that can be live at once
    max_draft_len: int    # longest speculation (K) a forward or branch step may carry
    max_branches: int     # branches per branch_step call (draft engines; 0 if unsupported)

    @abstractmethod
    def allocate(self) -> int:
        """Reserve a free slot (length 0) and return its id; SaguaroError when none is free."""

    @abstractmethod
    def release(self, slot: int) -> None:
        """Free a slot. Releasing a free slot is a no-op."""

    @abstractmethod
    def length(self, slot: int) -> int:
        """Tokens cached in the slot."""

    @abstractmethod
    def truncate(self, slot: int, length: int) -> None:
        """Forget cached positions >= length (rollback after rejected draft tokens)."""

    @abstractmethod
    def forward(self, slots: list[int], tokens: list[list[int]], logits: bool = True) -> list[torch.Tensor]:
        """Append tokens[i] to slot slots[i] (all in one batched forward) and return, per slot,
        float32 logits of shape [len(tokens[i]), vocab] for each new position. Used for prefill,
        single-token decode and (K+1)-token verification alike. logits=False (prefill whose
        logits nobody reads) returns [] and may skip the LM head."""

    def forward_greedy(self, slots: list[int], tokens: list[list[int]]) -> list[torch.Tensor]:
        """forward(), keeping of each position's logits only the argmax id: all that greedy
        verification reads, and 4 bytes instead of a vocabulary's worth to carry between processes."""
        return [greedy(x) for x in self.forward(slots, tokens)]

    @abstractmethod
    def branch_step(self, parents: torch.Tensor, visible: torch.Tensor, tokens: torch.Tensor,
                    depth: int) -> torch.Tensor:
        """One decoding step for N branches at once.

        parents[n]: slot the branch hangs off; visible[n]: how many of that slot's cached
        positions it sees; tokens[n]: the token fed at this depth, at position visible[n] + depth.
        depth 0 starts a new set of branches (scratch is overwritten). Returns float32 logits
        [N, vocab]. The parent slots are not modified."""

    @property
    def active_slots(self) -> int:
        """Slots currently allocated (0 when every request has released what it held)."""
        raise NotImplementedError

    def use_all_cores(self, on: bool) -> None:
        """Forwards from now on may use every core (the drafter is idle during them), or only the
        engine's configured threads. Engines without a thread count of their own ignore it."""

    def close(self) -> None:
        """Free what the engine holds outside this process (TensorRT-LLM executor, connections)."""


class SlotTable:
    """Slot bookkeeping for engines whose slot state is a length: which slots are free and how many
    positions each holds. Rollback is just a shorter length (later writes overwrite the rest)."""

    def init_slots(self, max_slots: int) -> None:
        self.max_slots = max_slots
        self.lengths = [0] * max_slots
        self.free = list(range(max_slots - 1, -1, -1))

    def allocate(self) -> int:
        if not self.free:
            raise SaguaroError(f"all {self.max_slots} KV slots are in use: raise max_slots or retry when requests finish")
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
