"""The round policy (docs/design.md, "The round policy") against a simulated machine whose costs and
acceptance are known: it learns the costs, settles on the fastest option, predicts that option's
rate, keeps exploring, and notices when speculation starts or stops paying."""
from __future__ import annotations

import random
from collections import Counter

import pytest

from saguaro.fanout import expected_tokens
from saguaro.policy import EXPLORE, Costs, Line, Option, RoundCosts, RoundPolicy


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
    assert falling.predict(5) == pytest.approx(2.5, rel=0.01)  # never cheaper with more work


def test_costs_borrow_the_nearest_batch():
    c = Costs()
    assert c.predict(1, 1) is None
    c.observe(1, 1, 2.0)
    c.observe(8, 1, 9.0)
    assert c.predict(2, 1) == 2.0 and c.predict(6, 1) == 9.0


class Machine:
    """Round costs of a 2-core host like this one (ms), acceptance a per draft token, hit rate p."""

    def __init__(self, a: float, p: float = 0.7, draft_step: float = 0.8, seed: int = 0):
        self.a, self.p, self.draft_step = a, p, draft_step
        self.rng = random.Random(seed)

    def verify(self, o: Option) -> float:
        one_core = 2.4 + 0.35 * o.k
        return one_core / 1.5 if o.wide else one_core

    def build(self, k: int) -> float:
        return 0.5 + 0.9 * k

    def expected_rate(self, o: Option) -> float:
        """tokens/s of an option over many rounds (the model, with the machine's true numbers)."""
        e = expected_tokens(self.a, o.k)
        other = 0.3
        if o.kind == "ar":
            return 1000 / (self.verify(o) + other)
        if o.kind == "sd":
            return 1000 * e / (0.2 + self.draft_step * o.k + self.verify(o) + other)
        ms = max(self.verify(o), self.build(o.k)) + (1 - self.p) * (0.2 + self.draft_step * o.k) + other
        return 1000 * e / ms

    def run(self, policy: RoundPolicy, o: Option, seq_id: int = 0) -> RoundCosts:
        """One round of option o for one sequence; tells the policy what it saw."""
        accepted = 0
        while accepted < o.k and self.rng.random() < self.a:
            accepted += 1
        policy.observe_accept(seq_id, accepted, o.k, "neural")
        hit = o.kind == "ssd" and self.rng.random() < self.p
        spec_wait = {"ar": 0.0, "sd": 0.2 + self.draft_step * o.k,
                     "ssd": 0.0 if hit else 0.2 + self.draft_step * o.k}[o.kind]
        verify = self.verify(o)
        build_wait = max(0.0, self.build(o.k) - verify) if o.kind == "ssd" else 0.0
        r = RoundCosts(option=o, batch=1, tokens_per_seq=o.k + 1, verify_ms=verify, spec_wait_ms=spec_wait,
                       build_wait_ms=build_wait, build_ms=self.build(o.k) if o.kind == "ssd" else 0.0,
                       wall_ms=spec_wait + verify + build_wait + 0.3, hits=int(hit), misses=int(o.kind == "ssd" and not hit),
                       backup="neural")
        policy.observe(r)
        return r


def drive(policy: RoundPolicy, machine: Machine, rounds: int) -> Counter:
    chosen: Counter = Counter()
    for _ in range(rounds):
        o, _ = policy.choose([0], 1, wide_ok=True)
        chosen[o] += 1
        machine.run(policy, o)
    return chosen


@pytest.mark.parametrize("a,p", [(0.05, 0.5), (0.6, 0.8), (0.9, 0.9)])
def test_policy_settles_on_the_fastest_option_and_predicts_its_rate(a, p):
    machine, policy = Machine(a, p), RoundPolicy(max_k=6, default_k=3)
    drive(policy, machine, 400)
    chosen = drive(policy, machine, 400)
    favourite = chosen.most_common(1)[0][0]
    best_rate = max(machine.expected_rate(o) for o in policy.options)
    assert machine.expected_rate(favourite) >= 0.95 * best_rate, (favourite, chosen)
    near_best = sum(n for o, n in chosen.items() if machine.expected_rate(o) >= 0.95 * best_rate)
    assert near_best >= 0.8 * 400, chosen
    predicted = policy.predict(favourite, [0], 1).tokens_per_s
    assert predicted == pytest.approx(machine.expected_rate(favourite), rel=0.1)


def test_low_acceptance_means_plain_target_steps_on_every_core():
    policy = RoundPolicy(max_k=6, default_k=3)
    chosen = drive(policy, Machine(a=0.02), 600)
    assert chosen.most_common(1)[0][0] == Option("ar", 0, True)


def test_policy_keeps_exploring_a_small_share():
    policy = RoundPolicy(max_k=6, default_k=3)
    machine = Machine(a=0.6)
    drive(policy, machine, 300)
    chosen = drive(policy, machine, 2000)
    others = 2000 - chosen.most_common(1)[0][1]
    assert 0.3 * EXPLORE * 2000 <= others <= 3 * EXPLORE * 2000, chosen
    assert len(chosen) >= 3


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
    # SSD twice (its build is reported with the next round), then SD and AR on every core
    assert tried == [Option("ssd", 3, False)] * 2 + [Option("sd", 3, True), Option("ar", 0, True)]
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
    assert policy.acceptance(1) > 0.85 > 0.15 > policy.acceptance(2)
    # a new sequence starts from the global rate per draft token: 200 of 250 accepted
    assert policy.acceptance(3) == pytest.approx(0.8, abs=0.01)
    policy.forget(1)
    assert policy.acceptance(1) == policy.acceptance(3)
