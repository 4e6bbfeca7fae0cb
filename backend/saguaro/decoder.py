"""The decoding loop: AR, SD and SSD rounds for many sequences at once (docs/design.md, "The round").

One round, for every active sequence together:
  0. each sequence's K for this round and whether the drafter pre-drafts during it: `sd` and `ar`
     requests and requests that pinned K by their mode, the other `ssd` requests by the round
     policy (policy.py), which picks the fastest of AR, SD with K (drafted by the drafter, or by
     the decoder's own n-gram guess: the drafter takes no part) and SSD with K and B;
  1. the round goes to the drafter (last round's outcomes with those choices, joins, leaves). A
     sequence whose outcome was pre-drafted already knows its speculation from the cache keys the
     drafter sent last round; misses and SD wait for the drafter's answer; AR and new sequences
     have none;
  2. one batched target forward over [pending token, speculation] per sequence, while a drafter
     in another process builds the next round's caches (SSD); when nothing is pre-drafted the
     target may take every core;
  3. the answer (q's for sampled verification) and the next cache keys are read, and verification
     gives (k, bonus) per sequence: k + 1 tokens are emitted. The target's rows are first processed
     as the request asks (penalties, min_tokens, bad words: logits.py), each row with its own context.
On a hit nothing waits for the drafter except a build that outlasts the forward. Sequences join
and leave between rounds: a new prompt is prefilled on the target first, then its first round
verifies an empty speculation while the drafter prefills it too (while the drafter's speculation
does not pay, later or never: it follows one sequence, _defer_joins). AR is a round with an empty
speculation. A cache miss under the fast backup is guessed here too (_fast), so it waits for no
drafter answer. Which round type runs never changes the output: each verifies what it speculated.
"""
from __future__ import annotations

import itertools
import time
from array import array
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch

from saguaro.config import MODES, SamplingParams, SpecConfig
from saguaro.backup import ngram_proposal
from saguaro.draft import (CacheKeys, DraftReply, DraftRound, Join, NextCaches, Outcome, PendingRound, Speculation,
                           fast_speculation)
from saguaro.engines.base import Engine
from saguaro.errors import DraftFailure, SaguaroError
from saguaro.logits import active as processes_logits, process
from saguaro.policy import LOWER_C, Option, Prediction, RoundCosts, RoundPolicy
from saguaro.sampling import (distribution, greedy, probability, probs, sample_rows, token_log_probs, verify_greedy,
                              verify_sampled)

MAX_GAP_MS = 50.0                    # a longer pause between rounds is idleness, not per-round work
JOIN_READ = 2                        # rounds an answer left unread waits at least before it is read, until reads are timed
GUESS_EVERY = 3                      # a plain step scores the n-gram guess once in this many tokens (~5 us a guess)
GUESS_SCORES = 4                     # ... and the policy is told after this many
GUESS_FAR = 4                        # one in GUESS_FAR times as many while the guess is far from paying (policy.guess_far)


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
    ar_rounds: int = 0               # rounds by type: no speculation,
    sd_rounds: int = 0               # a speculation with nothing pre-drafted during its verify,
    ssd_rounds: int = 0              # a speculation verified while the next one is pre-drafted


@dataclass(eq=False)      # one sequence is itself only: `s in chosen` compared every field of the others
class Sequence:
    seq_id: int
    prompt: list[int]
    params: SamplingParams
    mode: str
    request_k: int                   # K of its mode (the request's num_draft_tokens or the configured K)
    pinned: bool                     # the request set K: it gets exactly that, every round
    budget: int                      # fan-out budget of its mode (the request's or the configured B): at most this
    c: float | None                  # Saguaro C the request set (it gets exactly that); None: the policy's
    slot: int
    generator: torch.Generator | None
    pending: int                     # last committed token: not yet in the target's KV
    processed: bool = False          # penalties, min_tokens or bad words change the target's logits
    k: int = 0                       # this round's K (0: a plain target step)
    build: bool = False              # the drafter pre-drafts the next speculation during this round
    round_budget: int = 0            # ... with this fan-out budget (0: its own, `budget`)
    lookup: bool = False             # this round's speculation is the decoder's n-gram guess: the drafter takes no part
    first_round: bool = True         # its prompt is prefilled and an empty speculation verified
    output: list[int] = field(default_factory=list)
    tokens: array = field(default_factory=lambda: array("I"))   # prompt + output, for the n-gram guess
    guessed: list[int] = field(default_factory=lambda: [0, 0])  # plain steps' tokens the guess got right, scored
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
    kind: str                        # round type: ar | sd | ssd (SeqStats)
    log_probs: list[float] | None = None  # per token, when the request asked (return_log_probs)


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
    one_core: bool = False           # the target's forward left the drafter's cores to it (under way
                                     # beside it: pre-drafting, a prompt or catch-up; or the policy's choice)
    wall_ms: float = 0.0             # the whole round, prefill included
    gap_ms: float = 0.0              # since the previous round ended: the caller's own work per round
                                     # (streaming, admission), at most MAX_GAP_MS (longer: the loop was idle)
    spec_wait_ms: float = 0.0        # of draft_wait_ms: before the forward (SD drafting, backups)
    ar: int = 0                      # sequences by round type (SeqStats)
    sd: int = 0
    ssd: int = 0
    ks: list[int] = field(default_factory=list)        # K verified per sequence
    option: str = ""                 # the policy's choice ("" when no sequence was the policy's)
    budget: int = 0                  # its fan-out budget B (0: not pre-drafting, or not the policy's)
    saguaro_c: float | None = None   # ... and its Saguaro C (None: likewise)
    predicted_ms: float | None = None      # the policy's prediction of this round (None: exploring)
    predicted_tokens: float | None = None  # ... and of its policy sequences' tokens


class Decoder:
    def __init__(self, target: Engine, draft: DraftClient | None, spec: SpecConfig):
        self.target, self.draft, self.spec = target, draft, spec
        self.max_draft_len = min(target.max_draft_len, draft.max_draft_len if draft else target.max_draft_len)
        # Verification (and AR alike, so greedy stays identical) runs over the ids both models have:
        # a pair that shares a tokenizer may pad its embeddings differently (docs/design.md,
        # "Penalties, bad words and log-probabilities"; saguaro.pair checks the tokenizers).
        self.vocab = min(target.vocab_size, draft.vocab_size) if draft is not None else target.vocab_size
        spec.validate(self.max_draft_len, draft.max_branches if draft else spec.budget)
        self.seqs: dict[int, Sequence] = {}
        self.ids = itertools.count()
        self.joins: list[Join] = []
        self.outcomes: list[Outcome] = []
        self.held: dict[int, list[Outcome]] = {}   # outcomes not yet told: rounds since with nothing to draft
        self.deferred: dict[int, Join] = {}  # joins not yet told: speculation not paying, all but one sequence (_defer_joins)
        self.leaves: list[int] = []
        self.last_verify_ms = 0.0
        self.last_round_end = 0.0        # perf_counter() when the last round ended
        self.draft_slots = 0             # draft KV slots in use, as of the drafter's last answer
        self.caches: CacheKeys = {}      # the drafter's pre-drafted speculations for the next outcomes
        self.top_next: dict[int, int] = {}   # the draft's top-1 next tokens, as its builds report them (_fast)
        # A round whose answer nothing needed (joins' prompts, a catch-up): read once it should be done
        self.unread: PendingRound | None = None
        self.unread_since, self.unread_tokens, self.unread_rounds = 0.0, 0, 0   # sent when, tokens told, rounds since
        self.unread_joins = False        # it prefills new prompts (else it catches up)
        self.read_ms_per_token = {True: 0.0, False: 0.0}   # the drafter's time per token told, as last read, by joins
        self.history: list[RoundStats] = []
        # rounds that repeat the last one's plan without planning (_steady_rounds), and that plan
        self.steady, self.steady_plan = 0, (None, None, set())
        backups = ("neural", "fast") if spec.backup == "auto" else (spec.backup,)
        # fan-out budgets the policy chooses from: the configured B, and half of it (a build of fewer
        # branches that a one-core verify hides, for fewer hits)
        budgets = (spec.budget, max(1, spec.budget // 2))
        # ... and the Saguaro C's: the configured one, and LOWER_C below it (hits for acceptance, sampled)
        cs = (spec.saguaro_c, min(spec.saguaro_c, LOWER_C))
        self.policy = (RoundPolicy(max_k=min(self.max_draft_len, spec.policy_max_k), default_k=spec.k, backups=backups,
                                   budgets=budgets, cs=cs) if draft is not None and spec.policy else None)

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
        self.steady = 0
        self.seqs[seq_id] = Sequence(seq_id=seq_id, prompt=list(prompt), tokens=array("I", prompt), params=params, mode=mode,
                                     request_k=request_spec.k, pinned=k is not None, budget=request_spec.budget, c=saguaro_c,
                                     slot=slot, generator=generator,
                                     pending=prompt[-1], processed=processes_logits(params))
        if self.policy is not None:
            self.policy.track(seq_id, params.greedy)
        if mode != "ar":
            self.joins.append(Join(seq_id, list(prompt), params, mode, request_spec.k, request_spec.budget,
                                   request_spec.saguaro_c, self.vocab))
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

    @property
    def drafter_idle(self) -> bool:
        """No round's answer is left unread: the drafter is not working on its own (a catch-up, new
        prompts) while the caller does something else."""
        return self.unread is None

    def pause(self) -> None:
        """The time until the next round is not this decoder's (another one's turn on the machine):
        it is not counted as per-round work, and the next round is not measured."""
        self.last_round_end = 0.0

    @property
    def free_slots(self) -> int:
        """Sequences that may still join (target KV slots not in use)."""
        return self.target.max_slots - self.target.active_slots

    # -- one round ------------------------------------------------------------------------------
    def step(self) -> list[Event]:
        if not self.seqs:
            return []
        t_round = time.perf_counter()
        gap_ms = (t_round - self.last_round_end) * 1e3
        # After a pause (an idle loop, another decoder's turn) the round runs on caches others
        # used: not measured for the policy (3.3 and 2.9 ms where warm plain steps on every core
        # took 1.7 at batch 1, and kept the target on one core for 33 rounds)
        resumed = gap_ms > MAX_GAP_MS
        gap_ms = 0.0 if resumed else gap_ms
        seqs = list(self.seqs.values())
        joining = [s for s in seqs if s.first_round]
        # New prompts are prefilled before the drafter hears of this round (it is idle between
        # rounds): a prefill may use every core, and a draft step on one of them stalls all of the
        # prefill's threads. A new sequence's first round then verifies an empty speculation, a
        # plain target step, while the drafter prefills its copy and pre-drafts for its outcome.
        self._prefill(joining)
        prefill_ms = (time.perf_counter() - t_round) * 1e3
        # 0. each sequence's K and pre-drafting (the policy's choice, or the request's mode)
        t0 = time.perf_counter()
        drained = self.unread is not None and self._unread_done()
        if drained:                     # the drafter is idle again: this round may use every core
            self._drain()
        option, predicted, chosen = self._plan(seqs, resumed)
        self.caches = {}                # looked up (_plan); only a build during this round makes new ones
        # nothing in this round needs the drafter's answer: it is left unread (prompts to prefill, plain
        # steps to catch up on) and the drafter works on through the rounds after, on its own core;
        # read now before the policy explores the drafter's options (its round must find the drafter
        # idle and up to date)
        unanswered = (not any((s.k and not s.lookup) or s.build for s in seqs)
                      and not (self.policy is not None and self.policy.explore_next and self.policy.explores_drafter))
        # 1. the round to the drafter; misses and SD wait for its speculation
        told_joins = bool(self.joins)
        told_tokens = sum(len(j.prompt) for j in self.joins) + sum(len(o.emitted) for o in self.outcomes)
        drained = drained or (self.unread is not None and self._has_news(urgent=True))
        t_send = time.perf_counter()
        pending = self._start_draft_round(option.backup if option is not None and option.kind == "ssd" else "")
        reply, spec_wait = None, (time.perf_counter() - t0) * 1e3 if drained else 0.0
        if pending and any(s.k and s.spec is None for s in seqs):
            reply = self._await(pending.reply)[0]       # misses and SD: drafted for this round
            # the wait for this round's drafting counts from the send: after a round on every core,
            # sending held the decoder ~3 ms at batch 1 while the drafter woke and drafted, and
            # counted apart (as other per-round time, K-independent) it priced SD at every K by K = 6
            spec_wait = (time.perf_counter() - (t0 if drained else t_send)) * 1e3
            pending = pending if reply is not None else None
        # 2. one batched target forward over [pending token, speculation] per sequence.
        # The target may take every core when the drafter has nothing to do during the forward (no
        # pre-drafting, no prompt or catch-up to prefill), whoever chose the round: the policy, or
        # requests' own ar and sd modes (served, where the target's own threads are one, those ran
        # on one core)
        idle = not told_joins and not any(s.build for s in seqs) and self.unread is None and (pending is None or reply is not None)
        all_cores = idle and (option is None or option.wide)
        self.target.use_all_cores(all_cores)
        t0 = time.perf_counter()
        starts = [self.target.length(s.slot) for s in seqs]
        fed = [[s.pending] + self._spec_tokens(s) for s in seqs]
        # All greedy, none processed, no log-probs: the target sends back argmax ids, not logits (a
        # vocabulary per position).
        ids_only = all(s.params.greedy and not s.processed and not s.params.return_log_probs for s in seqs)
        if ids_only:
            outputs = self._within_vocab(seqs, self.target.forward_greedy([s.slot for s in seqs], fed), starts, fed)
        else:
            outputs = self.target.forward([s.slot for s in seqs], fed)
        verify_ms = (time.perf_counter() - t0) * 1e3
        # 3. the drafter's answer and next cache keys read, each sequence verified
        build_wait = built_ms = 0.0
        if pending and unanswered:
            self._leave_unread(pending, told_tokens, told_joins)
            pending = None
        if pending and reply is None:   # all hits: the answer (q's for sampling) came during the forward
            reply, build_wait = self._await(pending.reply)
        if pending and reply is not None:
            caches, w = self._await(pending.caches)       # built during the forward
            self.caches, build_wait = (caches.keys if caches else {}), build_wait + w
            built_ms = caches.build_ms if caches else 0.0
        t0 = time.perf_counter()
        drawn = {} if ids_only else self._draw_plain(seqs, outputs)
        events = [self._verify(s, out, start, ids_only, drawn.get(s.seq_id)) for s, out, start in zip(seqs, outputs, starts)]
        self.last_verify_ms = verify_ms + (time.perf_counter() - t0) * 1e3
        self._flush_leaves()
        # 4. the round recorded, and measured for the policy
        hits = sum(reply.hits.values()) if reply else 0
        kinds = [e.kind for e in events]
        stats = RoundStats(
            batch=len(seqs), tokens=sum(len(e.tokens) for e in events), verify_ms=self.last_verify_ms,
            draft_wait_ms=spec_wait + build_wait, draft_ms=reply.draft_ms if reply else 0.0,
            build_ms=reply.build_ms if reply else 0.0, hits=hits, misses=len(reply.hits) - hits if reply else 0,
            backup=reply.backup if reply else "", degraded=any(s.stats.degraded for s in seqs),
            drafted=sum(e.drafted for e in events), accepted=sum(e.accepted for e in events),
            emitted=[len(e.tokens) for e in events], prefill_ms=prefill_ms, joined=len(joining), one_core=not all_cores,
            wall_ms=(time.perf_counter() - t_round) * 1e3, gap_ms=gap_ms, spec_wait_ms=spec_wait, ar=kinds.count("ar"),
            sd=kinds.count("sd"), ssd=kinds.count("ssd"), ks=[e.drafted for e in events],
            option=option.label if option else "", budget=option.budget if option else 0,
            saguaro_c=option.c if option is not None and option.kind == "ssd" else None, predicted_ms=predicted.ms if predicted else None,
            predicted_tokens=predicted.tokens if predicted else None)
        self.history.append(stats)
        if option is not None and not joining and not drained and not resumed and not stats.degraded and self.policy.measure:
            self.policy.observe(RoundCosts(
                option=option, batch=len(seqs), tokens_per_seq=1 + max(stats.ks), verify_ms=stats.verify_ms,
                spec_wait_ms=spec_wait, build_wait_ms=build_wait, build_ms=built_ms, wall_ms=stats.wall_ms + gap_ms,
                hits=stats.hits, misses=stats.misses, backup=stats.backup,
                tokens=sum(e.accepted + 1 for e in events if e.seq_id in chosen),
                catch_up_ms=reply.catch_up_ms if reply else 0.0))
        if option is not None:
            self.policy.ran(option)
        self.last_round_end = time.perf_counter()
        return events

    def _within_vocab(self, seqs: list[Sequence], ids: list[torch.Tensor], starts: list[int],
                      fed: list[list[int]]) -> list[torch.Tensor]:
        """forward_greedy's argmax runs over the target's whole (padded) vocabulary; verification
        over the shared one. A sequence whose argmax fell beyond it (padding rows: rare) is run
        again for its logits, and takes the argmax of those within the shared vocabulary."""
        if self.vocab == self.target.vocab_size:
            return ids
        again = [i for i, x in enumerate(ids) if bool((x >= self.vocab).any())]
        if not again:
            return ids
        for i in again:
            self.target.truncate(seqs[i].slot, starts[i])
        logits = self.target.forward([seqs[i].slot for i in again], [fed[i] for i in again])
        for i, x in zip(again, logits):
            ids[i] = greedy(x[:, : self.vocab])
        return ids

    def _plan(self, seqs: list[Sequence], cold: bool = False) -> tuple[Option | None, Prediction | None, set[int]]:
        """Each sequence's K and pre-drafting for this round (step 0), told to the drafter with the
        outcomes. Returns the policy's option and prediction (None when no sequence is its), and
        the ids of the sequences it chose for. cold: the round follows a pause (it is not measured)."""
        if self.steady and self.policy.keep():   # a plain step kept, the round as the last one
            self.steady -= 1
            for o in self.outcomes:     # (held: the drafter hears of them at the next catch-up)
                o.next_k, o.build = 0, False
                self.held[o.seq_id].append(o)
            self.outcomes = []
            return self.steady_plan
        self.steady = 0
        chosen = [s for s in seqs if self._policy_seq(s) and not s.first_round] if self.policy is not None else []
        for s in seqs:
            speculates = s.mode != "ar" and not s.first_round
            s.k, s.build = (s.request_k, s.mode == "ssd") if speculates else (0, False)
            s.round_budget, s.lookup = 0, False
        # A sequence's outcomes wait while it takes plain target steps: the drafter stays idle (and
        # off the target's cores). It is told them in a round on the target's own cores, and brings
        # its KV up to date there and in the rounds after (the answer is read once it should be
        # done, step): once as the policy's exploring comes near, and at the latest every
        # policy.catch_up of them (policy.catch_up_now), so speculating again waits for no long catch-up.
        # (not while an answer is unread: telling it more would wait for that answer)
        # (timed by the sequences the drafter follows: _defer_joins)
        catch_up = False
        if self.policy is not None and self.unread is None and self.outcomes:
            held = self._untold([o.seq_id for o in self.outcomes]) + 1
            catch_up = held > 1 and self.policy.catch_up_now(held)
        if self.policy is not None:
            catch_up = self._defer_joins(catch_up)
        option = predicted = None
        if chosen:
            # the drafter prefills new prompts or held outcomes in this round, or still does
            busy = bool(self.joins) or catch_up or self.unread is not None
            wide_ok = not busy and not any(s.build for s in seqs if s not in chosen)
            plain_only = any(s.seq_id in self.deferred for s in chosen)
            option, predicted = self.policy.choose([s.seq_id for s in chosen], len(seqs), wide_ok, busy, cold, plain_only)
        ids = {s.seq_id for s in chosen}
        fast_misses = option is not None and option.backup == "fast"
        for s in chosen:
            s.k, s.build, s.lookup = option.k, option.kind == "ssd", option.lookup
            s.round_budget = min(option.budget, s.budget) if s.build else 0
            if s.lookup:
                self._fast(s)
        told = []
        for o in self.outcomes:
            s = self.seqs[o.seq_id]
            drafts = s.k and not s.lookup   # the drafter drafts, or looks up a pre-drafted speculation
            o.next_k, o.build, o.next_budget = s.k if drafts else 0, s.build, s.round_budget or None
            if s.seq_id in ids and s.c is None:     # the policy's C (SSD's choice; the configured one else)
                o.next_c = option.c if option.kind == "ssd" else self.spec.saguaro_c
            if fast_misses and s.seq_id in ids and s.spec is None and s.seq_id in self.caches:
                o.fast = self._fast(s)    # a miss (its outcome was not pre-drafted): no wait for the drafter
            self.held.setdefault(o.seq_id, []).append(o)
            if not (s.k or s.build):
                s.spec = None           # a plain target step: a pre-drafted speculation goes unused
            # (an n-gram round is the drafter's plain step: told with them)
            if drafts or s.build or (catch_up and o.seq_id not in self.deferred):
                told += _merged(self.held.pop(o.seq_id))
        self.outcomes = told
        if option is not None and len(chosen) == len(seqs) and option.kind == "ar":
            self.steady, self.steady_plan = self._steady_rounds(seqs, option), (option, predicted, ids)
        return option, predicted, ids

    def _steady_rounds(self, seqs: list[Sequence], option: Option) -> int:
        """Rounds after this one (a plain step for sequences all the policy's) that repeat it
        without planning, on policy.keep alone: while the policy would only keep that step
        (RoundPolicy.steady) and the drafter has nothing to hear before the next catch-up (this
        round tells it nothing, no answer is unread). A join, a leave or a failure ends them (add,
        _finish, _degrade)."""
        if self.outcomes or self.joins or self.leaves or self.unread is not None or (self.deferred and not self.policy.follows_one):
            return 0
        return min(self.policy.steady(option), self.policy.catch_up - self._untold([s.seq_id for s in seqs]) - 1)

    def _untold(self, seq_ids: list[int]) -> int:
        """The most held outcomes of a sequence the drafter follows (of all, when it follows none
        of these): what the catch-ups are timed by."""
        followed = [i for i in seq_ids if i not in self.deferred] or seq_ids
        return max(len(self.held.get(i, ())) for i in followed)

    def _defer_joins(self, catch_up: bool) -> bool:
        """While its speculation is not predicted to pay (policy.follows_one: far from paying, or
        near), the drafter follows one of the policy's sequences, enough to measure what it would
        accept (shadow acceptance); the others stay unknown to it. A new prompt's join waits with
        its sequence's plain steps; at a catch-up with no sequence followed, the one that joined
        first is told, its prompt and plain steps together; one that ends first never reaches the
        drafter. Its rounds may use every core. Every join waiting is told when exploring comes near
        and once the drafter's speculation is predicted to pay (that round catches every sequence
        up). Returns whether this round catches up."""
        if not (self.joins or self.deferred or catch_up):
            return False                # nothing to defer, tell or catch up on
        if self.policy.follows_one and not self.policy.explore_soon:
            for j in [j for j in self.joins if self._policy_seq(self.seqs[j.seq_id])]:
                self.joins.remove(j)
                self.deferred[j.seq_id] = j
            if catch_up and self.deferred and not any(self._policy_seq(s) and s.seq_id not in self.deferred for s in self.seqs.values()):
                # one about to end is not worth its prompt's prefill (rounds on the target's own core)
                worth = [i for i in self.deferred if self.policy.worth_following(self._left(self.seqs[i]))]
                if worth:
                    self.joins.append(self.deferred.pop(worth[0]))
            # a catch-up with nothing to tell is none (every sequence's join still waits)
            catch_up = catch_up and any(o.seq_id not in self.deferred for o in self.outcomes)
        elif self.deferred and self.unread is None:
            catch_up = True
            self.joins += self.deferred.values()
            self.deferred = {}
        return catch_up

    @staticmethod
    def _left(s: Sequence) -> int:
        """Tokens a sequence may still generate."""
        return s.params.max_tokens - len(s.output)

    @staticmethod
    def _policy_seq(s: Sequence) -> bool:
        """The round policy chooses this sequence's rounds: an ssd request that did not pin K."""
        return s.mode == "ssd" and not s.pinned

    def _prefill(self, seqs: list[Sequence]) -> None:
        for s in seqs:
            if len(s.prompt) > 1:
                self.target.forward([s.slot], [s.prompt[:-1]], logits=False)

    def _spec_tokens(self, s: Sequence) -> list[int]:
        """The speculation a round verifies: K drafted tokens, but no more than the sequence may
        still emit: more would only be cut, and would run past max_seq_len on an engine whose KV
        holds exactly that many positions (TensorRT-LLM's)."""
        return s.spec.tokens[: min(s.k, self._left(s))] if s.spec is not None and s.k else []

    def _fast(self, s: Sequence) -> list[int]:
        """The decoder's own n-gram speculation, as the drafter would have guessed it (its top-1
        next tokens copied from its builds), verified without waiting for the drafter: a cache miss
        under the fast backup (the drafter is told the tokens, Outcome.fast, and takes them as the
        speculation), or SD drafted by it (Option.lookup)."""
        s.spec = fast_speculation(ngram_proposal(s.tokens, s.k, self.top_next), self.vocab, s.params.greedy)
        return s.spec.tokens

    def _score_guess(self, s: Sequence, token: int) -> None:
        """A plain step scores the n-gram guess on the token it committed (shadow acceptance, as the
        drafter scores itself at a catch-up), once in GUESS_EVERY tokens (GUESS_FAR times fewer while
        the guess is far from paying): told to the policy every GUESS_SCORES scored (scoring every
        token of a batch of 4 cost ~1% of its plain steps)."""
        s.guessed[0] += ngram_proposal(s.tokens, 1, self.top_next)[0] == token
        s.guessed[1] += 1
        if s.guessed[1] >= GUESS_SCORES:
            self.policy.observe_accept(s.seq_id, s.guessed[0], s.guessed[1], "fast", shadow=True)
            s.guessed = [0, 0]

    def _has_news(self, urgent: bool = False) -> bool:
        """Something to tell the drafter; urgent: something that cannot wait for an answer left
        unread to be read (leaves can: they only free the drafter's slots)."""
        return self.draft is not None and bool(self.joins or self.outcomes or (self.leaves and not urgent))

    def _start_draft_round(self, backup: str = "") -> PendingRound | None:
        if not self._has_news(urgent=self.unread is not None):
            return None
        self._drain()                   # one round in flight at a time
        rnd = DraftRound(joins=self.joins, outcomes=self.outcomes, leaves=self.leaves, verify_ms=self.last_verify_ms,
                         backup=backup)
        self.joins, self.outcomes, self.leaves = [], [], []
        try:
            return self.draft.start(rnd)
        except DraftFailure:
            self._degrade()
            return None

    def _leave_unread(self, pending: PendingRound, tokens: int, joins: bool) -> None:
        """A round whose answer nothing needs now: the drafter works on, and it is read once done."""
        self.unread, self.unread_since, self.unread_tokens, self.unread_rounds = pending, time.perf_counter(), tokens, 0
        self.unread_joins = joins

    def _unread_done(self) -> bool:
        """Whether the answer left unread is in, where the drafter's channel can tell without
        waiting; else whether it should be: timed by the last such answer read (per token told,
        joins' prompts apart from catch-ups), at least JOIN_READ rounds until one was."""
        self.unread_rounds += 1
        arrived = self.unread.arrived()
        if arrived is not None:
            return arrived
        per_token = self.read_ms_per_token[self.unread_joins]
        if per_token <= 0:
            return self.unread_rounds >= JOIN_READ
        return (time.perf_counter() - self.unread_since) * 1e3 >= self.unread_tokens * per_token

    def _drain(self) -> None:
        """Read the answers of a round left unread."""
        pending, self.unread = self.unread, None
        reply = self._await(pending.reply)[0] if pending is not None else None
        if reply is not None:
            self._await(pending.caches)
            if self.unread_tokens:      # (not a round of leaves alone)
                self.read_ms_per_token[self.unread_joins] = reply.draft_ms / self.unread_tokens

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
        elif isinstance(value, NextCaches):
            self.top_next.update(value.top_next)
        return value, (time.perf_counter() - t0) * 1e3

    def _apply(self, reply: DraftReply) -> None:
        self.draft_slots = reply.active_slots
        for seq_id, (accepted, scored) in reply.shadow.items():
            if self.policy is not None and seq_id in self.seqs:
                self.policy.observe_shadow(seq_id, accepted, scored)
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
        self.joins, self.outcomes, self.leaves, self.held, self.unread, self.deferred = [], [], [], {}, None, {}
        self.steady = 0
        try:
            self.draft.reset()
        except Exception:   # a drafter that cannot even reset is replaced by its client or stays unused
            pass
        self.draft_slots = 0

    def _verify(self, s: Sequence, out: torch.Tensor, start: int, ids_only: bool,
                drawn: tuple[int, float] | None = None) -> Event:
        """A sequence's part of step 3. out: the target's logits over [pending, speculation], or
        their argmax ids (ids_only); drawn: its plain step's token and p(token), drawn with others
        (_draw_plain)."""
        draft = self._spec_tokens(s)   # empty if the drafter failed after the forward: an AR step
        kind = "ar" if not draft else "ssd" if s.build else "sd"
        x = None if ids_only or drawn else self._scaled(s, out, draft)
        # a. what the target accepts of the speculation, and the token it adds
        k, bonus, p_plain = (0, drawn[0], [drawn[1]]) if drawn else self._accept(s, out if ids_only else x, draft, ids_only)
        log_probs = token_log_probs(x, draft[:k] + [bonus]) if s.params.return_log_probs else None
        # b. what the policy learns from it (before the tokens join the sequence: the guess is scored on them)
        if self.policy is not None:
            if draft:
                self.policy.observe_accept(s.seq_id, k, len(draft), s.spec.source, c=s.spec.c)
            elif len(s.tokens) % (GUESS_EVERY * GUESS_FAR if self.policy.guess_far else GUESS_EVERY) == 0 and self._policy_seq(s):
                self._score_guess(s, bonus)
        # c. the tokens committed, up to a stop
        new = self._commit(s, draft, k, bonus, start, kind)
        event = Event(seq_id=s.seq_id, tokens=new, finish_reason=s.finish_reason, stats=s.stats,
                      source=s.spec.source if draft else "ar", drafted=len(draft), accepted=k, kind=kind,
                      log_probs=log_probs[: len(new)] if log_probs is not None else None)
        # d. the outcome for the drafter, and the next speculation if it was pre-drafted
        if s.finish_reason is None and s.mode != "ar":
            self.outcomes.append(Outcome(s.seq_id, k, draft[:k] + [bonus], p_plain=p_plain))
            s.spec = self._next_speculation(s, k, bonus)
        if s.finish_reason is not None:
            self._finish(s)
        return event

    def _draw_plain(self, seqs: list[Sequence], outputs: list[torch.Tensor]) -> dict[int, tuple[int, float]]:
        """Sampled plain steps (no speculation, no processing, no log-probs) drawn together, one
        distribution and one inverse CDF per sampling setting for all their rows: seq_id -> (token,
        p(token)). Each row draws its one uniform from its own generator, as `_accept` would, so the
        tokens are the same; at batch 4 per-sequence sampling took ~450 us a round, together ~150."""
        groups: dict[tuple, list[int]] = {}
        for i, s in enumerate(seqs):
            p = s.params
            if not (p.greedy or s.processed or p.return_log_probs or self._spec_tokens(s)):
                groups.setdefault((p.temperature, p.top_k, p.top_p), []).append(i)
        drawn = {}
        for members in groups.values():
            # a plain step's row is the first: a forward that verified a speculation the drafter's
            # failure then dropped (_degrade) has more
            p = probs(torch.cat([outputs[i][:1, : self.vocab] for i in members]), seqs[members[0]].params)
            tokens = sample_rows(p, [(seqs[i].generator, 1) for i in members]).tolist()
            for row, (i, token) in enumerate(zip(members, tokens)):
                drawn[seqs[i].seq_id] = (token, probability(p[row:row + 1], token))
        return drawn

    @staticmethod
    def _accept(s: Sequence, out: torch.Tensor, draft: list[int], ids_only: bool) -> tuple[int, int, list[float] | None]:
        """(k, bonus, p_plain): the draft tokens accepted, the target's own token after them, and
        for a sampled plain step the probability of that token (what the drafter scores itself on).
        out: argmax ids (ids_only) or the processed logits."""
        if s.params.greedy:
            return (*verify_greedy((out if ids_only else greedy(out)).tolist(), draft), None)
        q = s.spec.q[: len(draft)] if draft else None
        p = distribution(out, s.params)
        k, bonus = verify_sampled(p, q, draft, s.generator)
        return k, bonus, None if draft else [probability(p, bonus)]

    def _commit(self, s: Sequence, draft: list[int], k: int, bonus: int, start: int, kind: str) -> list[int]:
        """The accepted tokens and the bonus join the sequence (up to a stop: returns those that
        did); the target's KV keeps the pending token and the accepted ones."""
        s.first_round = False
        st = s.stats
        st.rounds, st.drafted, st.accepted = st.rounds + 1, st.drafted + len(draft), st.accepted + k
        setattr(st, f"{kind}_rounds", getattr(st, f"{kind}_rounds") + 1)
        new = self._apply_stops(s, draft[:k] + [bonus])
        s.output.extend(new)
        s.tokens.extend(new)
        self.target.truncate(s.slot, start + 1 + k)
        s.pending = bonus
        return new

    def _next_speculation(self, s: Sequence, k: int, bonus: int) -> Speculation | None:
        """SSD: the speculation the drafter pre-drafted for this outcome, from the cache keys it
        sent (None: a miss, or no build this round; the drafter then sends one if asked)."""
        tokens = self.caches.get(s.seq_id, {}).get((k, bonus)) if s.build else None
        return Speculation(tokens, None, "cache") if tokens else None

    def _scaled(self, s: Sequence, out: torch.Tensor, draft: list[int]) -> torch.Tensor:
        """The target's rows over the shared vocabulary, scaled by the temperature (1 for greedy) and,
        when the request asks, processed as TensorRT-LLM does (saguaro.logits): each row with the
        context of its own position, so verification sees what plain decoding would."""
        rows = out[:, : self.vocab]
        if s.processed:
            return process(rows, s.params, s.prompt, s.output, draft)
        return rows.float() if s.params.greedy else rows.float() / s.params.temperature

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
        self.steady = 0
        if self.policy is not None:
            self.policy.forget(s.seq_id)
        self.target.release(s.slot)
        self.outcomes = [o for o in self.outcomes if o.seq_id != s.seq_id]
        self.held.pop(s.seq_id, None)
        pending_join = [j for j in self.joins if j.seq_id == s.seq_id]
        if pending_join:            # the drafter never saw it
            self.joins.remove(pending_join[0])
        elif self.deferred.pop(s.seq_id, None) is None and s.mode != "ar":
            self.leaves.append(s.seq_id)

    def _flush_leaves(self) -> None:
        """With no round left to carry them, tell the drafter the leaves now, so its slots are
        freed, and leave its answer unread: a request's last tokens wait for nothing (draining an
        unread catch-up first cost up to a round's time). While the drafter still works on another
        answer they wait for the next round or `settle`, since telling it more waits for that answer."""
        if self.seqs or self.draft is None or not self.leaves:
            return
        if self.unread is not None:
            if self.unread.arrived() is False:
                return
            self._drain()               # arrived, or an in-process drafter, which works when read
        pending = self._start_draft_round()
        if pending is None:
            return
        if pending.arrived() is None:   # an in-process drafter works when read: nothing to overlap
            if self._await(pending.reply)[0] is not None:
                self._await(pending.caches)
        else:
            self._leave_unread(pending, 0, False)

    @property
    def unsettled(self) -> bool:
        """The drafter owes an answer or has leaves untold (`settle`)."""
        return self.unread is not None or bool(self.leaves)

    def settle(self) -> None:
        """With no sequence left (generate's end, an idle server): read what the drafter still owes
        and tell it the leaves not yet told, waiting for both, so its slots are free."""
        if self.seqs or self.draft is None:
            return
        self._drain()
        if self.leaves:
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
        self.settle()
        return [out[i] for i in ids]

    def close(self) -> None:
        for seq_id in list(self.seqs):
            self.abort(seq_id)
        if self.draft is not None:
            self.draft.close()
        self.target.close()


def _merged(held: list[Outcome]) -> list[Outcome]:
    """A sequence's held outcomes as told: after the first, each is of a round the drafter took no
    part in (a plain target step, or SD drafted by the n-gram guess: it was held because the round
    after it was one), so they go as one outcome of all their tokens, none of them a speculation of
    the drafter's (a 64-step catch-up round at batch 4 spent 2.1 ms beyond its forward as 256
    outcomes, 0.6 as 4)."""
    if len(held) == 1:
        return held
    first, steps = held[0], held[1:]
    sampled = all(o.p_plain is not None for o in steps)   # (an n-gram round's accepted tokens have none)
    return [first, Outcome(first.seq_id, 0, [t for o in steps for t in o.emitted], next_k=steps[-1].next_k,
                           build=steps[-1].build, next_budget=steps[-1].next_budget, next_c=steps[-1].next_c, fast=steps[-1].fast,
                           p_plain=[p for o in steps for p in o.p_plain] if sampled else None)]


def _ends_with(tokens: list[int], stop: tuple[int, ...]) -> bool:
    return len(stop) > 0 and tuple(tokens[-len(stop):]) == tuple(stop)
