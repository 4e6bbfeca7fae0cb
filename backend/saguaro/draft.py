"""The draft side of speculative decoding: drafting (SD), and for SSD the speculation cache built
while the target verifies, its lookup, and the backups on a miss (docs/design.md, "The round").

The decoder talks to a Drafter through one message per round, `DraftRound`, answered twice:
first a `DraftReply` (this round's speculations: cache hits, backups for misses, SD drafts), then,
once built, the next round's cache keys and the build's time (`NextCaches`, SSD). The decoder looks its next outcome up in
those keys itself, so on a hit it starts verifying without waiting for the first answer at all
(it reads it after the target forward, for the q's that sampled verification needs). The same
Drafter runs in-process (`LocalDraft`), in a worker process (draft_worker.py) or in Triton's
`draft` model: there the cache build runs while the target verifies, which is the point of SSD.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from saguaro.backup import matched_prefix, ngram_proposal
from saguaro.config import SamplingParams, SpecConfig
from saguaro.engines.base import Engine
from saguaro.errors import DraftFailure
from saguaro.fanout import FanoutFit, backup_threshold, expected_tokens
from saguaro.sampling import greedy, one_hot, probs, sample_rows, saguaro


@dataclass
class Speculation:
    tokens: list[int]
    q: torch.Tensor | None          # [K, V] the tokens were drawn from; None under greedy
    source: str                      # cache | neural | fast
    c: float = 1.0                   # Saguaro C its q was reshaped with (1: none, as greedy and fast ones)


@dataclass
class Join:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    mode: str                        # sd | ssd
    k: int
    budget: int
    saguaro_c: float
    vocab: int = 0                   # ids it may propose: the vocabulary verification runs over (0: all)


@dataclass
class Outcome:
    seq_id: int
    accepted: int                    # k: draft tokens the target accepted
    emitted: list[int]               # d_1..d_k followed by the bonus token
    next_k: int | None = None        # the next round's K (0: no speculation); None: the K it joined with
    build: bool | None = None        # pre-draft during the next round; None: as its mode (ssd builds)
    next_budget: int | None = None   # the fan-out budget B of that pre-drafting; None: the one it has
    next_c: float | None = None      # Saguaro C of its next drafting (the policy's); None: the one it has
    # The decoder missed the cache and verifies its own fast backup (the policy chose it): these
    # tokens are the speculation, whatever the drafter would have looked up or guessed
    fast: list[int] | None = None
    # Plain target steps (no speculation verified): a catch-up tells a run of them as one outcome,
    # every emitted token a step's (accepted 0); sampled, the target's probability of each token
    p_plain: list[float] | None = None


@dataclass
class DraftRound:
    joins: list[Join] = field(default_factory=list)
    outcomes: list[Outcome] = field(default_factory=list)
    leaves: list[int] = field(default_factory=list)
    verify_ms: float = 0.0           # the target's last round, for the backup rule
    backup: str = ""                 # what misses get this round (neural | fast); "": the backup rule
    inject_fault: bool = False       # test switch: the drafter raises instead of answering


@dataclass
class DraftReply:
    specs: dict[int, Speculation]
    hits: dict[int, bool]            # SSD sequences with an outcome: was it in the cache?
    backup: str                      # the backup used for misses this round (neural | fast)
    draft_ms: float                  # time spent producing the answer (lookups, backups, SD drafting)
    build_ms: float                  # time the previous round's cache build took (0: none ran)
    active_slots: int                # draft KV slots in use (0 once every request has left)
    # per sequence caught up after plain steps: (Σ acceptance the draft would have had, tokens
    # scored) -- the acceptance the policy measures without speculating (Drafter._ingest)
    shadow: dict[int, tuple[float, int]] = field(default_factory=dict)
    catch_up_ms: float = 0.0         # of draft_ms: bringing sequences up to their committed tokens (after plain steps)


# Per sequence: outcome (accepted k, bonus token) -> the K speculation tokens pre-drafted for it.
CacheKeys = dict[int, dict[tuple[int, int], list[int]]]


@dataclass
class NextCaches:
    """The drafter's second answer to a round: per sequence, outcome (accepted, bonus) -> tokens."""
    keys: CacheKeys
    build_ms: float = 0.0            # the build that made them (0: nothing was built)
    # the draft's top-1 next token after each token the build saw (Drafter.top_next, these entries
    # changed): the decoder's copy continues its own fast backup as the drafter's would
    top_next: dict[int, int] = field(default_factory=dict)


class PendingRound:
    """A draft round in flight: its reply, then the next round's cache keys, read when needed.
    ready(): whether the reply has arrived, where the drafter's channel can tell without waiting."""

    def __init__(self, answers: Iterator, ready: Callable[[], bool] | None = None):
        self._answers, self._reply, self._ready = answers, None, ready

    def arrived(self) -> bool | None:
        """Whether the reply is in (None: this channel cannot tell)."""
        return True if self._reply is not None else self._ready() if self._ready is not None else None

    def reply(self) -> DraftReply:
        if self._reply is None:
            try:
                self._reply = next(self._answers)
            except StopIteration:
                raise DraftFailure("the drafter closed the round without answering") from None
        return self._reply

    def caches(self) -> NextCaches:
        self.reply()
        return next(self._answers, NextCaches(keys={}))


@dataclass
class _Seq:
    slot: int
    history: list[int]               # committed tokens; the last is not yet in the draft's KV
    params: SamplingParams
    mode: str
    k: int
    budget: int
    c: float
    generator: torch.Generator
    vocab: int                       # proposals and q's cover ids [0, vocab): the shared vocabulary
    end: int                         # the longest its history may grow: prompt + max_tokens, or the draft engine's max_seq_len
    builds: bool = False             # pre-drafts while this round is verified
    spec: Speculation | None = None  # being verified now
    cache: dict[tuple[int, int], Speculation] = field(default_factory=dict)
    fanout: list[int] = field(default_factory=list)
    fast_guess: list[int] = field(default_factory=list)
    plain: dict[int, float | None] = field(default_factory=dict)   # history index of a plain step's token -> its p (Outcome.p_plain)

    @property
    def room(self) -> int:
        """Tokens it may still emit: what any speculation of it is cut to. Drafting more would only
        be cut by the decoder, and would write past the positions the draft engine holds (TensorRT-LLM's
        KV holds max_seq_len, docs/design.md, "Limits on input")."""
        return self.end - len(self.history)

    @property
    def drawn_c(self) -> float:
        """The C its drafting reshapes q with (_choose): its own under sampling in ssd mode, else none."""
        return self.c if self.mode == "ssd" and not self.params.greedy else 1.0


SHADOW_ROWS = 16            # a catch-up's tokens scored per sequence (shadow acceptance), the latest
CATCH_UP_LAG = 8            # committed tokens a drafting sequence lags by at least to be caught up apart first (below,
                            # its first drafting forward takes them: a forward call costs more than a few LM-head rows)


class Drafter:
    def __init__(self, engine: Engine, spec: SpecConfig):
        self.engine, self.spec = engine, spec
        self.seqs: dict[int, _Seq] = {}
        self.fit = FanoutFit(spec.accept_rate, spec.power)
        self.top_next: dict[int, int] = {}          # draft's top-1 after a token (fast backup)
        self.top_next_changed: dict[int, int] = {}  # ... its entries the last build set (NextCaches)
        self.to_build: list[int] = []
        self.build_ms = self.jit_ms = 0.0           # decaying averages, for the backup rule
        self.last_build_ms = 0.0                    # the last build: sent with its keys and again with the next reply (stats)
        self.hit_rate = 0.5

    # -- one round ------------------------------------------------------------------------------
    def step(self, rnd: DraftRound) -> DraftReply:
        t0 = time.perf_counter()
        for seq_id in rnd.leaves:
            self._leave(seq_id)
        for j in rnd.joins:
            self._join(j)
        # A new sequence's first round verifies no speculation: its drafting starts from the outcome.
        specs, hits, jit = {}, {}, []
        backup = rnd.backup or self._backup_choice(len(rnd.outcomes), rnd.verify_ms)
        for o in rnd.outcomes:
            s = self.seqs[o.seq_id]
            built = bool(s.cache)          # no cache precedes a first speculation, or follows a round without a build
            s.k = s.k if o.next_k is None else o.next_k
            s.builds = s.mode == "ssd" if o.build is None else o.build
            if o.next_budget is not None:
                s.budget = self._budget(o)
            if o.next_c is not None:
                s.c = self._c(o)
            spec = self._commit(s, o)
            if s.k == 0:                   # a plain target step: nothing to draft
                continue
            if o.fast is not None:         # the decoder missed and verifies its own fast backup
                hits[o.seq_id] = False
                spec = self._fast(s, o.fast)
            elif built:
                hits[o.seq_id] = spec is not None
                if spec is None and backup == "fast":
                    spec = self._fast(s)
            if spec is None:
                jit.append(o.seq_id)
            else:
                specs[o.seq_id] = spec
        # Catch up first: sequences whose next round is a plain target step, and those drafting after
        # plain steps the drafter was not told (a switch back to speculating), which would otherwise
        # prefill those steps in their first drafting forward. Timed apart (catch_up_ms): a switch's
        # cost, not drafting's, which the policy prices per K
        t, drafting = time.perf_counter(), set(jit)
        shadow = self._ingest({o.seq_id: self.seqs[o.seq_id] for o in rnd.outcomes if self.seqs[o.seq_id].k == 0
                               or (o.seq_id in drafting and self._lag(self.seqs[o.seq_id]) >= CATCH_UP_LAG)})
        catch_up_ms = (time.perf_counter() - t) * 1e3
        if jit:
            t = time.perf_counter()
            specs.update(self._draft(jit))
            self.jit_ms = _ema(self.jit_ms, (time.perf_counter() - t) * 1e3)
        for seq_id, spec in specs.items():
            s = self.seqs[seq_id]
            s.spec = specs[seq_id] = _cut(spec, s.room)
        self.to_build = [i for i in specs if self.seqs[i].builds]
        if hits:
            self.hit_rate = _ema(self.hit_rate, sum(hits.values()) / len(hits), 0.05)
        build_ms, self.last_build_ms = self.last_build_ms, 0.0
        return DraftReply(specs=specs, hits=hits, backup=backup, draft_ms=(time.perf_counter() - t0) * 1e3,
                          build_ms=build_ms, active_slots=self.engine.active_slots, shadow=shadow,
                          catch_up_ms=catch_up_ms)

    def build(self) -> CacheKeys:
        """Pre-draft the likely next speculations for every SSD sequence answered last step."""
        if not self.to_build:
            return {}
        t = time.perf_counter()
        seqs = {i: self.seqs[i] for i in self.to_build}
        # Every branch of a build is drafted as deep as its deepest K. A sequence whose branches would
        # pass the positions the draft engine holds there builds apart, as deep as they allow (or not
        # at all): near the end of a request as long as max_seq_len
        deepest = max(s.k for s in seqs.values())
        groups: dict[int, list[_Seq]] = {}
        for s in seqs.values():
            allowed = self.engine.max_seq_len - len(s.history) - len(s.spec.tokens)
            groups.setdefault(min(deepest, allowed), []).append(s)
        for depth, group in groups.items():
            if depth > 0:
                self._build_caches(group, depth)
        self.to_build = []
        self.last_build_ms = (time.perf_counter() - t) * 1e3
        self.build_ms = _ema(self.build_ms, self.last_build_ms)
        return {i: {key: spec.tokens for key, spec in s.cache.items()} for i, s in seqs.items()}

    def answer(self, rnd: DraftRound) -> Iterator:
        """The two answers to a round: the reply, then (after building) the next cache keys."""
        yield self.step(rnd)
        keys = self.build()
        changed, self.top_next_changed = self.top_next_changed, {}
        yield NextCaches(keys=keys, build_ms=self.last_build_ms if keys else 0.0, top_next=changed)

    # -- sequences ------------------------------------------------------------------------------
    def _budget(self, o: Outcome) -> int:
        if not 1 <= o.next_budget <= self.engine.max_branches:
            raise DraftFailure(f"sequence {o.seq_id}: fan-out budget {o.next_budget} is outside [1, "
                               f"{self.engine.max_branches}] (the draft engine's max_branches)")
        return o.next_budget

    @staticmethod
    def _c(o: Outcome) -> float:
        if not 0.0 <= o.next_c <= 1.0:
            raise DraftFailure(f"sequence {o.seq_id}: Saguaro C {o.next_c} is outside [0, 1]")
        return o.next_c

    def _join(self, j: Join) -> None:
        g = torch.Generator()
        # the draft's randomness is independent of the target's; a seed makes both reproducible
        g.manual_seed((j.params.seed * 1_000_003 + 17) % 2**63 if j.params.seed is not None else torch.seed())
        vocab = min(j.vocab, self.engine.vocab_size) if j.vocab > 0 else self.engine.vocab_size
        end = min(len(j.prompt) + j.params.max_tokens, self.engine.max_seq_len)
        s = _Seq(self.engine.allocate(), list(j.prompt), j.params, j.mode, j.k, j.budget, j.saguaro_c, g, vocab, end)
        self.seqs[j.seq_id] = s
        if len(j.prompt) > 1:
            self.engine.forward([s.slot], [j.prompt[:-1]], logits=False)

    def _ingest(self, told: dict[int, _Seq]) -> dict[int, tuple[float, int]]:
        """Bring the draft's KV up to the committed tokens of sequences in plain target steps (a
        catch-up the decoder sends while the target verifies), so the round that speculates again
        drafts at once instead of prefilling every token since it last drafted. The same forward
        scores the draft on those steps' tokens: per sequence (Σ acceptance, tokens scored), the
        acceptance a speculation would have had, measured without speculating (docs/design.md,
        "Shadow acceptance")."""
        eng = self.engine
        behind = {i: s for i, s in told.items() if self._lag(s) > 1}
        if not behind:
            return {}
        slots = [s.slot for s in behind.values()]
        scoring = any(s.plain for s in behind.values())   # else a prefill: no LM head to run
        # A long catch-up scores only its last SHADOW_ROWS tokens per sequence: the LM head is most
        # of the draft's work per token (a vocabulary-wide row against a 1-layer model here)
        # (split off only where that saves more than the extra forward costs)
        unscored = {s.slot: s.history[eng.length(s.slot): len(s.history) - 1 - SHADOW_ROWS] for s in behind.values()}
        if scoring and sum(map(len, unscored.values())) >= 2 * SHADOW_ROWS:
            eng.forward([slot for slot, t in unscored.items() if t], [t for t in unscored.values() if t], logits=False)
        starts = [eng.length(s.slot) for s in behind.values()]
        rows = eng.forward(slots, [s.history[n:-1] for s, n in zip(behind.values(), starts)], logits=scoring)
        if not scoring:
            return {}
        shadow = {}
        for (seq_id, s), x, n in zip(behind.items(), rows, starts):
            scored = [(i, p) for i, p in s.plain.items() if i > n]   # row i - n - 1 predicted token i
            if scored:
                shadow[seq_id] = (shadow_acceptance(x, s, n, scored), len(scored))
            s.plain.clear()
        return shadow

    def _lag(self, s: _Seq) -> int:
        """Committed tokens of a sequence not yet in the draft's KV (its last is always one)."""
        return len(s.history) - self.engine.length(s.slot)

    def _leave(self, seq_id: int) -> None:
        s = self.seqs.pop(seq_id, None)
        if s is not None:
            self.engine.release(s.slot)

    def release_all(self) -> None:
        for seq_id in list(self.seqs):
            self._leave(seq_id)

    def _commit(self, s: _Seq, o: Outcome) -> Speculation | None:
        """Record the verified tokens, roll the draft KV back to them, update the fits, and
        return the cached speculation for this outcome if there is one (its first s.k tokens)."""
        bonus = o.emitted[-1]
        if s.spec is not None and s.spec.source != "fast":    # n-gram rounds say nothing about a
            self.fit.observe_accept(o.accepted, len(s.spec.tokens))
        if s.cache:
            self.fit.observe_cache(s.fanout[o.accepted], (o.accepted, bonus) in s.cache)
        if s.fast_guess:
            self.fit.observe_fast(matched_prefix(s.fast_guess, o.emitted), len(s.fast_guess))
        if s.spec is None and (s.params.greedy or o.p_plain is not None):   # plain steps' tokens:
            for i, p in enumerate(o.p_plain or [None] * len(o.emitted)):      # scored at the catch-up
                s.plain[len(s.history) + i] = p
        elif s.spec is not None:
            s.plain.clear()
        s.history.extend(o.emitted)
        self.engine.truncate(s.slot, len(s.history) - 1)
        # (a plain target step proposes nothing: no guess to score against the next outcome)
        s.fast_guess = ngram_proposal(s.history, s.k, self.top_next) if s.k else []
        hit = s.cache.get((o.accepted, bonus))
        s.cache, s.spec = {}, None
        return Speculation(hit.tokens[: s.k], None if hit.q is None else hit.q[: s.k], "cache", hit.c) if hit else None

    def _fast(self, s: _Seq, tokens: list[int] | None = None) -> Speculation:
        return fast_speculation(s.fast_guess if tokens is None else tokens, s.vocab, s.params.greedy)

    def _backup_choice(self, batch: int, verify_ms: float) -> str:
        if self.spec.backup != "auto":
            return self.spec.backup
        if verify_ms <= 0 or batch == 0:
            return "neural"
        k = max((s.k for s in self.seqs.values()), default=self.spec.k)
        e_hit = expected_tokens(self.fit.a, k)
        e_fast = expected_tokens(self.fit.a_fast, k)
        a_neural = e_hit
        a_fast = self.hit_rate * e_hit + (1 - self.hit_rate) * e_fast
        b_star = backup_threshold(self.hit_rate, a_neural, a_fast, self.build_ms / verify_ms, self.jit_ms / verify_ms, 0.0)
        return "neural" if batch <= b_star else "fast"

    # -- drafting -------------------------------------------------------------------------------
    def _choose(self, seqs: list[_Seq], counts: list[int], logits: torch.Tensor,
                fanout: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next tokens for logits rows of sequences that draw alike (`_draw`: counts[i] rows of
        seqs[i], in order), and the q they were drawn from; each sequence draws with its own
        generator."""
        s = seqs[0]
        logits = logits[..., : s.vocab]
        if s.params.greedy:
            return greedy(logits), None
        q = saguaro(probs(logits, s.params), fanout, s.drawn_c)
        return sample_rows(q, [(x.generator, n) for x, n in zip(seqs, counts)]), q

    def _draw(self, items: list[tuple[_Seq, torch.Tensor]], depth: int) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """Tokens and q for each (sequence, its logits rows) at a drafting depth. Sequences that
        draw alike (greedy, or the same temperature, top-k, top-p, mode, C and fan-out at this
        depth) share one `_choose`: per-sequence tensor work at batch 250 cost more than the
        forwards did."""
        groups: dict[tuple, list[int]] = {}
        for i, (s, _) in enumerate(items):
            p, fanout = s.params, _at(s.fanout, depth)
            key = (0, "greedy") if p.greedy else (fanout, p.temperature, p.top_k, p.top_p, s.mode, s.c)
            groups.setdefault(key + (s.vocab,), []).append(i)
        out: list = [None] * len(items)
        for (fanout, *_), members in groups.items():
            seqs, rows = [items[i][0] for i in members], [items[i][1] for i in members]
            counts = [len(r) for r in rows]
            tokens, q = self._choose(seqs, counts, torch.cat(rows), fanout)
            qs = q.split(counts) if q is not None else [None] * len(members)
            for i, t, qq in zip(members, tokens.split(counts), qs):
                out[i] = (t, qq)
        return out

    def _draft(self, seq_ids: list[int]) -> dict[int, Speculation]:
        """Neural drafting, K steps, all sequences batched: SD's drafter, SSD's first speculation
        (after a new sequence's first round) and its JIT backup."""
        seqs = [self.seqs[i] for i in seq_ids]
        feed = [s.history[self.engine.length(s.slot):] for s in seqs]
        tokens: list[list[int]] = [[] for _ in seqs]
        qs: list[list[torch.Tensor]] = [[] for _ in seqs]
        ks = [min(s.k, s.room) for s in seqs]
        for depth in range(max(ks)):
            live = [i for i, k in enumerate(ks) if depth < k]
            logits = self.engine.forward([seqs[i].slot for i in live], [feed[i] for i in live])
            for i, (tok, q) in zip(live, self._draw([(seqs[i], lg[-1:]) for i, lg in zip(live, logits)], depth)):
                tokens[i].append(int(tok[0]))
                if q is not None:
                    qs[i].append(q[0])
                feed[i] = [tokens[i][-1]]
        return {i: Speculation(t, torch.stack(q) if q else None, "neural", s.drawn_c)
                for i, s, t, q in zip(seq_ids, seqs, tokens, qs)}

    def _build_caches(self, seqs: list[_Seq], max_depth: int) -> None:
        """Glue forward over [t*, s_1..s_n] (s: the speculation being verified, n <= K tokens), then K
        batched tree-attention steps over every branch (j, c): c a likely bonus token after j
        accepted draft tokens (docs/design.md, "The round"); at most `max_depth` steps."""
        eng = self.engine
        for s in seqs:   # drop what JIT drafting left past the committed tokens: the glue redoes it
            eng.truncate(s.slot, len(s.history) - 1)
        glue = eng.forward([s.slot for s in seqs], [s.history[eng.length(s.slot):] + s.spec.tokens for s in seqs])
        parents, visible, first, owners = [], [], [], []
        fanouts = {}   # one fit per build, shared by sequences with the same (budget, K)
        for s, lg in zip(seqs, glue):
            n = len(s.spec.tokens)
            dist = lg[-(n + 1):, : s.vocab]             # L_0..L_n
            top1 = greedy(dist).tolist()
            for tok, nxt in zip([s.history[-1]] + s.spec.tokens, top1):
                self.top_next[tok] = self.top_next_changed[tok] = nxt
            key = (s.budget, n)
            if key not in fanouts:
                fanouts[key] = self.fit.fanout(s.budget, n, self.spec.fanout)
            s.fanout = fanouts[key]
            for j, f in enumerate(s.fanout):
                if f == 0:
                    continue
                banned = s.spec.tokens[j] if j < n else -1     # a rejected token is never the bonus
                cands = [c for c in dist[j].topk(min(f + 1, dist.shape[-1])).indices.tolist() if c != banned][:f]
                for c in cands:
                    parents.append(s.slot)
                    visible.append(len(s.history) + j)
                    first.append(c)
                    owners.append((s, j, c))
        if not parents:
            return
        parents_t, visible_t = torch.tensor(parents), torch.tensor(visible)
        feed = torch.tensor(first)
        rows_of: dict[int, list[int]] = {}
        for n, (s, _, _) in enumerate(owners):
            rows_of.setdefault(id(s), []).append(n)
        k_max = min(max_depth, max(s.k for s in seqs))
        drafted = torch.zeros(len(parents), k_max, dtype=torch.long)
        sampled = any(not s.params.greedy for s in seqs)
        vocab = max(s.vocab for s in seqs)
        qs = torch.empty(len(parents), k_max, vocab) if sampled else None   # q rows, per branch and depth
        for depth in range(k_max):
            logits = eng.branch_step(parents_t, visible_t, feed, depth)
            live = [s for s in seqs if rows_of.get(id(s)) and depth < s.k]
            for s, (tok, q) in zip(live, self._draw([(s, logits[rows_of[id(s)]]) for s in live], depth)):
                rows = rows_of[id(s)]
                drafted[rows, depth] = tok
                if q is not None:
                    qs[rows, depth, : s.vocab] = q
            feed = drafted[:, depth]
        drafted_l = drafted.tolist()
        for n, (s, j, c) in enumerate(owners):
            q = None if s.params.greedy else qs[n, : s.k, : s.vocab]
            s.cache[(j, c)] = Speculation(drafted_l[n][: s.k], q, "cache", s.drawn_c)


def _cut(spec: Speculation, room: int) -> Speculation:
    """A speculation no longer than a sequence's room (_Seq.room)."""
    if len(spec.tokens) <= room:
        return spec
    return Speculation(spec.tokens[:room], None if spec.q is None else spec.q[:room], spec.source, spec.c)


def fast_speculation(tokens: list[int], vocab: int, greedy: bool) -> Speculation:
    """The n-gram guess as a speculation (the drafter's fast backup, or the decoder's own guess):
    cut before an id verification does not cover (a prompt's, where the target's vocabulary is the
    larger), its q one-hot under sampling."""
    cut = next((i for i, t in enumerate(tokens) if t >= vocab), len(tokens))
    tokens = tokens[:cut]
    return Speculation(tokens, None if greedy else one_hot(tokens, vocab), "fast")


def _at(fanout: list[int], depth: int) -> int:
    """F for Saguaro sampling at a depth: the fan-out the next build will give that accepted length."""
    return fanout[depth] if depth < len(fanout) else 0


def _ema(old: float, new: float, w: float = 0.1) -> float:
    return new if old == 0.0 else (1 - w) * old + w * new


class LocalDraft:
    """The Drafter in this process: builds when the caches are asked for, so nothing overlaps
    (SD, tests, the statistical exactness check)."""

    def __init__(self, drafter: Drafter):
        self.drafter, self.inject_fault = drafter, False
        e = drafter.engine
        self.vocab_size, self.max_draft_len, self.max_branches = e.vocab_size, e.max_draft_len, e.max_branches

    def start(self, rnd: DraftRound) -> PendingRound:
        if self.inject_fault:
            self.inject_fault = False
            raise DraftFailure("injected draft fault (test switch)")
        return PendingRound(self.drafter.answer(rnd))

    def reset(self) -> None:
        self.drafter.release_all()

    def close(self) -> None:
        self.drafter.release_all()


def shadow_acceptance(rows: torch.Tensor, s: _Seq, start: int, scored: list[tuple[int, float | None]]) -> float:
    """Σ over plain steps' tokens of the probability the draft's proposal for that position would
    have been accepted: greedy, whether its argmax is the token; sampled (token x drawn from the
    target's p), min(1, q(x) / p(x)), whose mean over x ~ p is Σ min(p, q), the acceptance rate of
    a token drafted from q. rows[j] is the draft's logits after history[start + j]."""
    device = rows.device
    at = torch.tensor([i - start - 1 for i, _ in scored], device=device)
    tokens = torch.tensor([s.history[i] for i, _ in scored], device=device)
    x = rows[at, : s.vocab]
    if s.params.greedy:
        return float((greedy(x) == tokens).sum())
    q = probs(x, s.params)[torch.arange(len(scored), device=device), tokens]
    p = torch.tensor([p for _, p in scored], device=device)
    return float(torch.clamp(q / p, max=1.0).sum())
