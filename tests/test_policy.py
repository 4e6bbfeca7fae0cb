"""The round policy (docs/design.md, "The round policy") against a simulated machine whose costs and
acceptance are known: it learns the costs, settles on the fastest option, predicts that option's
rate, keeps exploring, and notices when speculation starts or stops paying."""
from __future__ import annotations

import copy
import random
import statistics
from collections import Counter

import pytest

import saguaro.policy as policy_module
from saguaro.fanout import expected_tokens
from saguaro.policy import CATCH_UP, CATCH_UP_FAR, EXPLORE, FAR_HOLD, EXPLORE_LEAD, FAR_EXPLORE, RECENT, Costs, Rate, Line, Option, RoundCosts, RoundPolicy


def test_line_fits_and_extrapolates_upwards_only():
    line = Line()
    for x in (1, 2, 3, 4) * 5:
        line.observe(x, 2.0 + 0.5 * x)
    assert line.predict(6) == pytest.approx(5.0)
    flat = Line()
    flat.observe(3, 4.0)
    assert flat.predict(1) == flat.predict(6) == 4.0          # one size seen: a constant
    falling = Line()
    for x, y in ((1, 3.0), (2, 2.0)) * 3:
        falling.observe(x, y)
    assert falling.predict(5) == pytest.approx(2.5, rel=0.02)  # never cheaper with more work


def test_a_measured_size_predicts_its_own_cost_and_drafting_scales_with_k():
    verify = Line()
    for x, y in ((1, 7.1), (2, 10.0), (3, 11.6), (4, 13.4)) * 5:   # this host's forward: not linear in tokens
        verify.observe(x, y)
    assert verify.predict(1) == pytest.approx(7.1) and verify.predict(3) == pytest.approx(11.6)
    assert verify.predict(6) > verify.predict(4)                       # an unmeasured size: the line
    drafting = Line(proportional=True)
    drafting.observe(3, 6.0)
    assert drafting.predict(6) == pytest.approx(12.0)                  # not what K = 3 cost
    assert Line().predict(6) == 0.0 and Costs(proportional=True).predict(1, 2) is None


def test_one_stalled_round_does_not_make_a_size_look_dear():
    """A stall only ever adds time: a size's cost is the least of its first measurements, then the
    median of its last RECENT, so one slow round (a GC pause, the OS) is outvoted at once, and a
    load that lasts is believed after RECENT // 2 + 1 rounds."""
    line = Line()
    line.observe(2, 0.5)
    line.observe(2, 4.5)                           # a stalled round
    assert line.predict(2) == 0.5
    line.observe(2, 0.4)
    assert line.predict(2) == 0.5                  # the median of 0.5, 4.5, 0.4
    for _ in range(RECENT // 2 + 1):
        line.observe(2, 3.0)                       # slower for good
    assert line.predict(2) == 3.0


def test_a_size_measured_during_a_stall_is_capped_by_what_more_work_cost():
    """A cost never falls with more work: what a larger size measured caps a smaller one's, so one
    stalled measurement at a size measured once (a 2-token verify at 14 ms beside 2.7 for 3
    tokens) does not price it out until exploring measures it again; unmeasured sizes likewise."""
    verify = Line(proportional=True)
    for x, y in ((1, 1.65), (3, 2.69)) * 3:
        verify.observe(x, y)
    verify.observe(2, 14.09)
    assert verify.predict(2) == pytest.approx(2.69)
    assert verify.predict(1) == pytest.approx(1.65)      # below what 3 tokens cost: its own
    jit = Line(proportional=True)
    jit.observe(1, 1.0)
    jit.observe(4, 2.0)
    assert jit.predict(3) <= 2.0 and jit.predict(6) >= 2.0


def test_a_catch_up_before_drafting_is_not_priced_as_drafting():
    """A switch back to speculating after plain steps waits for the drafter to catch up on them
    first (Drafter.step reports it as catch_up_ms): a switch's cost, not one of drafting K tokens,
    which every SD round at that K would otherwise be priced at."""
    p = RoundPolicy(max_k=4, default_k=2)
    sd = Option("sd", 2, True)
    for catch_up in (7.0, 0.0, 6.0):
        p.observe(RoundCosts(option=sd, batch=1, tokens_per_seq=3, verify_ms=2.5, spec_wait_ms=2.0 + catch_up,
                             build_wait_ms=0.0, build_ms=0.0, wall_ms=4.7 + catch_up, hits=0, misses=0, backup="",
                             catch_up_ms=catch_up))
    assert p.jit.predict(1, 2) == pytest.approx(2.0)
    assert p.other["sd"].predict(1, 0) == pytest.approx(0.2)


def test_costs_borrow_the_nearest_batch():
    c = Costs()
    assert c.predict(1, 1) is None
    c.observe(1, 1, 2.0)
    c.observe(8, 1, 9.0)
    assert c.predict(2, 1) == 2.0 and c.predict(6, 1) == 9.0


class Machine:
    """Round costs of a 2-core host like this one (ms) for a batch of sequences: acceptance a per
    draft token (a_fast for the n-gram backup's), cache hit rate p per sequence; drafted at a Saguaro
    C below 1, hits c_hit times as many and acceptance c_accept times as high."""

    def __init__(self, a: float, p: float = 0.7, draft_step: float = 0.8, a_fast: float = 0.1, seed: int = 0,
                 wide_speedup: float = 1.5, build_scale: float = 1.0, c_hit: float = 1.0, c_accept: float = 1.0):
        self.a, self.p, self.draft_step, self.a_fast = a, p, draft_step, a_fast
        self.c_hit, self.c_accept = c_hit, c_accept
        self.build_scale = build_scale     # of the cache build's cost (at fan-out budget 8)
        self.rng = random.Random(seed)
        self.load = 1.0               # slowdown of forwards on every core (another process on the host)
        self.wide_speedup = wide_speedup   # a forward on every core against one on the target's own
        self.held: dict[int, list[bool]] = {}   # plain steps' tokens the draft would have guessed, untold
        self.built = 8                # the fan-out budget of the last build (the caches a round looks in)
        self.built_c = 1.0            # ... and its C

    def verify(self, o: Option, b: int) -> float:
        one_core = (2.4 + 0.35 * o.k) * (1 + 0.15 * (b - 1))
        return one_core / self.wide_speedup * self.load if o.wide else one_core

    def build(self, k: int, b: int, budget: int = 8) -> float:
        """A build of fewer branches costs less, though not in proportion (per-call overheads)."""
        return (0.5 + 0.9 * k) * (1 + 0.2 * (b - 1)) * self.build_scale * (0.5 + budget / 16)

    def hit(self, budget: int, c: float = 1.0) -> float:
        """The hit rate: p at fan-out budget 8, fewer outcomes covered with fewer branches."""
        return min(0.99, self.p * (1 - 0.25 * (8 - budget) / 4) * (self.c_hit if c < 1 else 1.0))

    def accept(self, c: float) -> float:
        return min(0.99, self.a * (self.c_accept if c < 1 else 1.0))

    def jit(self, k: int, b: int) -> float:
        return 0.2 + self.draft_step * k * (1 + 0.1 * (b - 1))

    def miss_wait(self, o: Option, b: int) -> float:
        return self.jit(o.k, b) if o.backup == "neural" else 0.05

    def expected_rate(self, o: Option, b: int = 1) -> float:
        """tokens/s of an option over many rounds (the model, with the machine's true numbers)."""
        e, other = expected_tokens(self.accept(o.c), o.k), 0.3
        if o.kind == "ar":
            return 1000 * b / (self.verify(o, b) + other)
        if o.lookup:
            return 1000 * b * expected_tokens(self.a_fast, o.k) / (self.verify(o, b) + other)
        if o.kind == "sd":
            return 1000 * b * e / (self.jit(o.k, b) + self.verify(o, b) + other)
        e_miss = e if o.backup == "neural" else expected_tokens(self.a_fast, o.k)
        p = self.hit(o.budget, o.c)
        ms = max(self.verify(o, b), self.build(o.k, b, o.budget)) + (1 - p ** b) * self.miss_wait(o, b) + other
        return 1000 * b * (p * e + (1 - p) * e_miss) / ms

    def shadow(self, policy: RoundPolicy, o: Option, b: int) -> None:
        """Plain steps score the draft at the decoder's catch-ups (before an exploring round, at
        the latest every policy.catch_up steps, and when speculation resumes): Drafter._ingest."""
        for seq_id in range(b):
            held = self.held.setdefault(seq_id, [])
            if o.kind == "ar":
                held.append(self.rng.random() < self.a)
            if held and (o.kind != "ar" or policy.catch_up_now(len(held))):
                policy.observe_shadow(seq_id, sum(held), len(held))
                held.clear()

    def run(self, policy: RoundPolicy, o: Option, b: int = 1) -> None:
        """One round of option o for sequences 0..b-1; tells the policy what it saw."""
        hits = [o.kind == "ssd" and self.rng.random() < self.hit(self.built, self.built_c) for _ in range(b)]
        tokens = 0
        self.shadow(policy, o, b)
        for seq_id, hit in enumerate(hits):
            fast = (o.kind == "ssd" and not hit and o.backup == "fast") or o.lookup
            c = self.built_c if hit else o.c          # a hit was drafted by the build before, at its C
            a = self.a_fast if fast else self.accept(c)
            accepted = 0
            while accepted < o.k and self.rng.random() < a:
                accepted += 1
            policy.observe_accept(seq_id, accepted, o.k, "fast" if fast else "neural", c=1.0 if fast else c)
            tokens += accepted + 1
        misses = b - sum(hits) if o.kind == "ssd" else 0
        spec_wait = {"ar": 0.0, "sd": 0.0 if o.lookup else self.jit(o.k, b), "ssd": self.miss_wait(o, b) if misses else 0.0}[o.kind]
        verify = self.verify(o, b)
        build = self.build(o.k, b, o.budget) if o.kind == "ssd" else 0.0
        self.built = o.budget or self.built
        self.built_c = o.c if o.kind == "ssd" else self.built_c
        build_wait = max(0.0, build - verify)
        policy.observe(RoundCosts(option=o, batch=b, tokens_per_seq=o.k + 1, verify_ms=verify, spec_wait_ms=spec_wait,
                                  build_wait_ms=build_wait, build_ms=build, wall_ms=spec_wait + verify + build_wait + 0.3,
                                  hits=sum(hits), misses=misses, backup=o.backup, tokens=tokens))
        policy.ran(o)


def drive(policy: RoundPolicy, machine: Machine, rounds: int, b: int = 1) -> Counter:
    chosen: Counter = Counter()
    for _ in range(rounds):
        o, _ = policy.choose(list(range(b)), b, wide_ok=True)
        chosen[o] += 1
        machine.run(policy, o, b)
    return chosen


@pytest.mark.parametrize("a,p", [(0.05, 0.5), (0.6, 0.8), (0.9, 0.9)])
def test_policy_settles_on_the_fastest_option_and_predicts_its_rate(a, p):
    machine, policy = Machine(a, p), RoundPolicy(max_k=6, default_k=3)
    drive(policy, machine, 400)
    chosen = drive(policy, machine, 400)
    favourite = chosen.most_common(1)[0][0]
    best_rate = max(machine.expected_rate(o) for o in policy.options)
    assert machine.expected_rate(favourite) >= 0.95 * best_rate, (favourite, chosen)
    assert achieved(machine, chosen) >= 0.93 * best_rate, chosen     # exploring included
    # its prediction, averaged over the rounds of a run (as the bench compares it), is the rate
    predicted = []
    for _ in range(200):
        predicted.append(policy.predict(favourite, [0], 1).tokens_per_s)
        machine.run(policy, policy.choose([0], 1, wide_ok=True)[0])
    assert statistics.fmean(predicted) == pytest.approx(machine.expected_rate(favourite), rel=0.1)


def test_low_acceptance_means_plain_target_steps_on_every_core():
    policy = RoundPolicy(max_k=6, default_k=3)
    chosen = drive(policy, Machine(a=0.02), 600)
    assert chosen.most_common(1)[0][0] == Option("ar", 0, True)


def achieved(machine: Machine, chosen: Counter) -> float:
    """The tokens/s the chosen options keep up on the machine, in the proportions chosen."""
    rounds = sum(chosen.values())
    return rounds / sum(n / machine.expected_rate(o) for o, n in chosen.items())


def test_policy_keeps_exploring_cheaply():
    policy = RoundPolicy(max_k=6, default_k=3)
    machine = Machine(a=0.6)
    drive(policy, machine, 300)
    chosen = drive(policy, machine, 2000)
    others = 2000 - chosen.most_common(1)[0][1]
    assert others >= 0.5 * EXPLORE * 2000 and len(chosen) >= 5, chosen   # it keeps trying others
    best_rate = max(machine.expected_rate(o) for o in policy.options)
    assert achieved(machine, chosen) >= 0.97 * best_rate, chosen       # and that costs < 3%


def test_exploring_rounds_are_evenly_spaced_and_announced_ahead():
    """One round in 1 / rate explores, never several in a clump (a seeded random draw put 3 of a
    batch-4 run's 256 rounds at 1/384), and explore_soon says so EXPLORE_LEAD rounds ahead: the
    decoder starts the drafter's catch-up then, on its own core, instead of waiting for it; once,
    not in every round of the lead. (Near paying: far from it exploring leaves the drafter out.)"""
    policy, machine = RoundPolicy(max_k=4, default_k=2), Machine(a=0.75, a_fast=0.0)
    drive(policy, machine, 300)
    assert not policy.far and policy.explores_drafter
    explored, soon, caught, held, rounds = [], [], [], 0, 3600
    for i in range(rounds):
        soon.append(policy.explore_soon)
        held += 1                                   # as the decoder counts a sequence's untold plain steps
        if policy.catch_up_now(held):
            caught.append(i)
            held = 0
        if policy.explore_next:
            explored.append(i)
        o, _ = policy.choose([0], 1, wide_ok=True)
        machine.run(policy, o)
    every = 1 / EXPLORE
    gaps = [b - a for a, b in zip(explored, explored[1:])]
    assert len(explored) >= 4 and all(abs(gap - every) <= 1 for gap in gaps), explored
    assert all(all(soon[i - EXPLORE_LEAD: i + 1]) for i in explored if i >= EXPLORE_LEAD)
    assert sum(soon) <= len(explored) * (EXPLORE_LEAD + 2)      # and not otherwise
    # one catch-up in each lead (the exploring round finds at most EXPLORE_LEAD steps untold), and
    # between leads one every catch_up steps
    for i in explored:
        assert len([c for c in caught if i - EXPLORE_LEAD <= c <= i]) == 1, (i, caught)
    assert len(caught) <= len(explored) + rounds // policy.catch_up + 1, caught


@pytest.mark.parametrize("plain_only", [False, True])
def test_far_from_paying_exploring_leaves_the_drafter_out(plain_only):
    """Far from paying, exploring rounds try only what needs no drafter (a plain step's other cores,
    SD drafted by the n-gram guess), evenly spaced at the far rate, also in rounds with sequences
    the drafter does not know (plain_only), and announce nothing: the decoder tells the drafter
    only every catch_up steps. Served at T = 0.7 exploring the drafter there cost 0.4% of the wall
    time, and a catch-up of every sequence before each such round."""
    policy, machine = RoundPolicy(max_k=4, default_k=2), Machine(a=0.02)
    drive(policy, machine, 300)
    assert policy.far and not policy.explores_drafter
    explored, rounds = [], 3600
    for i in range(rounds):
        assert not policy.explore_soon and not policy.catch_up_now(EXPLORE_LEAD + 1)
        if policy.explore_next:
            explored.append(i)
        o, _ = policy.choose([0], 1, wide_ok=True, plain_only=plain_only)
        if explored and explored[-1] == i:
            explored[-1] = (i, o)
        machine.run(policy, o)
    every = 1 / (EXPLORE * FAR_EXPLORE)
    assert len(explored) >= rounds // every - 1, explored
    assert all(abs(b[0] - a[0] - every) <= 1 for a, b in zip(explored, explored[1:])), explored
    assert all(o.kind == "ar" or o.lookup for _, o in explored), explored
    assert any(o.lookup for _, o in explored), explored
    # once it pays again (noticed by plain steps' shadow acceptance), its options are explored as before
    machine.a = 0.95
    drive(policy, machine, 2 * CATCH_UP_FAR)
    kinds = Counter(o.kind for o in drive(policy, machine, 400).elements())
    assert kinds["sd"] + kinds["ssd"] > kinds["ar"] and not policy.far and policy.explores_drafter, kinds


def test_policy_notices_when_speculation_starts_and_stops_paying():
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.05)
    drive(policy, machine, 300)
    assert drive(policy, machine, 100).most_common(1)[0][0].kind == "ar"
    machine.a = 0.95                          # a long quoted span: the draft guesses it all
    drive(policy, machine, 150)
    assert drive(policy, machine, 100).most_common(1)[0][0].kind != "ar"
    machine.a = 0.05
    drive(policy, machine, 150)
    assert drive(policy, machine, 100).most_common(1)[0][0].kind == "ar"


def test_plain_steps_measure_acceptance_so_speculation_resumes_without_exploring(monkeypatch):
    """The catch-ups of plain steps score the draft (shadow acceptance): with exploring switched
    off, a text that starts to pay is still noticed, within a catch-up or two. Far from paying,
    catch-ups come every CATCH_UP_FAR plain steps, and the noticing takes that much longer."""
    monkeypatch.setattr(policy_module, "EXPLORE", 0.0)
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.05)
    drive(policy, machine, 300)
    assert set(drive(policy, machine, 100)) <= {Option("ar", 0, True), Option("ar", 0, False)}
    assert policy.far and policy.catch_up == CATCH_UP_FAR
    machine.a = 0.95
    drive(policy, machine, 2 * CATCH_UP_FAR)
    assert drive(policy, machine, 100).most_common(1)[0][0].kind != "ar"
    assert not policy.far and policy.catch_up == CATCH_UP


def test_a_dip_in_one_texts_acceptance_is_not_far_from_paying():
    """Far from paying is judged at the acceptance speculation has had here lately, so a sequence
    whose own rate dips takes plain steps but keeps catch-ups and exploring at their usual pace."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.85, p=0.9)
    drive(policy, machine, 300)
    assert not policy.far
    policy.seq_accept[0] = Rate()
    policy.seq_accept[0].observe(0.0, 20.0)                   # this text: the draft guesses nothing
    chosen = Counter(policy.choose([0], 1, wide_ok=True)[0].kind for _ in range(10))
    assert chosen["ar"] >= 9 and not policy.far and policy.catch_up == CATCH_UP


@pytest.mark.parametrize("a,draft_step,far,follows_one", [(0.05, 0.8, True, True), (0.65, 0.8, False, True),
                                                            (0.8, 0.5, False, False)])
def test_the_drafter_follows_one_sequence_wherever_its_speculation_does_not_pay(a, draft_step, far, follows_one):
    """Far from paying, or near but not paying, the decoder's drafter follows one sequence (joins
    deferred): served greedy at concurrency 4 and 8, where AR won nearly every round with the drafter
    near paying, every join's draft prefill and every sequence's catch-ups had put ~11% of the rounds
    on the target's own core. Where its speculation pays at the acceptance it has had, it follows all."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=a, draft_step=draft_step, a_fast=0.0)
    drive(policy, machine, 600)
    assert (policy.far, policy.follows_one) == (far, follows_one), policy.reach


def test_a_round_where_the_drafter_works_first_is_a_plain_step_on_the_targets_cores():
    """New prompts' draft prefill or a catch-up runs in this round: a speculation would wait for
    it, so even where speculating pays the round is a plain step, and it is not one of the
    policy's rounds (nothing ticks, nothing is explored)."""
    policy, machine = RoundPolicy(max_k=4, default_k=3), Machine(a=0.9)
    drive(policy, machine, 300)
    assert drive(policy, machine, 50).most_common(1)[0][0].kind != "ar"
    rounds = policy.rounds
    o, predicted = policy.choose([0], 1, wide_ok=False, drafter_busy=True)
    assert o == Option("ar", 0, False) and predicted is not None and policy.rounds == rounds


def test_unmeasured_options_are_tried_first_and_wide_only_when_allowed():
    policy = RoundPolicy(max_k=4, default_k=3)
    machine = Machine(a=0.5)
    tried = []
    while True:
        o, predicted = policy.choose([0], 1, wide_ok=True)
        if predicted is not None:
            break
        tried.append(o)
        machine.run(policy, o)
    # SD on either cores (SSD's backup and first speculation cost what SD's drafting does), SSD
    # once (its build is reported with its cache keys, in the same round), SD drafted by the n-gram
    # guess (no drafting: its verify and own work), AR on every core
    assert tried == [Option("sd", 3, True), Option("sd", 3, False), Option("ssd", 3, False, "neural", 8),
                     Option("sd", 3, True, "fast"), Option("ar", 0, True)]
    assert all(policy.predict(o, [0], 1) is not None for o in policy.options)
    for _ in range(50):
        o, _ = policy.choose([0], 1, wide_ok=False)
        assert not o.wide
        machine.run(policy, o)


def test_acceptance_is_per_sequence_with_the_global_rate_as_prior():
    policy = RoundPolicy(max_k=4, default_k=3)
    for _ in range(50):
        policy.observe_accept(1, 4, 4, "neural")     # all accepted
        policy.observe_accept(2, 0, 4, "neural")     # first token rejected
    assert policy.acceptance(1) > 0.85 and policy.acceptance(2) < 0.15
    # a new sequence starts from the global rate per draft token: 200 of 250 accepted
    assert policy.acceptance(3) == pytest.approx(0.8, abs=0.01)
    policy.forget(1)
    assert policy.acceptance(1) == policy.acceptance(3)


def test_the_backup_rule_falls_out_of_the_model():
    """Neural backup for one sequence, the n-gram backup for many: with b sequences a round avoids
    the neural backup's wait only when all b hit (p^b), while the fast one costs tokens, not time."""
    machine = Machine(a=0.9, p=0.8, draft_step=0.5, a_fast=0.2)   # neural wins 1.06x at b=1, fast 1.11x at b=12
    for b, want in ((1, "neural"), (12, "fast")):
        ssd = [o for o in RoundPolicy(max_k=6, default_k=3).options if o.kind == "ssd"]
        best = max(ssd, key=lambda o: machine.expected_rate(o, b))
        assert best.backup == want, (b, best)           # the machine is set up so the rule matters
        policy = RoundPolicy(max_k=6, default_k=3)
        policy.options = ssd + [Option("sd", 3, True)]  # SSD, and SD to measure the drafting a neural backup does
        policy.first = [Option("sd", 3, True), Option("ssd", 3, False, "neural", 8), Option("ssd", 3, False, "fast", 8)]
        drive(policy, machine, 600, b)
        seqs = list(range(b))
        chosen = max(ssd, key=lambda o: policy.predict(o, seqs, b).tokens_per_s)
        assert chosen.backup == want, (b, chosen)


def test_the_fan_out_budget_falls_out_of_the_model():
    """The configured budget where its build hides behind the verify (more branches, more hits),
    half of it where the build would outlast the verify (fewer hits, no wait)."""
    for build_scale, want in ((1.0, 8), (2.5, 4)):
        machine = Machine(a=0.9, p=0.8, build_scale=build_scale)
        ssd = [o for o in RoundPolicy(max_k=4, default_k=3, budgets=(8, 4)).options if o.kind == "ssd"]
        best = max(ssd, key=machine.expected_rate)
        assert best.budget == want, (build_scale, best)     # the machine is set up so the budget matters
        policy = RoundPolicy(max_k=4, default_k=3, budgets=(8, 4))
        policy.options = ssd + [Option("sd", 1, False)]     # and SD, to measure drafting
        policy.first[:2] = [Option("sd", 1, False)] * 2
        drive(policy, machine, 800)
        chosen = drive(policy, machine, 400)
        assert achieved(machine, chosen) >= 0.93 * machine.expected_rate(best), chosen
        ranked = max(ssd, key=lambda o: policy.predict(o, [0], 1).tokens_per_s)
        assert ranked.budget == want, (build_scale, ranked)


@pytest.mark.parametrize("c_hit,c_accept,want", [(1.8, 0.95, 0.5), (1.05, 0.7, 1.0)])
def test_saguaro_c_is_lowered_where_the_model_predicts_it_pays(c_hit, c_accept, want):
    """Sampled sequences: C = 0.5 where it raises hits more than it costs acceptance, C = 1 where
    it does not; learnt from the hit rates and acceptance that each C's speculations measured (a
    hit's by the C its build drew with). Greedy sequences never get a lower C: it changes nothing
    there."""
    machine = Machine(a=0.75, p=0.4, c_hit=c_hit, c_accept=c_accept)
    ssd = [o for o in RoundPolicy(max_k=4, default_k=3, cs=(1.0, 0.5)).options if o.kind == "ssd"]
    assert {o.c for o in ssd} == {1.0, 0.5}
    best = max(ssd, key=lambda o: machine.expected_rate(o, 4))
    assert best.c == want, best                     # the machine is set up so that C matters
    policy = RoundPolicy(max_k=4, default_k=3, cs=(1.0, 0.5))
    for seq_id in range(4):
        policy.track(seq_id, greedy=False)
    policy.options = ssd + [Option("sd", 1, False)]     # and SD, to measure drafting
    policy.first[:2] = [Option("sd", 1, False)] * 2
    drive(policy, machine, 1500, b=4)
    chosen = drive(policy, machine, 600, b=4)
    rate = lambda o: machine.expected_rate(o, 4)
    assert rounds_where(chosen, lambda o: o.c == want) >= 0.8, chosen
    assert 600 / sum(n / rate(o) for o, n in chosen.items()) >= 0.93 * rate(best), chosen
    ranked = max(ssd, key=lambda o: policy.predict(o, [0, 1, 2, 3], 4).tokens_per_s)
    assert ranked.c == want, ranked
    assert policy.accept_c[0.5].trials > 0 and (c_accept < 0.9) == (policy.c_factor(0.5) < 0.9)   # measured, not assumed
    # the same machine, greedy sequences: no lower C is tried
    greedy = RoundPolicy(max_k=4, default_k=3, cs=(1.0, 0.5))
    greedy.options, greedy.first[:2] = list(policy.options), [Option("sd", 1, False)] * 2
    assert all(o.c == 1.0 for o in drive(greedy, Machine(a=0.75, p=0.4, c_hit=c_hit, c_accept=c_accept), 1500, b=4))


def rounds_where(chosen: Counter, match) -> float:
    """The share of the rounds whose option matches."""
    return sum(n for o, n in chosen.items() if match(o)) / sum(chosen.values())


def test_a_batch_that_ran_only_plain_steps_takes_a_wider_verify_to_cost_that_many_plain_steps():
    """Until a batch size has measured a verify wider than a plain step, n tokens are taken to cost
    n plain steps: never for free (a constant), nor read off another batch's per-row cost (batch 1's
    few rows cost little more than one; a 4-token verify at batch 4 costs 2.2x a plain step). Only
    exploring then tries a speculation there, and its measurement gives the batch its own slope."""
    policy = RoundPolicy(max_k=4, default_k=2)
    machine = Machine(a=0.6)
    drive(policy, machine, 200, b=1)
    assert policy.verify[True].predict(1, 3) < 2 * policy.verify[True].predict(1, 1)
    drive(policy, machine, 6, b=4)                      # its plain steps, measured first
    plain = policy.verify[True].predict(4, 1)
    assert policy.verify[True].predict(4, 3) == pytest.approx(3 * plain)


def test_a_cost_the_load_made_stale_is_measured_again():
    """Another process slows forwards on every core 3x for a while: the policy moves to the target's
    own core, and back once the load is gone."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.05)
    drive(policy, machine, 300)
    assert drive(policy, machine, 100).most_common(1)[0][0] == Option("ar", 0, True)
    machine.load = 3.0
    drive(policy, machine, 100)
    assert drive(policy, machine, 100).most_common(1)[0][0] == Option("ar", 0, False)
    machine.load = 1.0
    drive(policy, machine, 1200)      # 100-950 rounds over 12 seeds: the neighbour measured longest ago is tried
    assert drive(policy, machine, 100).most_common(1)[0][0] == Option("ar", 0, True)


def test_two_stalled_rounds_on_every_core_do_not_move_plain_steps_to_one_core():
    """A plain step on every core that stalls twice running (7.6 and 5.1 ms against 3.3, batch 4
    here), scored again right after (a catch-up's news), still beats the target's own core: the
    cores are judged by their least recent cost, not the median the stalls made, which kept the
    target on one core for the rest of a run; a lasting load still moves them (the test above)."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.05)
    drive(policy, machine, 300, b=4)
    assert drive(policy, machine, 50, b=4).most_common(1)[0][0] == Option("ar", 0, True)
    machine.load = 2.5
    stalled = drive(policy, machine, 2, b=4)
    machine.load = 1.0
    assert stalled == Counter({Option("ar", 0, True): 2})
    for seq_id in range(4):         # a catch-up's news: the plain choice is scored again at once
        policy.observe_shadow(seq_id, 1.0, 16)
    assert drive(policy, machine, 200, b=4)[Option("ar", 0, False)] <= 200 * 0.02


def test_a_kept_plain_steps_rounds_are_measured_one_in_a_few():
    """Measuring a round cost ~19 us at batch 1 (1% of a round); a plain step kept unscored is
    measured one round in HELD_MEASURED, every other choice each round."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.05, a_fast=0.0)
    drive(policy, machine, 300)
    assert policy.far and policy.guess_far          # plain steps kept FAR_HOLD rounds at a time
    measured = []
    for _ in range(96):
        o, _ = policy.choose([0], 1, wide_ok=True)
        measured.append(policy.measure)
        machine.run(policy, o)
    assert 96 / policy_module.HELD_MEASURED <= sum(measured) <= 96 * (1 / policy_module.HELD_MEASURED + 1 / FAR_HOLD) + 2


@pytest.mark.parametrize("a_fast,share", [(0.0, 0.8), (0.3, 0.5)])   # the n-gram guess far from paying, or not
def test_the_rounds_steady_grants_are_kept_as_choose_keeps_them(a_fast, share):
    """The decoder runs the rounds `steady` grants after a kept plain step on `keep` alone (choosing
    and planning one took ~45 us at batch 1): choose would have kept the same step in each, with
    no exploring near as each starts, and keep counts them as choose does."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.3, a_fast=a_fast)
    drive(policy, machine, 300)
    granted = rounds = 0
    while rounds < 3000:
        o, _ = policy.choose([0], 1, wide_ok=True)
        n = policy.steady(o)
        twin = copy.deepcopy(policy)
        for _ in range(n):
            assert not twin.explore_soon
            assert twin.choose([0], 1, wide_ok=True)[0] == o and policy.keep()
            assert [getattr(policy, f) for f in COUNTED] == [getattr(twin, f) for f in COUNTED]
        for _ in range(n + 1):
            machine.run(policy, o)
        granted, rounds = granted + n, rounds + n + 1
    assert granted >= rounds * share, (granted, rounds)


COUNTED = ("rounds", "ticks", "explore_credit", "explore_next", "hold", "measure", "refreshed", "held")


def test_rounds_that_cannot_use_every_core_measure_what_they_can():
    """A batch that always holds a sequence pinned to SSD never allows the target every core: the
    policy measures and chooses among the options on the target's own threads."""
    policy, machine = RoundPolicy(max_k=4, default_k=3), Machine(a=0.3)
    for _ in range(200):
        o, _ = policy.choose([0], 1, wide_ok=False)
        assert not o.wide
        machine.run(policy, o)
    assert policy.predict(Option("ar", 0, False), [0], 1) is not None


def test_catch_ups_come_less_often_the_further_speculation_is_from_paying():
    """Every CATCH_UP plain steps while speculation at the acceptance it has had here would pay (or
    nothing is measured yet), twice that below it, CATCH_UP_FAR far from paying: a catch-up costs a
    round or two on the target's own core whatever its length."""
    policy = RoundPolicy(max_k=4, default_k=2)
    assert policy.catch_up == CATCH_UP                          # nothing measured yet
    policy.measured = True
    for reach, far, every in ((1.1, False, CATCH_UP), (0.95, False, 2 * CATCH_UP), (0.5, True, CATCH_UP_FAR)):
        policy.reach, policy.far = reach, far
        assert policy.catch_up == every, reach


def test_a_refresh_of_the_other_cores_waits_for_a_round_that_is_measured():
    """A round after a pause is not measured (caches others used): the policy puts no refresh of a
    kept plain step's other cores on it, or the refresh could keep landing on the first round of
    the benchmark's turns and never be measured."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.02)
    drive(policy, machine, 300)
    narrow = {False: 0, True: 0}
    for cold in (True, False):
        for _ in range(400):          # the other cores, 1.5x slower, are due once in ~200 rounds
            o, _ = policy.choose([0], 1, wide_ok=True, cold=cold)
            narrow[cold] += o == Option("ar", 0, False)
            machine.run(policy, o)
    assert narrow[True] == 0 and narrow[False] >= 1, narrow


def test_a_kept_plain_steps_cores_are_judged_when_a_measurement_came_in(monkeypatch):
    """Judging them took 12 us a round in the decoder's loop: they are judged again after a plain
    step was measured (one round in HELD_MEASURED), not in every round of the hold."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.02)
    drive(policy, machine, 300)
    judged = []
    cores = policy._plain_cores
    monkeypatch.setattr(policy, "_plain_cores", lambda b: judged.append(policy.rounds) or cores(b))
    for _ in range(400):
        o, _ = policy.choose([0], 1, wide_ok=True)
        if not policy.measure:                    # as the decoder does: the round is not observed
            policy.observe = lambda r: None
        machine.run(policy, o)
        policy.__dict__.pop("observe", None)
    assert 400 / policy_module.HELD_MEASURED / 2 <= len(judged) <= 400 * 0.4, len(judged)


def test_where_one_core_is_nearly_as_fast_it_is_tried_rarely():
    """At batch 1 here every core was 5-13% faster than one and the other cores' refresh came every
    ~17 rounds; each cost its own round and the round after it (back on every core: 7-16% more).
    Counting that round, one core is tried once in ~50 rounds."""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.02, wide_speedup=1.05)
    drive(policy, machine, 300)
    chosen = drive(policy, machine, 500)
    assert chosen[Option("ar", 0, True)] >= 480 and chosen[Option("ar", 0, False)] <= 500 / 40, chosen


def test_a_host_whose_speed_drifts_keeps_plain_steps_on_every_core():
    """This host's speed moves by up to 25% within seconds. Where every core is only ~10% faster than
    one (batch 1 here), floors from a slow stretch of every core against a fast one of one core put
    10-17% of the rounds on one core, each 5-20% slower: one core must now win by NARROW_MARGIN (a
    load on the other core), and is tried as rarely as that gap is large."""

    class Drifting(Machine):
        def verify(self, o: Option, b: int) -> float:
            return super().verify(o, b) * self.rng.uniform(0.8, 1.25)

    for seed in range(4):
        policy, machine = RoundPolicy(max_k=6, default_k=3), Drifting(a=0.02, wide_speedup=1.1, seed=seed)
        drive(policy, machine, 300)
        chosen = drive(policy, machine, 1000)
        assert chosen[Option("ar", 0, False)] <= 1000 * 0.01, (seed, chosen)


def test_a_new_sequence_starts_from_what_its_sampling_regime_accepted():
    """Greedy requests accepted ~0.6 of draft tokens here, T = 0.7 ones ~0.3: a sampled sequence
    that joins after greedy ones is priced at what sampled sequences accepted, not at the greedy
    rate (one served run speculated at acceptance 0.29 right after a greedy sweep); the n-gram
    guess's too (greedy text repeats itself, sampled text rarely: the first T = 0.7 point after a
    served greedy sweep drafted 179-377 tokens, 0.91 of AR)."""
    policy = RoundPolicy(max_k=4, default_k=2)
    policy.track(1, greedy=True)
    policy.track(2, greedy=False)
    for _ in range(100):
        for source in ("neural", "fast"):
            policy.observe_accept(1, 4, 4, source)       # greedy: every draft token accepted
            policy.observe_accept(2, 0, 4, source)       # sampled: the first rejected
    policy.track(3, greedy=False)
    policy.track(4, greedy=True)
    assert policy.acceptance(3) < 0.1 < 0.9 < policy.acceptance(4)
    assert policy.fast_acceptance(3) < 0.1 < 0.9 < policy.fast_acceptance(4)
    policy.forget(3)
    assert 3 not in policy.greedy


def test_where_the_n_gram_guess_pays_sd_is_drafted_by_it_on_every_core():
    """Text that repeats itself (an n-gram guess accepted at 0.7) while the draft guesses little:
    SD drafted by the decoder's n-gram guess, on every core (the drafter takes no part), and the
    drafter is not kept ready for it (far from paying is judged by the drafter's options)."""
    machine, policy = Machine(a=0.05, a_fast=0.7), RoundPolicy(max_k=6, default_k=3)
    best = max(policy.options, key=machine.expected_rate)
    assert best.lookup and best.wide, best
    drive(policy, machine, 400)
    chosen = drive(policy, machine, 400)
    favourite = chosen.most_common(1)[0][0]
    assert favourite.lookup and favourite.wide, chosen
    assert achieved(machine, chosen) >= 0.93 * machine.expected_rate(best), chosen
    assert policy.far


@pytest.mark.parametrize("a_fast,far", [(0.0, True), (0.1, False)])
def test_the_n_gram_guess_is_judged_far_from_paying_by_its_own_reach(a_fast, far):
    """Where SD drafted by the guess would lose to a plain step by more than FAR at the guess's
    global acceptance, the policy says so (the decoder's plain steps then score it less often).
    A plain choice is kept FAR_HOLD rounds only where the drafter and the guess are both far from
    paying: the guess's scores come in every few tokens, and text repeats in runs. (At 0.1 the
    guess's SD is within FAR of a plain step on this machine, and still loses to it.)"""
    policy, machine = RoundPolicy(max_k=6, default_k=3), Machine(a=0.02, a_fast=a_fast)
    rng, held = random.Random(1), []
    for i in range(700):
        before = policy.hold
        o, _ = policy.choose([0], 1, wide_ok=True)
        machine.run(policy, o)
        if i % 4 == 0:                              # the decoder's plain steps score the guess
            policy.observe_accept(0, sum(rng.random() < a_fast for _ in range(4)), 4, "fast", shadow=True)
        if i >= 600 and policy.hold > before:
            held.append(policy.hold)
    assert policy.far and policy.guess_far == far
    assert held and set(held) == {FAR_HOLD if far else policy_module.HOLD}, held


def test_the_n_gram_guess_is_judged_per_sequence():
    policy = RoundPolicy(max_k=4, default_k=3)
    for _ in range(50):
        policy.observe_accept(1, 4, 4, "fast")       # a sequence that repeats itself
        policy.observe_accept(2, 0, 4, "fast")
    assert policy.fast_acceptance(1) > 0.85 and policy.fast_acceptance(2) < 0.15
    assert policy.fast_acceptance(3) == pytest.approx(0.8, abs=0.01)      # the global rate, as prior
    assert policy.acceptance(1) == policy.acceptance(3)                   # the draft's is another matter
    policy.forget(1)
    assert policy.fast_acceptance(1) == policy.fast_acceptance(3)


def test_rounds_with_sequences_the_drafter_does_not_know_may_still_speculate_by_the_n_gram_guess():
    """plain_only (a join deferred far from paying: the drafter does not know every sequence): no
    option that needs the drafter, but SD drafted by the n-gram guess needs none."""
    machine, policy = Machine(a=0.05, a_fast=0.7), RoundPolicy(max_k=6, default_k=3)
    drive(policy, machine, 400)
    chosen = Counter()
    for _ in range(100):
        o, _ = policy.choose([0], 1, wide_ok=True, plain_only=True)
        chosen[o] += 1
        machine.run(policy, o)
    assert all(o.kind == "ar" or o.lookup for o in chosen), chosen
    assert sum(n for o, n in chosen.items() if o.lookup) >= 80, chosen
