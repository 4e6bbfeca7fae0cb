"""The decoding loop: AR, SD and SSD rounds for many sequences at once (DESIGN §1).

One round, for every active sequence together:
  1. the round goes to the drafter (last round's outcomes, joins, leaves). An SSD sequence whose
     outcome was pre-drafted already knows its speculation from the cache keys the drafter sent
     last round; misses and SD wait for the drafter's answer; AR and new sequences have none;
  2. one batched target forward over [pending token, speculation] per sequence, while a drafter
     in another process builds the next round's caches;
  3. the answer (q's for sampled verification) and the next cache keys are read, and verification
     gives (k, bonus) per sequence: k + 1 tokens are emitted.
On a hit nothing waits for the drafter except a build that outlasts the forward. Sequences join
and leave between rounds: a new prompt is prefilled on the target first, then its first round
verifies an empty speculation while the drafter prefills it too. AR is a round with an empty
speculation.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from saguaro.config import MODES, SamplingParams, SpecConfig
from saguaro.draft import CacheKeys, DraftReply, DraftRound, Join, Outcome, PendingRound, Speculation
from saguaro.engines.base import Engine
from saguaro.errors import DraftFailure, SaguaroError
from saguaro.sampling import greedy, probs, verify_greedy, verify_sampled


class DraftClient(Protocol):
    vocab_size: int
    max_draft_len: int
    max_branches: int
    inject_fault: bool               # test switch: the next round fails as a broken drafter would

    def start(self, rnd: DraftRound) -> PendingRound: ...
    def reset(self) -> None: ...
    def close(self) -> None: ...


@dataclass
class SeqStats:
    rounds: int = 0
    drafted: int = 0                 # draft tokens sent to verification
    accepted: int = 0
    cache_hits: int = 0
    cache_misses: int = 0
    degraded: bool = False           # finished on the target alone after a draft failure


@dataclass
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    mode: str
    k: int
    slot: int
    generator: torch.Generator | None
    pending: int                     # last committed token: not yet in the target's KV
    first_round: bool = True         # its prompt is prefilled and an empty speculation verified
    output: list[int] = field(default_factory=list)
    spec: Speculation | None = None
    finish_reason: str | None = None  # length | stop | aborted
    stats: SeqStats = field(default_factory=SeqStats)


@dataclass
class Event:
    """What one round produced for one sequence."""
    seq_id: int
    tokens: list[int]
    finish_reason: str | None
    stats: SeqStats
    source: str                      # what produced the verified speculation: cache | neural | fast | ar
    drafted: int                     # this round's draft tokens
    accepted: int                    # of which the target accepted


@dataclass
class RoundStats:
    batch: int
    tokens: int                      # emitted by all sequences this round
    verify_ms: float                 # target forward + verification
    draft_wait_ms: float             # time the loop waited for the drafter's answer
    draft_ms: float                  # drafter's own time for that answer
    build_ms: float                  # drafter's cache-build time (hidden behind verify under SSD)
    hits: int
    misses: int
    backup: str
    degraded: bool = False
    drafted: int = 0                 # draft tokens verified this round, all sequences
    accepted: int = 0
    emitted: list[int] = field(default_factory=list)   # tokens per sequence (bonus included)
    prefill_ms: float = 0.0          # target prefill of sequences that joined this round
    joined: int = 0                  # sequences in their first round (prefill, first token)
    wall_ms: float = 0.0             # the whole round, prefill included


class Decoder:
    def __init__(self, target: Engine, draft: DraftClient | None, spec: SpecConfig):
        self.target, self.draft, self.spec = target, draft, spec
        self.max_draft_len = min(target.max_draft_len, draft.max_draft_len if draft else target.max_draft_len)
        if draft is not None and draft.vocab_size != target.vocab_size:
            raise SaguaroError(f"draft vocabulary ({draft.vocab_size}) differs from the target's ({target.vocab_size}): "
                               "use a draft trained with the target's tokenizer")
        spec.validate(self.max_draft_len, draft.max_branches if draft else spec.budget)
        self.seqs: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.joins: list[Join] = []
        self.outcomes: list[Outcome] = []
        self.leaves: list[int] = []
        self.last_verify_ms = 0.0
        self.draft_slots = 0             # draft KV slots in use, as of the drafter's last answer
        self.caches: CacheKeys = {}      # the drafter's pre-drafted speculations for the next outcomes
        self.history: list[RoundStats] = []

    # -- requests -------------------------------------------------------------------------------
    def add(self, prompt: list[int], params: SamplingParams = SamplingParams(), mode: str = "ssd",
            k: int | None = None, budget: int | None = None, saguaro_c: float | None = None) -> int:
        params.validate()
        if mode not in MODES:
            raise SaguaroError(f"decoding_mode={mode!r}: use one of {', '.join(MODES)}")
        if mode != "ar" and self.draft is None:
            raise SaguaroError(f"decoding_mode={mode} needs a draft model: configure one or use decoding_mode=ar")
        if not prompt:
            raise SaguaroError("the prompt is empty: send at least one token of text")
        # per-request overrides of the configured K, fan-out budget and Saguaro C
        request_spec = replace(self.spec, k=self.spec.k if k is None else k,
                               budget=self.spec.budget if budget is None else budget,
                               saguaro_c=self.spec.saguaro_c if saguaro_c is None else saguaro_c)
        if mode != "ar":
            request_spec.validate(self.max_draft_len, self.draft.max_branches)
        limit = self.target.max_seq_len
        if len(prompt) + params.max_tokens > limit:
            raise SaguaroError(f"prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                               f"max_seq_len={limit}: shorten the prompt, lower max_tokens or raise max_seq_len")
        seq_id = next(self.ids)
        generator = None
        if not params.greedy:
            generator = torch.Generator()
            generator.manual_seed(params.seed if params.seed is not None else torch.seed())
        slot = self.target.allocate()
        k = 0 if mode == "ar" else request_spec.k
        self.seqs[seq_id] = Sequence(seq_id, list(prompt), params, mode, k, slot, generator, prompt[-1])
        if mode != "ar":
            self.joins.append(Join(seq_id, list(prompt), params, mode, k, request_spec.budget, request_spec.saguaro_c))
        return seq_id

    def abort(self, seq_id: int) -> None:
        """Free what a request holds (cancelled or disconnected); safe between rounds."""
        s = self.seqs.get(seq_id)
        if s is not None:
            s.finish_reason = "aborted"
            self._finish(s)
        self._flush_leaves()

    @property
    def active(self) -> int:
        return len(self.seqs)

    # -- one round ------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        if not self.seqs:
            return []
        t_round = time.perf_counter()
        seqs = list(self.seqs.values())
        joining = [s for s in seqs if s.first_round]
        # New prompts are prefilled before the drafter hears of this round (it is idle between
        # rounds): a prefill may use every core, and a draft step on one of them stalls all of the
        # prefill's threads. A new sequence's first round then verifies an empty speculation, a
        # plain target step, while the drafter prefills its copy and pre-drafts for its outcome.
        self._prefill(joining)
        prefill_ms = (time.perf_counter() - t_round) * 1e3
        pending = self._start_draft_round()
        reply, waited = None, 0.0
        if pending and any(s.mode != "ar" and s.spec is None and not s.first_round for s in seqs):
            reply, waited = self._await(pending.reply)      # misses and SD: drafted for this round
            pending = pending if reply is not None else None
        t0 = time.perf_counter()
        starts = [self.target.length(s.slot) for s in seqs]
        # All greedy: the target sends back argmax ids, not logits (a vocabulary per position).
        ids_only = all(s.params.greedy for s in seqs)
        forward = self.target.forward_greedy if ids_only else self.target.forward
        outputs = forward([s.slot for s in seqs], [[s.pending] + self._spec_tokens(s) for s in seqs])
        verify_ms = (time.perf_counter() - t0) * 1e3
        if pending and reply is None:   # all hits: the answer (q's for sampling) came during the forward
            reply, w = self._await(pending.reply)
            waited += w
        if pending and reply is not None:
            caches, w = self._await(pending.caches)       # built during the forward
            self.caches, waited = caches or {}, waited + w
        t0 = time.perf_counter()
        events = [self._verify(s, out, start, ids_only) for s, out, start in zip(seqs, outputs, starts)]
        self.last_verify_ms = verify_ms + (time.perf_counter() - t0) * 1e3
        hits = sum(reply.hits.values()) if reply else 0
        self.history.append(RoundStats(
            len(seqs), sum(len(e.tokens) for e in events), self.last_verify_ms, waited,
            reply.draft_ms if reply else 0.0, reply.build_ms if reply else 0.0,
            hits, len(reply.hits) - hits if reply else 0, reply.backup if reply else "",
            any(s.stats.degraded for s in seqs), sum(e.drafted for e in events), sum(e.accepted for e in events),
            [len(e.tokens) for e in events], prefill_ms, len(joining)))
        self._flush_leaves()
        self.history[-1].wall_ms = (time.perf_counter() - t_round) * 1e3
        return events

    def _prefill(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if len(s.prompt) > 1:
                self.target.forward([s.slot], [s.prompt[:-1]], logits=False)

    def _spec_tokens(self, s: Sequence) -> list[int]:
        return s.spec.tokens[: s.k] if s.spec is not None and s.k else []

    def _start_draft_round(self) -> PendingRound | None:
        if self.draft is None or not (self.joins or self.outcomes or self.leaves):
            return None
        rnd = DraftRound(self.joins, self.outcomes, self.leaves, self.last_verify_ms)
        self.joins, self.outcomes, self.leaves = [], [], []
        try:
            return self.draft.start(rnd)
        except DraftFailure:
            self._degrade()
            return None

    def _await(self, answer):
        """An answer from the drafter (a reply is applied to the sequences) and the ms spent
        waiting for it; None after a failure."""
        t0 = time.perf_counter()
        try:
            value = answer()
        except DraftFailure:
            self._degrade()
            value = None
        if isinstance(value, DraftReply):
            self._apply(value)
        return value, (time.perf_counter() - t0) * 1e3

    def _apply(self, reply: DraftReply) -> None:
        self.draft_slots = reply.active_slots
        for seq_id, spec in reply.specs.items():
            if seq_id in self.seqs:
                self.seqs[seq_id].spec = spec
        for seq_id, hit in reply.hits.items():
            if seq_id in self.seqs:
                st = self.seqs[seq_id].stats
                st.cache_hits += hit
                st.cache_misses += not hit

    def _degrade(self) -> None:
        """Finish every speculative sequence on the target alone: same distribution, same greedy
        output, only slower. The drafter is reset so its slots are freed."""
        for s in self.seqs.values():
            if s.mode != "ar":
                s.mode, s.k, s.spec, s.stats.degraded = "ar", 0, None, True
        self.joins, self.outcomes, self.leaves = [], [], []
        try:
            self.draft.reset()
        except Exception:   # a drafter that cannot even reset is replaced by its client or stays unused
            pass
        self.draft_slots = 0

    def _verify(self, s: Sequence, out: torch.Tensor, start: int, ids_only: bool) -> Event:
        """out: the target's logits over [pending, speculation], or their argmax ids (ids_only)."""
        draft = self._spec_tokens(s)   # empty if the drafter failed after the forward: an AR step
        if s.params.greedy:
            k, bonus = verify_greedy((out if ids_only else greedy(out)).tolist(), draft)
        else:
            q = s.spec.q[: len(draft)] if draft else None
            k, bonus = verify_sampled(probs(out, s.params), q, draft, s.generator)
        new = draft[:k] + [bonus]
        s.first_round = False
        st = s.stats
        st.rounds, st.drafted, st.accepted = st.rounds + 1, st.drafted + len(draft), st.accepted + k
        new = self._apply_stops(s, new)
        s.output.extend(new)
        self.target.truncate(s.slot, start + 1 + k)       # keep the pending token and the accepted ones
        s.pending = bonus
        event = Event(s.seq_id, new, s.finish_reason, st, s.spec.source if draft else "ar", len(draft), k)
        if s.finish_reason is None and s.mode != "ar":
            self.outcomes.append(Outcome(s.seq_id, k, draft[:k] + [bonus]))
            # SSD: the next speculation, if the drafter pre-drafted this outcome (else it sends one)
            tokens = self.caches.get(s.seq_id, {}).get((k, bonus)) if s.mode == "ssd" else None
            s.spec = Speculation(tokens, None, "cache") if tokens else None
        if s.finish_reason is not None:
            self._finish(s)
        return event

    def _apply_stops(self, s: Sequence, new: list[int]) -> list[int]:
        p = s.params
        for i, tok in enumerate(new):
            done = len(s.output) + i + 1
            if tok == p.end_id or any(_ends_with(s.output + new[: i + 1], stop) for stop in p.stop):
                s.finish_reason = "stop"
                return new[: i + 1]
            if done >= p.max_tokens:
                s.finish_reason = "length"
                return new[: i + 1]
        return new

    def _finish(self, s: Sequence) -> None:
        self.seqs.pop(s.seq_id, None)
        self.target.release(s.slot)
        self.outcomes = [o for o in self.outcomes if o.seq_id != s.seq_id]
        pending_join = [j for j in self.joins if j.seq_id == s.seq_id]
        if pending_join:            # the drafter never saw it
            self.joins.remove(pending_join[0])
        elif s.mode != "ar":
            self.leaves.append(s.seq_id)

    def _flush_leaves(self) -> None:
        # With no round left to carry them, tell the drafter now so its slots are freed.
        if not self.seqs and self.draft is not None and self.leaves:
            pending = self._start_draft_round()
            if pending is not None and self._await(pending.reply)[0] is not None:
                self._await(pending.caches)

    # -- convenience ----------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams = SamplingParams(), mode: str = "ssd",
                 **kw) -> list[list[int]]:
        """Run the prompts to completion together and return the generated tokens of each."""
        ids = [self.add(p, params, mode, **kw) for p in prompts]
        out: dict[int, list[int]] = {i: [] for i in ids}
        while self.seqs:
            for e in self.step():
                out[e.seq_id].extend(e.tokens)
        return [out[i] for i in ids]

    def close(self) -> None:
        for seq_id in list(self.seqs):
            self.abort(seq_id)
        if self.draft is not None:
            self.draft.close()
        self.target.close()


def _ends_with(tokens: list[int], stop: tuple[int, ...]) -> bool:
    return len(stop) > 0 and tuple(tokens[-len(stop):]) == tuple(stop)
