"""The round policy: before every round, the option with the highest predicted tokens per second
among a plain target step (AR), SD with K and SSD with K, a fan-out budget B, a Saguaro C and a
backup (docs/design.md, "The round policy").

The prediction is the speedup model ("The speedup model") fed with what this machine and these
sequences show online: the target's verify time against tokens, batch and cores; the drafter's
JIT drafting, cache-build (per B) and backup times; acceptance per sequence (decaying, with its sampling
regime's global rate as its prior; measured by plain steps too, the drafter scoring itself on their tokens), the fast
backup's acceptance, the cache hit rate per K, B and C, and sampled speculations' acceptance per C
(a lower C raises hits and costs acceptance: it is chosen where that pays). The backup rule of the
paper (neural for small batches, fast for large) falls out: a miss stalls the round with
probability 1 - p_hit^batch, which the neural backup pays in time and the fast one in tokens. Options nobody has measured yet are tried first; after
that one round in EXPLORE goes to a neighbour of the best (K +- 1, the best of each other kind),
so cost estimates stay fresh. A speculating option must be predicted MARGIN faster than a plain
step, with its tokens calibrated by what such rounds delivered.

The policy chooses; it never touches tokens: every round verifies what it speculated with the q it
was drawn from, so the output does not depend on the choice.
"""
from __future__ import annotations

import math
import random
from collections import deque
from dataclasses import dataclass
from functools import cached_property

from saguaro.fanout import expected_tokens

EXPLORE = 1 / 96          # share of rounds that try a neighbour of the best option, evenly spaced (drawn at
                          # random, seed 0 put 3 of its first 256 at 1/384: a batch-4 cell's whole run)
EXPLORE_LEAD = 4          # rounds before exploring that the drafter starts catching up (on its own core; the
                          # round before would otherwise wait for it: 17 ms of a 64-step catch-up at batch 4)
RERANK = 8                # every RERANK-th round scores every option; the others its last SHORTLIST best
SHORTLIST = 4
PLAIN_REFRESH = 0.003     # a kept plain step runs on the other cores once every ((gap + SWITCH_BACK) / this)
                          # rounds, at least 16 apart (gap: how much slower the other is predicted, plus
                          # NARROW_MARGIN for one core, which must win by that much to be chosen): 0.3%
                          # of the rate, so one unlucky early measurement of either cannot stick
SWITCH_BACK = 0.1         # ... counting the round after it too, back on the kept cores: the first round on
                          # every core after one on a single core cost 7-16% more at batch 1 (threads woken,
                          # caches the drafter used); without it one core was tried every ~17 rounds there
HELD_MEASURED = 8         # a kept plain step's rounds are measured one in this many: measuring took ~19 us a
                          # round at batch 1 (caches cold after the forward), 1% of a 2 ms round; at 4, ~30 us
                          # a measured round was still ~0.4% of T = 0.7 batch-1 runs where AR won every round
HOLD = 8                  # rounds a plain step's choice is kept unscored after it was chosen (until news
                          # of acceptance, which scores at once): a scoring round's choice took ~100 us in the
                          # decoder at batch 1 (a full ranking ~300 us alone), and at 3 one round in four scored
RATE_DECAY = 0.97         # per round, of a sequence's acceptance and a K's hit rate: a horizon of ~30 rounds
GLOBAL_DECAY = 0.98       # per observed speculation (or lookup round), of the global rates: the last ~50
COST_DECAY = 0.9          # per observation, of a cost: the last ~10 (an estimate the load made stale
                          # must recover from the few rounds exploring gives it)
RECENT = 3                # measurements of one size a cost's median is taken over (odd: Line.observe)
SEQ_PRIOR = 1.0           # weight of the global acceptance rate in a sequence's own estimate
MARGIN = 0.03             # a speculating option is chosen over a plain step only when predicted this
                          # much faster: the best of many noisy estimates is biased up (winner's curse)
NARROW_MARGIN = 0.5       # a plain step runs on the target's own core, the drafter idle, only when that measured
                          # this much faster than every core (`_plain_cores`): another process on the other core,
                          # not the host's drift (at 0.05, floors from a slow minute of every core against a fast
                          # one of one core held 10-17% of batch-1 rounds on one core, 5-20% slower each)
PLAIN_FRESH = 32          # ... and both were measured within this many rounds (else every core)
HORIZON = 8               # rounds an SSD option is expected to be kept: its first round, with no cache
                          # to look in, is counted as 1 of HORIZON
CATCH_UP = 16             # plain steps a sequence's outcomes wait at most before the drafter is told them
# Far from paying: the best speculating option is predicted below FAR of a plain step's rate, at the
# acceptance speculation has had here lately (`reach`). Staying ready then costs more than it can
# win back soon: a plain choice is kept FAR_HOLD rounds, exploring drops to FAR_EXPLORE of EXPLORE,
# and the drafter catches up every CATCH_UP_FAR plain steps (at batch 4 here a catch-up kept the
# target on its own core for 2-4 rounds of every 16)
FAR = 0.9
FAR_HOLD = 32             # (at 16, the choices at a hold's end took ~0.4% of T = 0.7 batch-1 runs, ~160 us each)
FAR_EXPLORE = 0.125       # (at 0.25, one exploring round in 384: at batch 4 each one first tells the drafter every
                          # deferred prompt, 20-40 ms on the target's own core, ~0.7% of a cell where AR won every round)
CATCH_UP_FAR = 64
LOWER_C = 0.5             # the Saguaro C below the configured one that SSD may be drafted with (sampled sequences)
FOLLOW_CATCH_UPS = 2      # far from paying, a sequence is followed only with this many catch-ups' tokens left


@dataclass(frozen=True)
class Option:
    kind: str                 # ar | sd | ssd
    k: int                    # draft tokens verified (0 for ar)
    wide: bool                # the target's forward may use every core (the drafter is idle during it)
    backup: str = ""          # ssd: what a cache miss gets, neural | fast; sd: fast when the speculation
                              # is the decoder's own n-gram guess (the drafter takes no part), else ""
    budget: int = 0           # ssd: the fan-out budget B, branches pre-drafted per sequence
    c: float = 1.0            # ssd: Saguaro C of its drafting (sampled sequences; docs/design.md, "Saguaro sampling")

    # (computed once per option: the decoder reads them every round)
    @cached_property
    def label(self) -> str:
        parts = [f"{self.kind}{self.k or ''}", self.backup, "" if self.kind == "ssd" else "wide" if self.wide else "narrow",
                 f"B{self.budget}" if self.budget else "", f"C{self.c:g}" if self.c < 1 else ""]
        return "/".join(p for p in parts if p)

    @cached_property
    def lookup(self) -> bool:
        """SD drafted by the n-gram guess in the decoder: no drafter, no drafting time."""
        return self.kind == "sd" and self.backup == "fast"

    @cached_property
    def work(self) -> str:
        """What its costs beyond the forward are kept under: its kind, or lookup."""
        return "lookup" if self.lookup else self.kind


PLAIN_WIDE, PLAIN_NARROW = Option("ar", 0, True), Option("ar", 0, False)
PLAIN_SAMPLES = 2.5       # decayed weight of the ~3 measurements of a plain step trusted at a batch size
CALIBRATION_PRIOR = 50.0  # predicted tokens' worth of belief that the model's token counts are right (at 20,
                          # two unlucky first rounds of a = 0.9 priced speculation out for 300 rounds)


@dataclass
class Prediction:
    tokens: float             # emitted by the round's policy sequences together
    ms: float                 # the round's wall time

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.tokens / self.ms if self.ms > 0 else 0.0


class Rate:
    """A success rate. A sequence's (and a K's hit rate) forgets with every round (`tick`), observed
    or not: evidence from long ago fades towards the prior, the global rate, so a rate the policy
    stopped measuring returns to what speculation usually achieves here. The global rates forget per
    observation (`decay`), so they stay what the last speculations measured however long ago."""

    def __init__(self, decay: float = 1.0):
        self.successes = self.trials = 0.0
        self.decay = decay

    def observe(self, successes: float, trials: float) -> None:
        self.successes = self.successes * self.decay + successes
        self.trials = self.trials * self.decay + trials

    def tick(self, factor: float = RATE_DECAY) -> None:
        self.successes *= factor
        self.trials *= factor

    def value(self, prior: float, weight: float = 1.0) -> float:
        return (self.successes + prior * weight) / (self.trials + weight)


class Line:
    """A decaying least-squares line y = a + b x (b >= 0: a cost never falls with more work). Until
    two different x have been seen it is a constant, or, for work that grows with x
    (`proportional`: drafting K tokens, verifying n), y proportional to x: K = 6 is not assumed to
    cost what the K = 3 seen so far did."""

    def __init__(self, proportional: bool = False):
        self.proportional = proportional
        self.weight: dict[float, float] = {}        # x -> decaying count of its measurements
        self.recent: dict[float, deque[float]] = {}   # x -> its last RECENT measurements
        self.cost: dict[float, float] = {}          # x -> what x measured, updated by observe
        self.capped: dict[float, float] = {}        # x -> the least any x' >= x measured (predict)
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.mx = self.my = self.slope = 0.0      # the fit, refreshed by each observation

    def observe(self, x: float, y: float) -> None:
        d = COST_DECAY
        self.weight[x] = self.weight.get(x, 0.0) * d + 1
        recent = self.recent.get(x)
        if recent is None:
            recent = self.recent[x] = deque(maxlen=RECENT)
        recent.append(y)
        self.cost[x] = sorted(recent)[RECENT // 2] if len(recent) == RECENT else min(recent)   # the median
        # a cost never falls with more work: what more work measured caps less work's, so a size
        # measured once during a stall is not believed over its neighbours (a 2-token verify once
        # read 14 ms beside 2.7 for 3 tokens, and priced SD at K = 1 out for the rest of the run)
        cap = float("inf")
        for size in sorted(self.cost, reverse=True):
            cap = self.capped[size] = min(cap, self.cost[size])
        self.w, self.sx, self.sy = self.w * d + 1, self.sx * d + x, self.sy * d + y
        self.sxx, self.sxy = self.sxx * d + x * x, self.sxy * d + x * y
        self.mx, self.my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - self.mx * self.mx
        if var > 1e-6:
            self.slope = max(0.0, (self.sxy / self.w - self.mx * self.my) / var)
        else:
            self.slope = self.my / self.mx if self.proportional and self.mx > 0 else 0.0

    def floor(self, x: float) -> float | None:
        """The least of x's last RECENT measurements (None: x never measured): what x costs
        without a stall."""
        recent = self.recent.get(x)
        return min(recent) if recent else None

    def predict(self, x: float) -> float:
        """What x itself measured, else the line: a forward's cost is not linear in its tokens here
        (7.1, 10.0, 11.6, 13.4 ms for 1-4 tokens), and a line through widths 1-7 misjudged width 1
        by ~5%, enough to keep plain steps off the second core. What x measured is the median of
        its last RECENT measurements (the least, until there are RECENT): a stall (a GC pause, the
        OS) only ever adds time, and one such round made an option look 10x dearer for as long as
        it then went unchosen. Never more than a larger x measured (`capped`)."""
        measured = self.capped.get(x)
        if measured is not None:
            return measured
        line = max(0.0, self.my + self.slope * (x - self.mx))
        return min([line] + [c for size, c in self.capped.items() if size > x])


class Costs:
    """Measured ms of one kind of work, a Line over its size per batch size; a batch never seen
    borrows the nearest one's."""

    def __init__(self, proportional: bool = False):
        self.lines: dict[int, Line] = {}
        self.proportional = proportional

    def observe(self, batch: int, x: float, ms: float) -> None:
        line = self.lines.get(batch)
        if line is None:
            line = self.lines[batch] = Line(self.proportional)
        line.observe(x, ms)

    def at(self, batch: int) -> Line | None:
        if not self.lines:
            return None
        line = self.lines.get(batch)
        return line if line is not None else self.lines[min(self.lines, key=lambda b: (abs(b - batch), b))]

    def predict(self, batch: int, x: float) -> float | None:
        line = self.at(batch)
        return None if line is None else line.predict(x)


@dataclass
class RoundCosts:
    """What a finished round measured, for the policy (times in ms)."""
    option: Option
    batch: int                # the policy's sequences in the round
    tokens_per_seq: int       # the widest verify: pending token + K
    verify_ms: float
    spec_wait_ms: float       # waited before the forward: SD drafting, backups after misses
    build_wait_ms: float      # waited after the forward for the next caches
    build_ms: float           # the drafter's cache build during this round (0: none)
    wall_ms: float            # the round and the caller's work since the round before
    hits: int
    misses: int
    backup: str
    tokens: int = 0           # verified by the policy's sequences (accepted + 1 each)
    catch_up_ms: float = 0.0  # of spec_wait_ms: the drafter catching up on plain steps first (a switch, not drafting)


@dataclass(frozen=True)
class HeldChoice:
    """A plain step's choice, kept for HOLD rounds while the round it was made for repeats."""
    option: Option
    prediction: Prediction | None
    wide_ok: bool
    batch: int
    seq_ids: tuple[int, ...]

    def fits(self, wide_ok: bool, batch: int, seq_ids: list[int]) -> bool:
        return (wide_ok, batch) == (self.wide_ok, self.batch) and tuple(seq_ids) == self.seq_ids


class RoundPolicy:
    def __init__(self, max_k: int, default_k: int, backups: tuple[str, ...] = ("neural", "fast"),
                 budgets: tuple[int, ...] = (8,), cs: tuple[float, ...] = (1.0,), seed: int = 0):
        self.ks = ks = range(1, max_k + 1)
        # Saguaro C's to choose from, the configured one first: an unmeasured lower one is priced at
        # its hit rate and acceptance (hit_rate, c_factor) and must not win the tie
        self.cs = cs = tuple(dict.fromkeys(cs))
        # the largest budget (the configured one) first: an unmeasured smaller one is priced as it
        # is (_budget_line, hit_rate) and must not win the tie
        self.budgets = budgets = tuple(sorted(set(budgets), reverse=True))
        # the n-gram guess as SD's drafter where the fast backup is allowed (backup auto or fast)
        drafters = ("", "fast") if "fast" in backups else ("",)
        self.options = ([Option("ar", 0, w) for w in (True, False)]
                        + [Option("sd", k, w, d) for k in ks for w in (True, False) for d in drafters]
                        + [Option("ssd", k, False, b, n, c) for k in ks for b in backups for n in budgets for c in cs])
        self.first = [Option("sd", default_k, True), Option("sd", default_k, False),
                      Option("ssd", default_k, False, backups[0], budgets[0], cs[0]),
                      *[Option("sd", default_k, True, "fast")][:len(drafters) - 1],
                      Option("ar", 0, True), Option("ar", 0, False)]   # tried first, in this order
        # by wide; a batch that has run only plain steps takes a verify of n tokens to cost n of them
        # (taking it for free, or reading it off batch 1's per-row cost, tried SD at batch 4 and
        # lost: a 4-token verify there costs 2.2x a plain step)
        self.verify = {True: Costs(proportional=True), False: Costs(proportional=True)}
        self.jit = Costs(proportional=True)                                    # by K
        self.build = {n: Costs(proportional=True) for n in budgets}             # by fan-out budget, by K
        self.miss = {"neural": Costs(proportional=True), "fast": Costs()}  # the wait for a backup after a miss, by K
        self.other: dict[str, Costs] = {w: Costs() for w in ("ar", "sd", "ssd", "lookup")}   # wall minus the above (Option.work)
        # what speculation has had here lately, by sampling regime (greedy or not): greedy requests
        # accepted ~0.6 here and T = 0.7 ones ~0.3, and a sampled sequence priced at greedy's rate
        # speculated at a loss
        self.accept = {True: Rate(GLOBAL_DECAY), False: Rate(GLOBAL_DECAY)}
        # the n-gram guess's, by regime too (greedy text repeats itself, sampled text rarely: after a
        # served greedy sweep the first T = 0.7 requests were priced at greedy's rate), and per
        # sequence (copied text repeats in runs: one sequence's says little of another's)
        self.accept_fast = {True: Rate(GLOBAL_DECAY), False: Rate(GLOBAL_DECAY)}
        self.seq_accept_fast: dict[int, Rate] = {}
        self.greedy: dict[int, bool] = {}                   # a sequence's regime (track)
        self.seq_accept: dict[int, Rate] = {}
        self.hits: dict[tuple[int, int, float], Rate] = {}  # by (K, fan-out budget, C)
        # by fan-out budget and C, what lookups hit lately: a (K, B, C)'s prior. One rate for every
        # budget priced an unchosen larger one at the chosen smaller one's hit rate, and kept it unchosen
        self.all_hits = {(n, c): Rate(GLOBAL_DECAY) for n in budgets for c in cs}
        # by C, what sampled sequences' drafted speculations accepted lately: c_factor
        self.accept_c = {c: Rate(GLOBAL_DECAY) for c in cs}
        self.built = 0                                      # the last round pre-drafted (SSD) with this budget: its caches are in
        self.built_c = cs[0]                                # ... and this C
        self.measured = False                               # every option has a prediction
        self.shortlist: list[Option] = []                   # the best options of the last full ranking
        self.rerank = False                                 # news of acceptance: the next choice ranks them all
        self.last_seen: dict[Option, int] = {}              # the round each option was last measured
        self.rounds = 0
        self.rng = random.Random(seed)
        self.explore_next = False       # known a round ahead: the decoder brings the drafter up to date first
        self.measure = True             # the round just chosen is to be measured (observe)
        self.explore_credit = 0.0       # exploring rounds owed: grows by the exploring rate per round
        # measured / predicted tokens of speculating rounds: the model assumes acceptance independent
        # across positions and the rounds it chose were the ones it overestimated (winner's curse);
        # the draft's and the n-gram guess's apart (the guess's acceptance comes in runs)
        self.calibration = {False: Rate(GLOBAL_DECAY), True: Rate(GLOBAL_DECAY)}   # by Option.lookup
        self.raw_tokens: float | None = None    # the uncalibrated prediction of the round being run
        self.held: HeldChoice | None = None
        self.hold = self.ticks = 0              # rounds it is still kept; rounds the rates have not ticked
        self.refresh_every, self.refreshed = 16.0, 0   # the other cores' plain step: run once in, last run
        self.reach = 0.0                        # the best speculating option's score at the global acceptance / the best plain step's
        self.far = False                        # speculation is predicted far from paying (reach < FAR)
        # ... or not to pay (reach < 1): the decoder's drafter then follows one sequence (its joins
        # deferred: Decoder._defer_joins). Only far from paying, at served greedy concurrency 4 and 8
        # (AR won nearly every round, the drafter near paying) every join's draft prefill and every
        # sequence's catch-ups put ~11% of the rounds on the target's own core, +37% each
        self.follows_one = False
        self.guess_far = False                  # ... and SD drafted by the n-gram guess too, by its own reach

    @property
    def explores_drafter(self) -> bool:
        """Exploring may try the drafter's options, except far from paying: there exploring keeps fresh
        only the costs of what needs no drafter (a plain step's other cores, SD drafted by the
        n-gram guess, whose verify costs every kind shares), the drafter's acceptance is measured on
        plain steps meanwhile (shadow acceptance), and its own costs once it is near paying again.
        Exploring it there cost a catch-up of every sequence first (served T = 0.7, concurrency
        2-4: 0.4% of the wall time in the exploring rounds, more in the catch-ups before them)."""
        return not self.far

    @property
    def explore_soon(self) -> bool:
        """A round that may try the drafter's options explores within EXPLORE_LEAD rounds: time to
        start bringing the drafter up to date."""
        return self.explores_drafter and (self.explore_next or self.explore_credit + EXPLORE_LEAD * self._explore_rate() >= 1)

    def _explore_rate(self) -> float:
        return EXPLORE * (FAR_EXPLORE if self.far else 1.0)

    @property
    def catch_up(self) -> int:
        """Plain steps a sequence's outcomes may wait before the drafter is told them: CATCH_UP
        while speculation at the acceptance it has had here lately would pay (reach >= 1; a switch
        is likely soon), CATCH_UP_FAR far from paying, twice CATCH_UP between. A catch-up kept the
        target on its own core for about two batch-4 rounds whatever its length: every 16 steps
        that was 12% of the rounds where AR won every one (greedy batch 4 dev: 0.89 of AR)."""
        if self.far:
            return CATCH_UP_FAR
        return CATCH_UP if self.reach >= 1 or not self.measured else 2 * CATCH_UP

    def catch_up_now(self, held: int) -> bool:
        """Whether the drafter is told a sequence's `held` untold plain steps this round: at the
        latest every `catch_up` of them, and once as exploring comes near (the exploring round
        then finds at most EXPLORE_LEAD to prefill). Once per round of the lead instead cost six
        catch-up rounds on the target's own core before each exploring round at batch 4."""
        return held >= self.catch_up or (self.explore_soon and held > EXPLORE_LEAD)

    def worth_following(self, left: int) -> bool:
        """Far from paying, whether a sequence with `left` tokens to go is worth the drafter
        following (its prompt prefilled, its plain steps scored): only if it lasts FOLLOW_CATCH_UPS
        more catch-ups. At batch 1, following each 128-token request at its first catch-up cost 5-7
        rounds on the target's own core for its prompt, to score 16-32 of its tokens."""
        return left >= FOLLOW_CATCH_UPS * self.catch_up

    # -- choosing ---------------------------------------------------------------------------------
    def choose(self, seq_ids: list[int], batch: int, wide_ok: bool, drafter_busy: bool = False,
               cold: bool = False, plain_only: bool = False) -> tuple[Option, Prediction | None]:
        """The option for this round's policy sequences (seq_ids, of `batch` in the round), and
        its prediction (None while trying an option nobody has measured). drafter_busy: the
        drafter has work before any drafting this round (new prompts, a catch-up). cold: the round
        will not be measured (it follows a pause): a kept plain step's other cores wait a round.
        plain_only: some of the sequences are not known to the drafter yet (a join deferred while
        far from paying): a plain step, and exploring waits."""
        self.measure = True
        if drafter_busy:   # a speculation would wait for that work (10-20 ms at batch 4 here)
            return PLAIN_NARROW, self.predict(PLAIN_NARROW, seq_ids, batch)
        self._count_round()
        explore, self.explore_next = self.explore_next, self.explore_credit >= 1
        self.explore_credit -= self.explore_next
        if self.hold > 0 and not explore and self.held.fits(wide_ok, batch, seq_ids):
            self.hold -= 1
            kept = self.held.option
            if not cold and self.rounds - self.refreshed >= self.refresh_every and (wide_ok or kept.wide):
                other, self.refreshed = (PLAIN_NARROW if kept.wide else PLAIN_WIDE), self.rounds
                return other, self.predict(other, seq_ids, batch)
            self.measure = self.hold % HELD_MEASURED == 0
            return kept, self.held.prediction
        self.hold, factor, self.ticks = 0, RATE_DECAY ** self.ticks, 0
        for rate in (*self.hits.values(), *self.seq_accept.values(), *self.seq_accept_fast.values()):
            rate.tick(factor)
        # only what needs no drafter: a plain step, or SD drafted by the n-gram guess (exploring waits
        # unless it leaves the drafter out anyway)
        if plain_only and self.explores_drafter:
            self.explore_next, explore = self.explore_next or explore, False
        lower_c = self._lower_c(seq_ids)
        allowed = lambda o: ((wide_ok or not o.wide) and not (plain_only and o.kind != "ar" and not o.lookup)
                             and (lower_c or o.kind != "ssd" or o.c == self.cs[0]))
        options = [o for o in self.options if allowed(o)]
        now = self._inputs(seq_ids, batch)
        if not self.measured:
            unmeasured = [o for o in self.first if self._predict(o, now) is None]
            for o in unmeasured:
                if o in options:
                    return o, None
            self.measured = not unmeasured
        # Plain steps are cheap to measure and their cost is what every other option is compared
        # with: at each batch size, both cores' are measured a few times before one is trusted.
        for o in (PLAIN_WIDE, PLAIN_NARROW):
            line = self.verify[o.wide].lines.get(batch)
            if o in options and (line is None or line.weight.get(1, 0.0) < PLAIN_SAMPLES):
                return o, self._predict(o, now)
        # Every option is scored every RERANK rounds and when exploring (costs change slowly), the
        # shortlist in the rounds between.
        shortlist = [o for o in self.shortlist if allowed(o)]
        ranked = explore or self.rerank or self.rounds % RERANK == 0 or not shortlist
        if ranked:
            shortlist, self.rerank = options, self.rerank and plain_only   # (news waits for a full ranking)
        else:       # a plain step is always a candidate (the shortlist may hold only wide ones)
            shortlist += [o for o in options if o.kind == "ar" and o not in shortlist]
        rates = [self._score(o, now) for o in shortlist]
        order = sorted(range(len(shortlist)), key=rates.__getitem__, reverse=True)
        ranked = ranked and not plain_only      # (every option, not those that need no drafter)
        if ranked:
            # the best few, and the best of each kind of work: the n-gram guess's options ranked
            # above the drafter's at low acceptance and kept them all off the shortlist, so a jump
            # in acceptance went unscored until the next full ranking
            self.shortlist = [options[i] for i in order[:SHORTLIST]]
            for work in ("sd", "ssd", "lookup"):
                best_of = next((options[i] for i in order if options[i].work == work), None)
                if best_of is not None and best_of not in self.shortlist:
                    self.shortlist.append(best_of)
        # Far from paying is judged at the acceptance speculation has had here lately (the global
        # rate), not at these sequences' own: a text's dip (acceptance swung 0.4-0.9 within the
        # dev prompts at batch 1) must not slow down noticing that it pays again. It moves slowly:
        # judged when every option is scored.
        if ranked:
            typical = {**now, **self._token_inputs(seq_ids, lambda i: self.global_acceptance(self._greedy(i)), now["cs"])}
            # whether the drafter is worth keeping ready: its options against the best without it
            # (a plain step, or SD drafted by the n-gram guess)
            plain = max((r for o, r in zip(options, rates) if o.kind == "ar" or o.lookup), default=0.0)
            self.reach = (max((self._score(o, typical) for o in options if o.kind != "ar" and not o.lookup), default=0.0)
                          / max(plain, 1e-9))
            self.far = self.measured and self.reach < FAR
            self.follows_one = self.measured and self.reach < 1
            # the n-gram guess's own reach, at its global acceptance against plain steps: far from
            # paying, plain steps score it less often (the decoder's GUESS_FAR): scoring one token
            # in three took ~0.35% of T = 0.7 runs, where it was chosen in 0-2% of the rounds
            guessing = {**now, "fast_tokens": self._tokens([self._fast_prior(i) for i in seq_ids])}
            steps = max((r for o, r in zip(options, rates) if o.kind == "ar"), default=0.0)
            self.guess_far = self.measured and max(
                (self._score(o, guessing) for o in options if o.lookup and o.wide), default=0.0) < FAR * steps
        best = self._neighbour(shortlist, rates, order[0], self.explores_drafter) if explore else order[0]
        # chosen by the rate it keeps up; predicted as this round will run, after the round before
        o = shortlist[best]
        if o.kind == "ar" and wide_ok and not explore:
            o = self._plain_cores(batch)
        raw = self._predict(o, now, cached=self.built)
        self.raw_tokens = raw.tokens if raw is not None and o.kind != "ar" else None
        # A speculating choice is scored every round: kept two rounds with its prediction (SPEC_HOLD,
        # tried at a653444), the policy chose SSD in 16% of the greedy batch-1 dev rounds instead of
        # 49%, and SSD fell from 1.07 to 0.99 of SD there
        if o.kind == "ar" and not explore:
            self._hold_plain(o, raw, wide_ok, batch, seq_ids, self._hold_rounds)
        return o, self._calibrated(o, raw)

    def steady(self, o: Option) -> int:
        """Rounds after this one (its choice o) in which `choose` would keep a plain step: the
        hold goes on, on the same cores, with no exploring near (`explore_soon` stays False). The
        decoder runs them on `keep` alone while its own round does not change (no join, leave,
        catch-up or answer to read): choosing and planning a kept round took ~45 us at batch 1,
        ~2% of the round, in T = 0.7 runs where AR won every round."""
        if self.held is None or o != self.held.option or self.explore_next:
            return 0
        refresh = math.ceil(self.refresh_every - (self.rounds - self.refreshed))   # the next on the other cores
        # ... and the first whose start finds exploring near (explore_soon; a round early, for rounding)
        exploring = int((1 - self.explore_credit) / self._explore_rate()) - EXPLORE_LEAD
        return max(0, min(self.hold, refresh - 1, exploring - 1))

    def keep(self) -> bool:
        """A round of the plain step kept (`steady`), counted as choose's kept path counts it.
        False: the hold ended (a measurement judged its cores anew, news of acceptance): choose."""
        if self.hold <= 0:
            return False
        self._count_round()
        self.hold -= 1
        self.measure = self.hold % HELD_MEASURED == 0
        return True

    def _count_round(self) -> None:
        self.rounds += 1
        self.ticks += 1
        self.explore_credit += self._explore_rate()

    def _hold_plain(self, o: Option, prediction: Prediction | None, wide_ok: bool, batch: int, seq_ids: list[int],
                    rounds: int) -> None:
        """Keep a plain step for `rounds` rounds unscored, and how often its other cores are tried."""
        self.held, self.hold = HeldChoice(o, prediction, wide_ok, batch, tuple(seq_ids)), rounds
        kept, other = self._plain_floor(o.wide, batch), self._plain_floor(not o.wide, batch)
        # the other cores are tried as rarely as the gap they would have to close to be chosen:
        # one core must also beat every core by NARROW_MARGIN
        gap = (other / kept - 1 if kept and other else 0.0) + (NARROW_MARGIN if o.wide else 0.0)
        self.refresh_every = max(16, (gap + SWITCH_BACK) / PLAIN_REFRESH)

    @property
    def _hold_rounds(self) -> int:
        """Rounds a plain choice is kept unscored: FAR_HOLD where the drafter and the n-gram guess are
        both far from paying, else HOLD (greedy text repeats in runs, and the guess's scores, told
        every 12 tokens, do not end a hold: one of FAR_HOLD would let most of a run go by)."""
        return FAR_HOLD if self.far and self.guess_far else HOLD

    def _plain_cores(self, batch: int) -> Option:
        """A plain step's cores while the drafter is idle: every core unless the target's own
        measured NARROW_MARGIN faster than every core, both lately (in the last PLAIN_FRESH rounds:
        the host's speed drifts), each judged by the least of its last measurements (a stall only
        ever adds time). Judged by their medians, like every other cost, with the one not kept
        measured once in (gap / PLAIN_REFRESH) rounds, the costs of a stall or a passing load stuck
        to every core for 80-150 rounds: greedy batch-4 held-out ran 81 of its 254 rounds on one
        core, 0.87 of AR, where one core is 1.2x slower."""
        if any(self.rounds - self.last_seen.get(o, -PLAIN_FRESH) > PLAIN_FRESH for o in (PLAIN_WIDE, PLAIN_NARROW)):
            return PLAIN_WIDE
        wide, narrow = self._plain_floor(True, batch), self._plain_floor(False, batch)
        return PLAIN_NARROW if wide and narrow and narrow * (1 + NARROW_MARGIN) < wide else PLAIN_WIDE

    def _plain_floor(self, wide: bool, batch: int) -> float | None:
        line = self.verify[wide].at(batch)
        return line.floor(1) if line is not None else None

    def _score(self, o: Option, now: dict) -> float:
        """What an option is ranked by: its predicted rate (-1 while not measured) over the rounds
        it is expected to be kept, its first round included, less MARGIN for speculating."""
        steady = self._calibrated(o, self._predict(o, now))
        if steady is None:
            return -1.0
        tokens, ms = steady.tokens, steady.ms
        if o.kind == "ssd" and not self.built:     # entering SSD: its first round drafts as SD
            first = self._calibrated(o, self._predict(o, now, cached=0))
            tokens, ms = first.tokens + (HORIZON - 1) * tokens, first.ms + (HORIZON - 1) * ms
        rate = tokens / max(ms, 1e-6)
        return rate if o.kind == "ar" else rate / (1 + MARGIN)

    def _neighbour(self, options: list[Option], rates: list[float], best: int, drafter: bool = True) -> int:
        """An option next to the best, the one measured longest ago: its kind with K +- 1, the other
        backup, fan-out budget or cores, or the best option of another kind on either cores with K at
        most one above the best's (so that a cost the machine's load once made look bad is measured
        again, by a round that costs little more than the best: a long speculation is reached a
        step at a time). drafter False: only options that need no drafter (explores_drafter), the
        n-gram guess's SD then a kind of its own."""
        b = options[best]
        reach = max(b.k, 1) + 1
        group = (lambda o: o.kind) if drafter else (lambda o: o.work)
        candidates = [(i, o) for i, o in enumerate(options) if drafter or o.kind == "ar" or o.lookup]
        top = {(kind, wide): max((i for i, o in candidates if (group(o), o.wide) == (kind, wide) and o.k <= reach),
                                 key=rates.__getitem__, default=None)
               for kind in ("ar", "sd", "ssd", "lookup") for wide in (True, False)}
        near = [i for i, o in candidates if i != best and (
            (o.kind == b.kind and abs(o.k - b.k) + (o.backup != b.backup) + (o.wide != b.wide) + (o.budget != b.budget)
             + (o.c != b.c) == 1)
            or i == top[group(o), o.wide])]
        # the one measured longest ago (ties at random): every neighbour is measured in turn
        return max(near, key=lambda i: (self.rounds - self.last_seen.get(options[i], -1), self.rng.random())) if near else best

    def predict(self, o: Option, seq_ids: list[int], batch: int) -> Prediction | None:
        """The speedup model (docs/design.md) with this machine's measured costs, for the
        sequences seq_ids in a round of `batch`; None until every cost it needs was measured."""
        now = self._inputs(seq_ids, batch) if o.kind != "ar" else self._plain_inputs(len(seq_ids), batch)
        return self._calibrated(o, self._predict(o, now))

    def _calibrated(self, o: Option, x: Prediction | None) -> Prediction | None:
        """A speculating option's predicted tokens scaled by what such rounds delivered of their
        predictions lately (between 0.5 and 1.2 of the model's)."""
        if x is None or o.kind == "ar":
            return x
        c = self.calibration[o.lookup].value(1.0, CALIBRATION_PRIOR)
        return Prediction(x.tokens * min(1.2, max(0.5, c)), x.ms)

    def _plain_inputs(self, n: int, batch: int) -> dict:
        """What a plain step's prediction reads: the verify and other-work lines at this batch size
        (a round whose drafter is busy predicts only that: the whole lookup took ~40 us there)."""
        return {"n": n, "verify": {w: c.at(batch) for w, c in self.verify.items()},
                "other": {kind: c.at(batch) for kind, c in self.other.items()}}

    def _inputs(self, seq_ids: list[int], batch: int) -> dict:
        """What one round's predictions read, looked up once: the cost lines at this batch size,
        and per K the expected tokens of these sequences, of the fast backup, and the hit rate."""
        ks = self.ks
        cs = self.cs if self._lower_c(seq_ids) else self.cs[:1]
        return {**self._plain_inputs(len(seq_ids), batch), "jit": self.jit.at(batch), "cs": cs,
                "build": {n: self._build_line(batch, n) for n in self.budgets},
                "miss": {x: c.at(batch) for x, c in self.miss.items()},
                **self._token_inputs(seq_ids, self.acceptance, cs),
                "hit": {(k, n, c): self.hit_rate(k, n, c) for k in ks for n in self.budgets for c in cs},
                "fast_tokens": self._tokens([self.fast_acceptance(i) for i in seq_ids])}

    def _lower_c(self, seq_ids: list[int]) -> bool:
        """Whether a C below the configured one is worth scoring: only where a sequence samples
        (greedy drafting ignores C), and not far from paying (SSD is not explored there; scoring
        its options at two C's took ~10 us more a choice at batch 4, T = 0.7)."""
        return len(self.cs) > 1 and not self.far and not all(self._greedy(i) for i in seq_ids)

    def _token_inputs(self, seq_ids: list[int], acceptance, cs: tuple[float, ...]) -> dict:
        """Per K, the expected tokens of the sequences at their acceptance (`tokens`, at the
        configured C), and at each lower C of cs (`tokens_c`): a sampled sequence's acceptance
        scaled by c_factor, a greedy one's as it is."""
        a = [acceptance(i) for i in seq_ids]
        out = {"tokens": self._tokens(a), "tokens_c": {}}
        for c in cs[1:]:
            f = self.c_factor(c)
            out["tokens_c"][c] = self._tokens([x if self._greedy(i) else min(x * f, 0.999) for i, x in zip(seq_ids, a)])
        return out

    def _build_line(self, batch: int, budget: int) -> Line | None:
        """The cache build's cost line for a fan-out budget; one never measured borrows the next
        larger budget's (fewer branches never cost more), a larger one waits to be measured."""
        for n in sorted(n for n in self.budgets if n >= budget):
            line = self.build[n].at(batch)
            if line is not None:
                return line
        return None

    def _tokens(self, a: list[float]) -> dict[int, float]:
        """Per K, the expected tokens of sequences with acceptance rates a: Σ_s E(a_s, K)."""
        return {k: sum(expected_tokens(x, k) for x in a) for k in self.ks}

    def _predict(self, o: Option, now: dict, cached: int | None = None) -> Prediction | None:
        """cached: the fan-out budget the round before pre-drafted with, 0 if it did not (None:
        the steady state of the option, SSD after SSD at its budget, SD after SD). The first SSD
        round after another kind has no cache to look in (its speculations are drafted as SD's);
        an SD round after an SSD round uses its hits."""
        verify, other = now["verify"][o.wide], now["other"][o.work]
        if verify is None or other is None:
            return None
        v, rest = verify.predict(o.k + 1), other.predict(0)
        if o.kind == "ar":
            return Prediction(tokens=float(now["n"]), ms=v + rest)
        if o.lookup:                  # the n-gram guess: no drafting to wait for
            return Prediction(now["fast_tokens"][o.k], v + rest)
        jit = now["jit"]
        if jit is None:
            return None
        if o.kind == "sd":
            waits = 1 - now["hit"][o.k, cached, self.cs[0]] ** now["n"] if cached else 1.0
            return Prediction(now["tokens"][o.k], waits * jit.predict(o.k) + v + rest)
        # a neural backup drafts K tokens as SD does; the n-gram backup costs next to nothing
        build, miss = now["build"][o.budget], now["miss"][o.backup] or (jit if o.backup == "neural" else None)
        if build is None:
            return None
        # drafted at its C (a neural backup too): the caches' and the backup's acceptance
        drafted = now["tokens"] if o.c == self.cs[0] else now["tokens_c"].get(o.c)
        if drafted is None:
            return None
        if cached == 0:
            return Prediction(drafted[o.k], jit.predict(o.k) + max(v, build.predict(o.k)) + rest)
        # (the hit rate of its C, though after a switch of C the caches looked in were built at the other)
        p = now["hit"].get((o.k, cached or o.budget, o.c))
        if p is None:               # (a lower C, asked of greedy sequences alone)
            return None
        missed = (drafted if o.backup == "neural" else now["fast_tokens"])[o.k]
        tokens = p * drafted[o.k] + (1 - p) * missed
        # a hit hides the build behind the verify; any miss in the batch makes the round wait for a backup
        wait = miss.predict(o.k) if miss is not None else 0.0
        return Prediction(tokens, max(v, build.predict(o.k)) + (1 - p ** now["n"]) * wait + rest)

    def global_acceptance(self, greedy: bool = True) -> float:
        """What speculation has had here lately in a sampling regime: its sequences' prior, and the
        far judgement's rate."""
        return self.accept[greedy].value(0.5, 2.0)

    def acceptance(self, seq_id: int) -> float:
        prior = self.global_acceptance(self._greedy(seq_id))
        rate = self.seq_accept.get(seq_id)
        return min(rate.value(prior, SEQ_PRIOR) if rate else prior, 0.999)

    def fast_acceptance(self, seq_id: int) -> float:
        """The n-gram guess's acceptance for a sequence: its own, with the global rate as prior."""
        prior = self._fast_prior(seq_id)
        rate = self.seq_accept_fast.get(seq_id)
        return min(rate.value(prior, SEQ_PRIOR) if rate else prior, 0.999)

    def _fast_prior(self, seq_id: int) -> float:
        """The n-gram guess's acceptance lately in a sequence's sampling regime."""
        return self.accept_fast[self._greedy(seq_id)].value(0.3)

    def hit_rate(self, k: int, budget: int, c: float) -> float:
        overall = 0.5                       # a budget not measured yet: the next larger one's rate
        for n in self.budgets:
            if n >= budget:
                overall = self.all_hits[n, self.cs[0]].value(overall, 2.0)
        if c != self.cs[0]:                 # a lower C not measured yet: the configured one's (it only raises hits)
            overall = self.all_hits[budget, c].value(overall, 2.0)
        rate = self.hits.get((k, budget, c))
        return rate.value(overall, 4.0) if rate else overall

    def c_factor(self, c: float) -> float:
        """Sampled sequences' acceptance at Saguaro C against the configured C's: what speculations
        drafted at each accepted lately (1 until a lower C is measured; lowering C moves the draft's
        mass off the tokens it likes best, which costs acceptance where the target likes them too)."""
        if c == self.cs[0]:
            return 1.0
        ref = self.accept_c[self.cs[0]].value(self.global_acceptance(False), 2.0)
        return min(1.5, max(0.2, self.accept_c[c].value(ref, 2.0) / max(ref, 1e-6)))

    # -- learning ---------------------------------------------------------------------------------
    def track(self, seq_id: int, greedy: bool) -> None:
        """A new sequence and its sampling regime (whose acceptance is its prior until its own is measured)."""
        self.greedy[seq_id] = greedy

    def _greedy(self, seq_id: int) -> bool:
        """A sequence's sampling regime (greedy when not tracked)."""
        return self.greedy.get(seq_id, True)

    def observe_accept(self, seq_id: int, accepted: int, drafted: int, source: str, shadow: bool = False,
                       c: float | None = None) -> None:
        """A verified speculation: `accepted` of its `drafted` tokens (a rejection ends it); shadow:
        `accepted` of `drafted` single-token guesses scored on plain steps (each its own trial).
        c: the Saguaro C the draft drew it with (Speculation.c)."""
        if drafted == 0:
            return
        rejected = drafted - accepted if shadow else int(accepted < drafted)
        trials = accepted + rejected
        greedy = self._greedy(seq_id)
        if source == "fast":
            self.accept_fast[greedy].observe(accepted, trials)
            self.seq_accept_fast.setdefault(seq_id, Rate()).observe(accepted, trials)
            return
        if not greedy and c in self.accept_c:
            self.accept_c[c].observe(accepted, trials)
            # a sequence's and the regime's rates are kept at the configured C (what c_factor scales)
            accepted = min(trials, accepted / self.c_factor(c))
        self.accept[greedy].observe(accepted, trials)
        self.seq_accept.setdefault(seq_id, Rate()).observe(accepted, trials)

    def observe_shadow(self, seq_id: int, accepted: float, scored: int) -> None:
        """The draft scored on `scored` tokens of plain target steps (Drafter._ingest): `accepted`
        is the sum of the probabilities that a speculation would have been accepted there. Plain
        steps measure acceptance too, so a text that starts to pay is noticed without exploring."""
        self.accept[self._greedy(seq_id)].observe(accepted, scored)
        self.seq_accept.setdefault(seq_id, Rate()).observe(accepted, scored)
        self.hold, self.rerank = 0, True

    def observe(self, r: RoundCosts) -> None:
        o, b = r.option, r.batch
        self.last_seen[o] = self.rounds
        if self.raw_tokens is not None and o.kind != "ar":
            self.calibration[o.lookup].observe(r.tokens, self.raw_tokens)
        self.raw_tokens = None
        if o.kind == "ssd" and r.build_ms > 0:
            # the drafter times its build; one that outlasted the verify is seen whole from here,
            # where the build started with the round (all hits: no drafting before it, whose time
            # the model counts as J or M, not as the build's)
            exposed = r.verify_ms + r.build_wait_ms if r.build_wait_ms > 0.1 and r.hits and not r.misses else 0.0
            self.build[o.budget].observe(b, o.k, max(r.build_ms, exposed))
        looked_up, looked_c = self.built, self.built_c   # the caches this round looked in: the round before's (ran)
        self.verify[o.wide].observe(b, r.tokens_per_seq, r.verify_ms)
        # drafting's wait, less a catch-up on plain steps that came first: counted in, every SD
        # round at that K was priced at a switch's cost (J at K = 2 read 6.4-8.8 ms against ~2 at
        # batch 1, after 16-64 plain steps), and SD was priced out where it won
        drafting = max(0.0, r.spec_wait_ms - r.catch_up_ms)
        if o.kind == "sd" and not o.lookup and not r.hits + r.misses:     # (after an SSD round the hits needed no drafting)
            self.jit.observe(b, o.k, drafting)
        if o.kind == "ssd":
            if r.hits + r.misses:
                key = (looked_up, looked_c) if looked_up else (o.budget, o.c)
                self.hits.setdefault((o.k, *key), Rate()).observe(r.hits, r.hits + r.misses)
                self.all_hits[key].observe(r.hits, r.hits + r.misses)
            if r.misses:
                self.miss[r.backup].observe(b, o.k, drafting)
            elif not r.hits:               # no cache to look in (the round before built none): drafted as SD
                self.jit.observe(b, o.k, drafting)
        rest = r.wall_ms - r.verify_ms - r.spec_wait_ms - r.build_wait_ms
        self.other[o.work].observe(b, 0, max(0.0, rest))
        # A kept plain step's cores are judged again whenever a plain step is measured (one round in
        # HELD_MEASURED of a hold, the other cores' refresh), so one stale floor is not kept for the
        # whole hold (16 rounds on one core at 1.3x per round); not every round: a round's bookkeeping
        # ran ~4x slower than alone, on caches the forward had just filled. Cores that changed
        # end the hold: the next round chooses them.
        if o.kind == "ar" and self.hold > 0 and self.held.wide_ok and self.held.batch == b and self.held.option != self._plain_cores(b):
            self.hold = 0

    def ran(self, o: Option) -> None:
        """A round of option o ran, measured or not: the next round looks in the caches it built."""
        self.built, self.built_c = (o.budget, o.c) if o.kind == "ssd" else (0, self.cs[0])

    def forget(self, seq_id: int) -> None:
        self.seq_accept.pop(seq_id, None)
        self.seq_accept_fast.pop(seq_id, None)
        self.greedy.pop(seq_id, None)
