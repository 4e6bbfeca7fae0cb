"""The round policy: before every round, the option with the highest predicted tokens per second
among a plain target step (AR), SD with K and SSD with K (docs/design.md, "The round policy").

The prediction is the speedup model ("The speedup model") fed with what this machine and these
sequences show online: the target's verify time against tokens, batch and cores; the drafter's
JIT drafting, cache-build and backup times; acceptance per sequence (decaying, with the global rate
as its prior) and the cache hit rate per K. Options nobody has measured yet are tried first; after
that one round in EXPLORE goes to a neighbour of the best (K +- 1, the best of each other kind),
so estimates stay fresh and a change in the text (a repetitive span) is noticed.

The policy chooses; it never touches tokens: every round verifies what it speculated with the q it
was drawn from, so the output does not depend on the choice.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from saguaro.fanout import expected_tokens

EXPLORE = 1 / 24          # share of rounds that try a neighbour of the best option
DECAY = 0.97              # per observation of a cost, per round of a rate: a horizon of ~30
SEQ_PRIOR = 4.0           # weight of the global acceptance rate in a sequence's own estimate


@dataclass(frozen=True)
class Option:
    kind: str                 # ar | sd | ssd
    k: int                    # draft tokens verified (0 for ar)
    wide: bool                # the target's forward may use every core (the drafter is idle during it)

    @property
    def label(self) -> str:
        return f"{self.kind}{self.k or ''}{'' if self.kind == 'ssd' else ('/wide' if self.wide else '/narrow')}"


@dataclass
class Prediction:
    tokens: float             # emitted by the round's policy sequences together
    ms: float                 # the round's wall time

    @property
    def tokens_per_s(self) -> float:
        return 1000.0 * self.tokens / self.ms if self.ms > 0 else 0.0


class Rate:
    """A success rate that forgets with every round (`tick`), observed or not: evidence from long
    ago fades towards the prior, so a rate the policy stopped measuring gets tried again."""

    def __init__(self):
        self.successes = self.trials = 0.0

    def observe(self, successes: float, trials: float) -> None:
        self.successes += successes
        self.trials += trials

    def tick(self) -> None:
        self.successes *= DECAY
        self.trials *= DECAY

    def value(self, prior: float, weight: float = 1.0) -> float:
        return (self.successes + prior * weight) / (self.trials + weight)


class Line:
    """A decaying least-squares line y = a + b x (b >= 0: a cost never falls with more work); a
    constant until two different x have been seen."""

    def __init__(self):
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0

    def observe(self, x: float, y: float) -> None:
        d = DECAY
        self.w, self.sx, self.sy = self.w * d + 1, self.sx * d + x, self.sy * d + y
        self.sxx, self.sxy = self.sxx * d + x * x, self.sxy * d + x * y

    def predict(self, x: float) -> float:
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        slope = max(0.0, (self.sxy / self.w - mx * my) / var) if var > 1e-6 else 0.0
        return max(0.0, my + slope * (x - mx))


class Costs:
    """Measured ms of one kind of work, a Line over its size per batch size; a batch never seen
    borrows the nearest one's."""

    def __init__(self):
        self.lines: dict[int, Line] = {}

    def observe(self, batch: int, x: float, ms: float) -> None:
        self.lines.setdefault(batch, Line()).observe(x, ms)

    def predict(self, batch: int, x: float) -> float | None:
        if not self.lines:
            return None
        nearest = min(self.lines, key=lambda b: (abs(b - batch), b))
        return self.lines[nearest].predict(x)


@dataclass
class RoundCosts:
    """What a finished round measured, for the policy (times in ms)."""
    option: Option
    batch: int                # the policy's sequences in the round
    tokens_per_seq: int       # the widest verify: pending token + K
    verify_ms: float
    spec_wait_ms: float       # waited before the forward: SD drafting, backups after misses
    build_wait_ms: float      # waited after the forward for the next caches
    build_ms: float           # the drafter's cache build that ran during the previous round
    wall_ms: float
    hits: int
    misses: int
    backup: str


class RoundPolicy:
    def __init__(self, max_k: int, default_k: int, seed: int = 0):
        ks = range(1, max_k + 1)
        self.options = ([Option("ar", 0, w) for w in (True, False)] + [Option("sd", k, w) for k in ks for w in (True, False)]
                        + [Option("ssd", k, False) for k in ks])
        self.first = [Option("ssd", default_k, False), Option("sd", default_k, True), Option("ar", 0, True),
                      Option("ar", 0, False), Option("sd", default_k, False)]   # tried first, in this order
        self.verify = {True: Costs(), False: Costs()}     # by wide
        self.jit, self.build, self.miss = Costs(), Costs(), Costs()   # by K
        self.other: dict[str, Costs] = {"ar": Costs(), "sd": Costs(), "ssd": Costs()}   # wall minus the above
        self.accept, self.accept_fast = Rate(), Rate()
        self.seq_accept: dict[int, Rate] = {}
        self.hits: dict[int, Rate] = {}                    # by K
        self.all_hits = Rate()
        self.backup = "neural"
        self.last_build: tuple[int, int, float] | None = None   # (batch, K, ms seen) of the build now running
        self.rng = random.Random(seed)

    # -- choosing ---------------------------------------------------------------------------------
    def choose(self, seq_ids: list[int], batch: int, wide_ok: bool) -> tuple[Option, Prediction | None]:
        """The option for this round's policy sequences (seq_ids, of `batch` in the round), and
        its prediction (None while trying an option nobody has measured)."""
        for rate in (self.accept, self.accept_fast, self.all_hits, *self.hits.values(), *self.seq_accept.values()):
            rate.tick()
        options = [o for o in self.options if wide_ok or not o.wide]
        for o in self.first:
            if o in options and self.predict(o, seq_ids, batch) is None:
                return o, None
        scored = {o: self.predict(o, seq_ids, batch) for o in options}
        best = max(options, key=lambda o: scored[o].tokens_per_s)
        if self.rng.random() < EXPLORE:
            near = [o for o in options if o != best and (
                (o.kind == best.kind and abs(o.k - best.k) == 1 and o.wide == best.wide)
                or o == max((x for x in options if x.kind == o.kind), key=lambda x: scored[x].tokens_per_s))]
            best = self.rng.choice(near) if near else best
        return best, scored[best]

    def predict(self, o: Option, seq_ids: list[int], batch: int) -> Prediction | None:
        """The speedup model (docs/design.md) with this machine's measured costs; None until
        every cost it needs has been measured once."""
        b = batch
        verify = self.verify[o.wide].predict(b, o.k + 1)
        other = self.other[o.kind].predict(b, 0)
        if verify is None or other is None:
            return None
        if o.kind == "ar":
            return Prediction(tokens=float(len(seq_ids)), ms=verify + other)
        a = [self.acceptance(i) for i in seq_ids]
        if o.kind == "sd":
            jit = self.jit.predict(b, o.k)
            return None if jit is None else Prediction(sum(expected_tokens(x, o.k) for x in a), jit + verify + other)
        build, miss = self.build.predict(b, o.k), self.miss.predict(b, o.k)
        if build is None or miss is None:
            return None
        p = self.hit_rate(o.k)
        a_miss = [self.accept_fast.value(0.3)] * len(a) if self.backup == "fast" else a
        tokens = sum(p * expected_tokens(x, o.k) + (1 - p) * expected_tokens(y, o.k) for x, y in zip(a, a_miss))
        # a hit hides the build behind the verify; any miss in the batch makes the round wait for a backup
        return Prediction(tokens, max(verify, build) + (1 - p ** len(a)) * miss + other)

    def acceptance(self, seq_id: int) -> float:
        prior = self.accept.value(0.5, 2.0)
        rate = self.seq_accept.get(seq_id)
        return min(rate.value(prior, SEQ_PRIOR) if rate else prior, 0.999)

    def hit_rate(self, k: int) -> float:
        overall = self.all_hits.value(0.5, 2.0)
        rate = self.hits.get(k)
        return rate.value(overall, 4.0) if rate else overall

    # -- learning ---------------------------------------------------------------------------------
    def observe_accept(self, seq_id: int, accepted: int, drafted: int, source: str) -> None:
        """A verified speculation: `accepted` of its `drafted` tokens (a rejection ends it)."""
        if drafted == 0:
            return
        rejected = int(accepted < drafted)
        if source == "fast":
            self.accept_fast.observe(accepted, accepted + rejected)
            return
        self.accept.observe(accepted, accepted + rejected)
        self.seq_accept.setdefault(seq_id, Rate()).observe(accepted, accepted + rejected)

    def observe(self, r: RoundCosts) -> None:
        o, b = r.option, r.batch
        if r.build_ms > 0 and self.last_build is not None:
            # the drafter times its build; one that outlasted the verify is seen whole from here
            batch, k, exposed = self.last_build
            self.build.observe(batch, k, max(r.build_ms, exposed))
        exposed = r.verify_ms + r.build_wait_ms if r.build_wait_ms > 0.1 else 0.0
        self.last_build = (b, o.k, exposed) if o.kind == "ssd" else None
        self.verify[o.wide].observe(b, r.tokens_per_seq, r.verify_ms)
        if o.kind == "sd":
            self.jit.observe(b, o.k, r.spec_wait_ms)
        if o.kind == "ssd":
            if r.hits + r.misses:
                self.hits.setdefault(o.k, Rate()).observe(r.hits, r.hits + r.misses)
                self.all_hits.observe(r.hits, r.hits + r.misses)
            if r.misses:
                self.backup = r.backup
            if r.misses or not r.hits:     # a backup (or a first speculation) was waited for
                self.miss.observe(b, o.k, r.spec_wait_ms)
        rest = r.wall_ms - r.verify_ms - r.spec_wait_ms - r.build_wait_ms
        self.other[o.kind].observe(b, 0, max(0.0, rest))

    def forget(self, seq_id: int) -> None:
        self.seq_accept.pop(seq_id, None)
