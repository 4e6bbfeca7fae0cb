"""The PyTorch engine: the CPU default and the reference for every other engine.

KV layout per layer: [slots, positions, kv_heads, head_dim], preallocated. A slot holds
`max_seq_len` real positions plus, on draft engines, scratch room after them for branch decoding:
branch tokens are written just past the parent's cached length, so a branch step reads one
contiguous slice of the parent slot (prefix + scratch) and a mask picks what each branch sees.
"""
from __future__ import annotations

import os

import torch

from saguaro.config import EngineConfig
from saguaro.engines import place_thread
from saguaro.engines.base import Engine, SlotTable
from saguaro.errors import SaguaroError
from saguaro.model import (CacheView, Transformer, cpu_has_fast_bf16, fbgemm_fp16_available, hold_weights_in_fp16,
                           pack_linears, rope_tables)


def resolve_dtype(dtype: str, device: str, draft: bool = False) -> torch.dtype:
    if dtype == "auto":
        if device != "cpu":
            return torch.bfloat16
        # A CPU engine computes in fp32, its weights held in fp16 where that is exact (TorchEngine).
        # The target must: greedy exactness needs a verify forward of K+1 tokens to pick the tokens
        # one-token forwards would, and bf16 rounding turns fp32's 1e-6 differences between the two
        # into whole-ulp logit changes. The draft's numerics never change the output, but fp32 is
        # also its faster choice where the CPU has bf16 matmuls: a draft forward is a few rows, where
        # bf16 attention and oneDNN's per-call cost outweigh the arithmetic (docs/design.md, "The
        # engine on CPU": 0.43 against 0.63 ms for the demo draft's one-token forward), as long as
        # FBGEMM holds its weights in fp16; without FBGEMM (some aarch64 builds) it stays bf16.
        if draft and cpu_has_fast_bf16() and not fbgemm_fp16_available():
            return torch.bfloat16
        return torch.float32
    try:
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    except KeyError:
        raise SaguaroError(f"dtype={dtype!r}: use auto, float32, bfloat16 or float16") from None


class TorchEngine(SlotTable, Engine):
    def __init__(self, cfg: EngineConfig, branches: bool = False):
        cfg.validate()
        if cfg.device.startswith("cuda") and not torch.cuda.is_available():
            raise SaguaroError(f"device={cfg.device} but CUDA is not available: use device=cpu")
        self.cfg, self.device = cfg, torch.device(cfg.device)
        # Where this engine's forwards run, on `threads` and on prefill_threads (None: where they
        # are). A forward on `threads` keeps off the draft's core: the scheduler put the target's
        # thread there after rounds on every core, and the draft, woken by a round sent to it,
        # took the core from it (sending a round to the drafter took 1.9 ms on average at batch 1,
        # up to 6; 0.25-0.35 off the draft's core).
        cores = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") and cfg.device == "cpu" else None
        self.cores = None if not cores or cfg.threads < 1 else (cores - {cfg.draft_core} or cores, cores)
        dtype = resolve_dtype(cfg.dtype, cfg.device, draft=branches)
        self.model = Transformer.from_hf(cfg.checkpoint, dtype, cfg.device)
        self.half_weights = (0, 0)       # linear layers held in fp16 (exactly), and left in fp32
        a = self.model.args
        # the most rows of one forward: a prompt's prefill, or every sequence's branches in a build
        most_rows = max(cfg.max_seq_len, cfg.max_slots * cfg.max_branches if branches else 0)
        if cfg.device == "cpu" and dtype == torch.bfloat16 and cpu_has_fast_bf16():
            self._use_threads(cfg.threads)
            pack_linears(self.model, warm_rows=most_rows)
        elif cfg.device == "cpu" and cfg.dtype == "auto" and dtype == torch.float32:
            # fp32 math on weights held in fp16 where that is exact (a bf16 checkpoint's are): half
            # the bytes a memory-bound forward reads, read once for a verify's K + 1 rows. A draft's
            # forwards of many rows (a prompt's prefill, a catch-up) run in bf16 where the CPU has
            # native bf16 matmuls, their kernels generated for every row count they will see
            many = branches and cpu_has_fast_bf16()
            if many:
                self._use_threads(cfg.threads)
            self.half_weights = hold_weights_in_fp16(self.model, many_rows=most_rows if many else 0)
        self.vocab_size, self.max_slots, self.max_seq_len = a.vocab_size, cfg.max_slots, cfg.max_seq_len
        self.max_draft_len = cfg.max_draft_len
        self.wide_prefill = cfg.device == "cpu" and 0 < cfg.threads < cfg.prefill_threads
        self.all_cores = False           # every forward on prefill_threads (use_all_cores)
        self.max_branches = cfg.max_branches if branches else 0
        # Room past max_seq_len: one padded verify batch, plus branch scratch on draft engines.
        capacity = cfg.max_seq_len + cfg.max_draft_len + 1 + (cfg.max_draft_len + 1) * self.max_branches
        dt = self.model.embed.weight.dtype
        shape = (a.n_layers, cfg.max_slots, capacity, a.n_kv_heads, a.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dt, device=self.device)
        self.v_cache = torch.zeros(shape, dtype=dt, device=self.device)
        cos, sin = rope_tables(a, capacity)
        self.cos, self.sin = cos.to(self.device, dt), sin.to(self.device, dt)
        self.positions = torch.arange(capacity, device=self.device)
        self.init_slots(cfg.max_slots)
        self.tree: _BranchLayout | None = None

    # -- forward -------------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, slots: list[int], tokens: list[list[int]], logits: bool = True) -> list[torch.Tensor]:
        if len(slots) > 1 and not _consecutive(slots):
            order = sorted(range(len(slots)), key=slots.__getitem__)
            if _consecutive([slots[i] for i in order]):
                # run in slot order, so the batch reads the cache as one slice (_span_view)
                out = self.forward([slots[i] for i in order], [tokens[i] for i in order], logits)
                if not logits:
                    return out
                result: list[torch.Tensor] = [None] * len(slots)   # type: ignore[list-item]
                for j, i in enumerate(order):
                    result[i] = out[j]
                return result
        counts = [len(t) for t in tokens]
        width = max(counts)
        starts = [self.lengths[s] for s in slots]
        if max(starts) + width > self.max_seq_len + self.cfg.max_draft_len + 1:
            raise SaguaroError(f"sequence would exceed max_seq_len={self.max_seq_len}: shorten the prompt or max_tokens")
        tok = torch.zeros(len(slots), width, dtype=torch.long)
        for i, t in enumerate(tokens):
            tok[i, : len(t)] = torch.tensor(t)
        pos = torch.tensor(starts, device=self.device)[:, None] + self.positions[:width]
        end = max(starts) + width
        if len(slots) == 1:
            view = self._single_slot_view(slots[0], starts[0], width)
        elif _consecutive(slots):
            view = self._span_view(slots[0], pos, end)
        else:
            view = self._gather_view(torch.tensor(slots, device=self.device), pos, end)
        wide = (not logits or self.all_cores) and self.wide_prefill
        self._use_threads(self.cfg.prefill_threads if wide else self.cfg.threads)
        try:
            out = self.model(tok.to(self.device), self.cos[pos], self.sin[pos], view,
                             logits_from=0 if logits else width)
        finally:
            if wide and not self.all_cores:     # a prefill; rounds on every core keep them (no switch per round)
                self._use_threads(self.cfg.threads)
        for s, start, n in zip(slots, starts, counts):
            self.lengths[s] = start + n
        return [out[i, :n] for i, n in enumerate(counts)] if logits else []

    def use_all_cores(self, on: bool) -> None:
        self.all_cores = on

    def _use_threads(self, n: int) -> None:
        # Per call, not once: engines sharing a process (the benchmark's side-by-side modes, SD's
        # in-process draft) may each want their own count, and torch's is process-wide. Placed
        # first: threads a forward on every core starts may then run on every core.
        if self.cores is not None:
            place_thread(self.cores[n > self.cfg.threads])
        if self.device.type == "cpu" and n > 0 and torch.get_num_threads() != n:
            torch.set_num_threads(n)

    def _single_slot_view(self, slot: int, start: int, width: int) -> CacheView:
        # The common batch-1 case: plain slices, no gather, no mask for one-token decode.
        end = start + width
        mask = None if width == 1 else self.positions[:end] <= self.positions[start:end, None]
        return CacheView(self._slice_writer(slot, start, end), mask)

    def _span_view(self, first: int, pos: torch.Tensor, end: int) -> CacheView:
        """Slots first, first + 1, ... in order: the cache is read as slices, not gathered. Gathering
        copied every slot's keys and values up to `end` in every layer: at batch 4, 600 positions,
        0.17 ms a tensor, a third of the demo target's forward."""
        n = pos.shape[0]
        kc, vc = self.k_cache[:, first:first + n], self.v_cache[:, first:first + n]
        rows = torch.arange(n, device=self.device)[:, None].expand_as(pos)

        def write(layer, k, v):
            kc[layer][rows, pos], vc[layer][rows, pos] = k, v
            return kc[layer][:, :end], vc[layer][:, :end]

        mask = (self.positions[:end] <= pos[:, :, None]).unsqueeze(1)
        return CacheView(write, mask)

    def _gather_view(self, slots: torch.Tensor, pos: torch.Tensor, end: int) -> CacheView:
        rows = slots[:, None].expand_as(pos)

        def write(layer, k, v):
            self.k_cache[layer][rows, pos], self.v_cache[layer][rows, pos] = k, v
            return self.k_cache[layer][slots, :end], self.v_cache[layer][slots, :end]

        mask = (self.positions[:end] <= pos[:, :, None]).unsqueeze(1)
        return CacheView(write, mask)

    # -- branches (tree attention off a parent's prefix) ---------------------------------------
    @torch.inference_mode()
    def branch_step(self, parents: torch.Tensor, visible: torch.Tensor, tokens: torch.Tensor, depth: int) -> torch.Tensor:
        if depth == 0:
            self.tree = _BranchLayout(parents, visible, self.lengths, self.max_branches, self.cfg.max_draft_len, self.device)
        t = self.tree
        self._use_threads(self.cfg.threads)
        if depth > self.cfg.max_draft_len:
            raise SaguaroError(f"branch depth {depth} exceeds max_draft_len={self.cfg.max_draft_len}")
        pos = t.visible + depth
        end = t.scratch_start + (depth + 1) * t.width
        mask = (t.prefix[..., :end] | (t.own[..., :end] & (t.block[..., :end] <= depth))).unsqueeze(1)
        if t.groups == 1:
            # One parent (batch 1): its branches fill the grid's one row in order and this depth's
            # scratch block is contiguous, so plain slices replace the gathers and scatters below.
            out = self.model(tokens.to(self.device).view(1, -1), self.cos[pos], self.sin[pos],
                             CacheView(self._slice_writer(t.slot, end - t.width, end), mask))
            return out.view(-1, self.vocab_size)
        tok = torch.zeros(t.groups, t.width, dtype=torch.long, device=self.device)
        tok.view(-1)[t.flat] = tokens.to(self.device)
        write_at = t.base[:, None] + depth * t.width + self.positions[: t.width]
        slots = t.slots
        rows = slots[:, None].expand_as(write_at)

        def write(layer, k, v):
            self.k_cache[layer][rows, write_at], self.v_cache[layer][rows, write_at] = k, v
            return self.k_cache[layer][slots, :end], self.v_cache[layer][slots, :end]

        out = self.model(tok, self.cos[pos], self.sin[pos], CacheView(write, mask))
        return out.view(-1, self.vocab_size)[t.flat]

    def _slice_writer(self, slot: int, start: int, end: int):
        """write(layer, k, v) for one slot whose new entries go to positions [start, end)."""
        kc, vc = self.k_cache[:, slot:slot + 1], self.v_cache[:, slot:slot + 1]

        def write(layer, k, v):
            kc[layer, :, start:end], vc[layer, :, start:end] = k, v
            return kc[layer, :, :end], vc[layer, :, :end]
        return write


def _consecutive(slots: list[int]) -> bool:
    return slots[-1] - slots[0] == len(slots) - 1 and all(b == a + 1 for a, b in zip(slots, slots[1:]))


class _BranchLayout:
    """Branches grouped by parent slot into a [groups, width] grid (width = most branches of any
    parent), with each group's scratch starting at its parent's cached length."""

    def __init__(self, parents, visible, lengths, max_branches, max_depth, device):
        parents, visible = parents.tolist(), visible.tolist()
        members: dict[int, list[int]] = {}
        for i, p in enumerate(parents):          # one pass: O(branches)
            members.setdefault(p, []).append(i)
        order = list(members)
        self.groups, self.width = len(order), max(len(m) for m in members.values())
        if self.width > max_branches:
            raise SaguaroError(f"{self.width} branches for one sequence exceed max_branches={max_branches}: lower the fan-out budget")
        flat = [0] * len(parents)
        vis = torch.zeros(self.groups, self.width, dtype=torch.long)
        for g, p in enumerate(order):
            for j, i in enumerate(members[p]):
                flat[i] = g * self.width + j
                vis[g, j] = visible[i]
        self.flat = torch.tensor(flat, device=device)
        self.visible = vis.to(device)
        self.slots = torch.tensor(order, device=device)
        self.slot = order[0]                     # the parent, when there is one (groups == 1)
        self.base = torch.tensor([max(lengths[p], max(visible[i] for i in members[p])) for p in order], device=device)
        # The attention mask of every depth, in pieces cut per step (a step is a few hundred us; its
        # mask, built from scratch, would be a tenth of that): a branch sees its parent's prefix up
        # to its visible length, and its own scratch column in each block up to the current depth.
        self.scratch_start = int(self.base.max())
        cols = torch.arange(self.scratch_start + (max_depth + 1) * self.width, device=device)
        rel = cols - self.base[:, None, None]
        self.prefix = cols < self.visible[:, :, None]
        self.own = (rel >= 0) & (rel % self.width == torch.arange(self.width, device=device)[:, None])
        self.block = rel.div(self.width, rounding_mode="floor")
