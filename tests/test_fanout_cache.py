"""Fan-out (docs/design.md, "Fan-out"), its online fit, the backup rule b* ("Backups"), the n-gram backup, and the
speculation cache on constructed cases with the real demo draft (hits, misses, each backup)."""
from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from saguaro.backup import matched_prefix, ngram_lookup, ngram_proposal
from saguaro.config import DEMO_DRAFT, EngineConfig, SamplingParams, SpecConfig
from saguaro.draft import CATCH_UP_LAG, SHADOW_ROWS, DraftRound, Drafter, Join, Outcome
from saguaro.engines.torch_engine import TorchEngine
from saguaro.errors import DraftFailure
from saguaro.fanout import FanoutFit, backup_threshold, expected_tokens, geometric_fanout, uniform_fanout
from saguaro.sampling import probs


# -- fan-out ----------------------------------------------------------------------------------------
CASES = list(itertools.product([1, 2, 5, 12, 16, 24, 64, 200], [1, 2, 4, 7, 8], [0.05, 0.3, 0.6, 0.8, 0.95, 0.999],
                               [0.1, 0.5, 0.8, 1.5, 3.0]))


def test_geometric_fanout_sums_to_budget_and_decreases():
    for b, k, a, r in CASES:
        f = geometric_fanout(b, k, a, r)
        assert len(f) == k + 1, (b, k, a, r)
        assert sum(f) == b, (b, k, a, r, f)
        assert all(x >= 0 and isinstance(x, int) for x in f), (b, k, a, r, f)
        assert all(f[j] >= f[j + 1] for j in range(k - 1)), f"not non-increasing for k<K: {(b, k, a, r)} -> {f}"


def test_geometric_fanout_follows_the_formula():
    # F_k = F_0 a^(k/(1+r)) for k < K; F_K = F_0 a^(K/(1+r)) (1-a)^(-1/(1+r)); rounding moves each by < 1
    for b, k, a, r in [(24, 7, 0.7, 0.8), (16, 4, 0.5, 1.0), (64, 3, 0.9, 0.5), (200, 8, 0.8, 2.0)]:
        w = [a ** (j / (1 + r)) for j in range(k)] + [a ** (k / (1 + r)) * (1 - a) ** (-1 / (1 + r))]
        exact = [b * x / sum(w) for x in w]
        f = geometric_fanout(b, k, a, r)
        assert all(abs(x - y) < 1 for x, y in zip(f, exact)), (f, exact)
    # a worked case: a = 0.5, r = 1, K = 2: weights 1, 0.5^0.5, 0.5 * 0.5^-0.5 = 1, .7071, .7071
    # -> 12 * (0.4142, 0.2929, 0.2929) = 4.97, 3.51, 3.51 -> 5, 4, 3 or 5, 3, 4 (sum 12)
    f = geometric_fanout(12, 2, 0.5, 1.0)
    assert f[0] == 5 and sorted(f[1:]) == [3, 4]


def test_uniform_fanout_sums_to_budget():
    for b, k in itertools.product(range(1, 70), range(1, 9)):
        f = uniform_fanout(b, k)
        assert sum(f) == b and len(f) == k + 1 and max(f) - min(f) <= 1, (b, k, f)
    assert uniform_fanout(24, 7) == [3] * 8


def _capped_geometric(a: float, k: int, rng: random.Random) -> int:
    n = 0
    while n < k and rng.random() < a:
        n += 1
    return n


@pytest.mark.parametrize("a_true,k", [(0.3, 4), (0.7, 4), (0.85, 7)])
def test_fanout_fit_estimates_acceptance(a_true, k):
    rng = random.Random(7)
    exact = FanoutFit(decay=1.0)      # no forgetting: the MLE over every round
    online = FanoutFit()              # the default exponential forgetting
    for _ in range(4000):
        n = _capped_geometric(a_true, k, rng)
        exact.observe_accept(n, k)
        online.observe_accept(n, k)
    assert abs(exact.a - a_true) < 0.02, exact.a
    assert abs(online.a - a_true) < 0.07, online.a
    assert FanoutFit(a=0.42).a == 0.42     # fixed value wins


@pytest.mark.parametrize("r_true", [0.4, 0.8, 1.6])
def test_fanout_fit_estimates_power_law(r_true):
    rng = random.Random(11)
    exact, online = FanoutFit(decay=1.0), FanoutFit()
    assert exact.r == 0.8                 # prior until there is evidence
    for _ in range(6000):
        f = rng.choice([1, 2, 3, 4, 6, 8])
        hit = rng.random() < 1 - f ** -r_true
        exact.observe_cache(f, hit)
        online.observe_cache(f, hit)
    assert abs(exact.r - r_true) <= 0.1, exact.r
    assert abs(online.r - r_true) <= 0.35, online.r
    assert FanoutFit(r=1.3).r == 1.3
    # the fit drives the fan-out it returns
    assert exact.fanout(16, 4, "geometric") == geometric_fanout(16, 4, exact.a, exact.r)
    assert exact.fanout(16, 4, "uniform") == uniform_fanout(16, 4)


def test_expected_tokens():
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)        # 1 + .5 + .25
    assert expected_tokens(1.0, 4) == 5


# -- b* rule (docs/design.md, "Backups") -----------------------------------------------------------
def test_backup_threshold_on_known_numbers():
    # p_hit = 0.9, E_hit = 3, E_miss,neural = 3, E_miss,fast = 1.2
    # A_n = .9*3 + .1*3 = 3.0 ; A_f = .9*3 + .1*1.2 = 2.82 ; delta = 0.18
    # T_p = 0.5 -> m = 1 ; T_n = 0.5, T_f = 0 -> G = 2.82*1.5 - 3.0*1 = 1.23
    # b* = ln(1.23 / 1.41) / ln(0.9) = -0.136576 / -0.105361 = 1.29627
    assert backup_threshold(0.9, 3.0, 2.82, 0.5, 0.5, 0.0) == pytest.approx(1.29627, abs=1e-4)
    # same, but drafting slower than a verify: m = T_p = 2 -> b* = ln(1.23 / 1.59) / ln(.9) = -0.256720 / -0.105361 = 2.43658
    assert backup_threshold(0.9, 3.0, 2.82, 2.0, 0.5, 0.0) == pytest.approx(2.43658, abs=1e-4)
    # p_hit = 0.95, A_n = 4.0, A_f = 3.8 (delta .2), T_n = 1.0, T_f = 0.1, T_p = 0.8 (m = 1)
    # G = 3.8*2 - 4*1.1 = 3.2 ; b* = ln(3.2/3.4) / ln(.95) = -0.0606246 / -0.0512933 = 1.18192
    assert backup_threshold(0.95, 4.0, 3.8, 0.8, 1.0, 0.1) == pytest.approx(1.18192, abs=1e-4)
    # a slower neural backup (a longer stall per miss) hands the batch to fast sooner: b* shrinks
    assert backup_threshold(0.9, 3.0, 2.82, 0.5, 2.0, 0.0) < backup_threshold(0.9, 3.0, 2.82, 0.5, 0.5, 0.0)


def test_backup_threshold_extremes():
    # neural backup costs no more than fast and yields more tokens: neural always (G <= 0, delta > 0)
    assert backup_threshold(0.8, 3.0, 2.5, 0.5, 0.0, 0.0) == math.inf
    # fast yields as many tokens and is cheaper: fast always (delta <= 0, G > 0)
    assert backup_threshold(0.8, 2.5, 2.5, 0.5, 1.0, 0.0) == 0.0
    assert backup_threshold(0.8, 2.0, 2.5, 0.5, 1.0, 0.0) == 0.0
    # fast yields more and costs no more (G <= 0, delta < 0): fast always
    assert backup_threshold(0.8, 2.0, 2.5, 0.5, 0.0, 0.5) == 0.0
    # never a hit: one round is a miss for everyone: neural iff A_n/(1+T_n) > A_f/(1+T_f); here 3/1.5 < 2.82
    assert backup_threshold(0.0, 3.0, 2.82, 0.5, 0.5, 0.0) == 0.0
    # always a hit: the backup never runs, neural's extra tokens win
    assert backup_threshold(1.0, 3.0, 2.82, 0.5, 0.5, 0.0) == math.inf


# -- n-gram backup ---------------------------------------------------------------------------------
def _lookup_reference(history: list[int], k: int, max_n: int = 3) -> list[int]:
    """ngram_lookup as first written, a scan over the history's token lists."""
    for n in range(min(max_n, len(history) - 1), 0, -1):
        suffix = history[-n:]
        for start in range(len(history) - n - 1, -1, -1):
            if history[start:start + n] == suffix:
                return history[start + n:start + n + k]
    return []


def test_ngram_lookup_searches_bytes_as_the_scan_did():
    """The byte search finds what the token scan found; a match across token boundaries is none."""
    rng = random.Random(0)
    for _ in range(3000):
        vocab = rng.choice([3, 20, 300, 70000])
        history = [rng.randrange(vocab) for _ in range(rng.randint(1, 60))]
        k = rng.randint(1, 6)
        assert ngram_lookup(history, k) == _lookup_reference(history, k), history
    # 65536, 0 is 00 00 01 00 00 00 00 00 (little-endian words): 1's bytes at offset 2, no token
    assert ngram_lookup([65536, 0, 5, 1], 2) == _lookup_reference([65536, 0, 5, 1], 2) == []


def test_ngram_proposal():
    # longest earlier match of the last 3/2/1 tokens wins over a more recent shorter one
    assert ngram_proposal([3, 1, 2, 9, 1, 2, 8, 3, 1, 2], 2, {}) == [9, 1]
    # n = 2: [1, 2] occurred at 0 -> what followed it
    assert ngram_proposal([1, 2, 3, 1, 2], 3, {}) == [3, 1, 2]
    # most recent occurrence of the 1-gram [1] (the one followed by 8, not by 9)
    assert ngram_proposal([1, 9, 1, 8, 1], 2, {}) == [8, 1]
    # a match too short for K is continued with the draft's remembered top-1 successors
    assert ngram_proposal([1, 2, 3, 1, 2], 5, {2: 7, 7: 9}) == [3, 1, 2, 7, 9]
    # no match: top-1 chain from the last token; unknown tokens repeat
    assert ngram_proposal([5, 6, 7], 3, {7: 4, 4: 4}) == [4, 4, 4]
    assert ngram_proposal([5, 6, 7], 2, {}) == [7, 7]
    assert ngram_proposal([5], 2, {5: 6}) == [6, 6]
    # always exactly K tokens
    for k in range(1, 6):
        assert len(ngram_proposal([1, 2, 1, 2, 1, 2, 1], k, {})) == k
    assert matched_prefix([4, 5, 6], [4, 5, 9, 1]) == 2
    assert matched_prefix([4, 5], [4, 5, 6]) == 2
    assert matched_prefix([1], [2]) == 0


# -- the speculation cache on the real demo draft -----------------------------------------------------
PROMPT = [307, 1105, 58, 19, 4006, 12, 880, 41, 9, 311, 77, 5]


@pytest.fixture(scope="module")
def draft_engine():
    torch.set_num_threads(1)
    return TorchEngine(EngineConfig(checkpoint=str(DEMO_DRAFT), dtype="float32", max_slots=24, max_seq_len=128,
                                    max_draft_len=8, max_branches=32, threads=1), branches=True)


def _drafter(engine, backup: str, k: int = 3, budget: int = 8) -> Drafter:
    for s in range(engine.max_slots):
        engine.release(s)
    return Drafter(engine, SpecConfig(k=k, budget=budget, backup=backup, fanout="geometric", accept_rate=0.6, power=0.8))


def _join(d: Drafter, params: SamplingParams, k: int = 3, budget: int = 8, c: float = 1.0, prompts=(PROMPT,)):
    """New sequences (ids 0..) through their first round, a target step with no speculation (the
    target emits token 5 here): the drafter drafts their first speculation from that outcome and
    builds the cache for it. Returns that speculation of each."""
    reply = d.step(DraftRound(joins=[Join(i, list(p), params, "ssd", k, budget, c) for i, p in enumerate(prompts)]))
    assert reply.specs == {} and reply.hits == {} and d.build() == {}
    reply = d.step(DraftRound(outcomes=[Outcome(i, 0, [5]) for i in range(len(prompts))]))
    assert reply.hits == {}          # no cache was built for a first round: neither hit nor miss
    assert all(spec.source == "neural" and len(spec.tokens) == k for spec in reply.specs.values())
    d.build()
    return reply.specs[0] if len(prompts) == 1 else reply.specs


def _neural_drafts(engine, contexts: list[list[int]], k: int) -> list[list[int]]:
    """What plain (SD) neural drafting produces, greedily, from each context."""
    d = Drafter(engine, SpecConfig(k=k, budget=8, backup="neural"))
    # SD sequences draft from their first outcome on (the first round is a target step)
    d.step(DraftRound(joins=[Join(100 + i, c[:-1], SamplingParams(), "sd", k, 8, 1.0) for i, c in enumerate(contexts)]))
    reply = d.step(DraftRound(outcomes=[Outcome(100 + i, 0, c[-1:]) for i, c in enumerate(contexts)]))
    out = [reply.specs[100 + i].tokens for i in range(len(contexts))]
    d.release_all()
    return out


def test_cache_contents_after_build(draft_engine):
    d = _drafter(draft_engine, "neural")
    spec = _join(d, SamplingParams())
    s = d.seqs[0]
    assert s.fanout == geometric_fanout(8, 3, 0.6, 0.8) and sum(s.fanout) == 8
    assert len(s.cache) == 8
    for j, f in enumerate(s.fanout):
        bonuses = [c for (jj, c) in s.cache if jj == j]
        assert len(bonuses) == f
        if j < 3:   # a rejected draft token can never be the bonus token
            assert spec.tokens[j] not in bonuses
    assert all(len(v.tokens) == 3 and v.q is None and v.source == "cache" for v in s.cache.values())
    d.release_all()
    assert draft_engine.active_slots == 0


def test_greedy_cached_branches_equal_neural_drafting(draft_engine):
    """Tree attention over the glue + scratch KV gives what drafting from the true prefix gives."""
    d = _drafter(draft_engine, "neural", k=4, budget=12)
    spec = _join(d, SamplingParams(), k=4, budget=12)
    cache, history = dict(d.seqs[0].cache), list(d.seqs[0].history)
    keys = sorted(cache)
    contexts = [history + spec.tokens[:j] + [c] for j, c in keys]
    expected = _neural_drafts(draft_engine, contexts, 4)
    for key, want in zip(keys, expected):
        assert cache[key].tokens == want, f"branch {key}: cached {cache[key].tokens} != drafted {want}"
    d.release_all()


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=3)], ids=["greedy", "sampled"])
def test_hit_returns_the_cached_speculation(draft_engine, params):
    d = _drafter(draft_engine, "neural")
    spec = _join(d, params, c=0.5 if not params.greedy else 1.0)
    s = d.seqs[0]
    history = list(s.history)
    # pick a cached outcome with some accepted tokens when there is one
    (j, c), cached = max(s.cache.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    if params.greedy:
        assert cached.q is None
    else:
        assert cached.q.shape == (3, draft_engine.vocab_size)
        assert torch.allclose(cached.q.sum(-1), torch.ones(3))
        # each cached token was drawn from its q: it has mass there
        assert all(cached.q[i, t] > 0 for i, t in enumerate(cached.tokens))
    reply = d.step(DraftRound(outcomes=[Outcome(0, j, spec.tokens[:j] + [c])]))
    assert reply.hits == {0: True}
    got = reply.specs[0]
    assert got.source == "cache" and got.tokens == cached.tokens
    assert (got.q is None) == params.greedy and (got.q is None or torch.equal(got.q, cached.q))
    assert d.seqs[0].history == history + spec.tokens[:j] + [c]
    # the next round's cache is built from the new speculation
    d.build()
    assert len(d.seqs[0].cache) == 8
    d.step(DraftRound(leaves=[0]))
    assert draft_engine.active_slots == 0


@pytest.mark.parametrize("backup", ["neural", "fast"])
def test_miss_uses_the_backup(draft_engine, backup):
    d = _drafter(draft_engine, backup)
    spec = _join(d, SamplingParams())
    s = d.seqs[0]
    j = 1
    bonus = next(t for t in range(draft_engine.vocab_size) if (j, t) not in s.cache and t != spec.tokens[j])
    history = s.history + spec.tokens[:j] + [bonus]
    reply = d.step(DraftRound(outcomes=[Outcome(0, j, spec.tokens[:j] + [bonus])]))
    assert reply.hits == {0: False}
    assert reply.backup == backup
    got = reply.specs[0]
    assert got.source == backup and len(got.tokens) == 3
    if backup == "neural":
        assert got.tokens == _neural_drafts(draft_engine, [history], 3)[0]
    else:
        assert got.tokens == ngram_proposal(history, 3, d.top_next)
    d.build()                         # a miss still leaves a full cache for the next round
    assert len(d.seqs[0].cache) == 8
    d.release_all()


def test_fast_backup_under_sampling_reports_one_hot_q(draft_engine):
    d = _drafter(draft_engine, "fast")
    spec = _join(d, SamplingParams(temperature=1.0, seed=5))
    s = d.seqs[0]
    bonus = next(t for t in range(draft_engine.vocab_size) if (0, t) not in s.cache and t != spec.tokens[0])
    got = d.step(DraftRound(outcomes=[Outcome(0, 0, [bonus])])).specs[0]
    assert got.source == "fast"
    assert torch.equal(got.q, torch.nn.functional.one_hot(torch.tensor(got.tokens), draft_engine.vocab_size).float())
    d.release_all()


def test_cache_is_per_sequence_and_per_round(draft_engine):
    """Two sequences share one batched build; an outcome only looks at its own sequence's cache,
    and a cache is dropped once its round's outcome is known (never served stale)."""
    d = _drafter(draft_engine, "neural")
    other = [11, 12, 13, 14, 15, 16, 17]
    first = _join(d, SamplingParams(), prompts=(PROMPT, other))
    history0 = list(d.seqs[0].history)
    c0, c1 = dict(d.seqs[0].cache), dict(d.seqs[1].cache)
    assert len(c0) == len(c1) == 8
    # seq 0 reports an outcome that only seq 1 has cached; seq 1 one of its own
    j0, b0 = next(key for key in c1 if key not in c0 and (key[0] == 3 or key[1] != first[0].tokens[key[0]]))
    (j1, b1), cached1 = next(iter(c1.items()))
    r = d.step(DraftRound(outcomes=[Outcome(0, j0, first[0].tokens[:j0] + [b0]),
                                    Outcome(1, j1, first[1].tokens[:j1] + [b1])]))
    assert r.hits == {0: False, 1: True}
    assert r.specs[0].source == "neural" and r.specs[1].source == "cache"
    assert r.specs[1].tokens == cached1.tokens
    assert d.seqs[0].cache == {} and d.seqs[1].cache == {}       # no stale entry survives the outcome
    d.build()
    assert set(d.seqs[0].cache) != set(c0) or d.seqs[0].history != history0
    d.step(DraftRound(leaves=[0, 1]))
    assert draft_engine.active_slots == 0


def test_fanout_larger_than_the_vocabulary(tmp_path):
    """A budget that asks for more candidates than the vocabulary has: every token becomes a
    candidate (the rejected draft token excepted), nothing crashes, decoding goes on."""
    from saguaro.decoder import Decoder
    from saguaro.draft import LocalDraft
    from tiny_models import save_random_model

    v = 8
    save_random_model(tmp_path / "m", arch="llama", vocab_size=v, hidden_size=32, intermediate_size=64,
                      num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1, std=0.12, tokenizer=False)
    cfg = EngineConfig(checkpoint=str(tmp_path / "m"), max_slots=2, max_seq_len=32, max_draft_len=2, max_branches=32)
    eng = TorchEngine(cfg, branches=True)
    d = Drafter(eng, SpecConfig(k=1, budget=20, accept_rate=0.5, power=0.8))
    spec = _join(d, SamplingParams(), k=1, budget=20, prompts=([1, 2],))
    s = d.seqs[0]
    assert s.fanout == [10, 10]
    assert sorted(c for j, c in s.cache if j == 0) == sorted(set(range(v)) - {spec.tokens[0]})
    assert sorted(c for j, c in s.cache if j == 1) == list(range(v))
    d.release_all()
    spec_cfg = SpecConfig(k=1, budget=20, accept_rate=0.5, power=0.8, policy=False)   # SSD every round
    dec = Decoder(TorchEngine(cfg), LocalDraft(Drafter(eng, spec_cfg)), spec_cfg)
    out = dec.generate([[1, 2]], SamplingParams(max_tokens=6, temperature=1.0, seed=0), mode="ssd")
    assert len(out[0]) == 6
    assert sum(r.hits for r in dec.history) > 0 and sum(r.misses for r in dec.history) == 0  # every outcome is cached


def test_first_round_is_a_target_step(draft_engine):
    """A new sequence gets no speculation in its first round (the target prefills it alone, then
    verifies nothing) and no cache: the drafter only prefills its copy meanwhile, and drafts from
    the first outcome, as SD would."""
    d = _drafter(draft_engine, "fast")
    reply = d.step(DraftRound(joins=[Join(0, list(PROMPT), SamplingParams(), "ssd", 3, 8, 1.0)]))
    assert reply.specs == {} and reply.hits == {} and d.build() == {}
    assert draft_engine.length(d.seqs[0].slot) == len(PROMPT) - 1
    got = d.step(DraftRound(outcomes=[Outcome(0, 0, [7])]))
    assert got.hits == {} and got.specs[0].source == "neural"
    assert got.specs[0].tokens == _neural_drafts(draft_engine, [PROMPT + [7]], 3)[0]
    assert len(d.build()[0]) == 8
    d.release_all()


# -- rounds whose type the round policy sets: K and pre-drafting per outcome -------------------------
@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, seed=5)], ids=["greedy", "sampled"])
def test_a_hit_with_a_smaller_next_k_is_the_cached_prefix(draft_engine, params):
    d = _drafter(draft_engine, "neural")
    spec = _join(d, params)
    (j, c), cached = max(d.seqs[0].cache.items(), key=lambda kv: (kv[0][0], -kv[0][1]))
    reply = d.step(DraftRound(outcomes=[Outcome(0, j, spec.tokens[:j] + [c], next_k=2, build=True)]))
    got = reply.specs[0]
    assert reply.hits == {0: True} and got.tokens == cached.tokens[:2]
    assert got.q is None if params.greedy else torch.equal(got.q, cached.q[:2])
    d.build()      # branches off the 2-token speculation, each 2 deep
    assert {jj for jj, _ in d.seqs[0].cache} <= {0, 1, 2} and len(d.seqs[0].cache) == 8
    assert all(len(v.tokens) == 2 for v in d.seqs[0].cache.values())
    d.release_all()


def test_a_plain_target_step_drafts_nothing_and_the_next_speculation_catches_up(draft_engine):
    d = _drafter(draft_engine, "neural")
    spec = _join(d, SamplingParams())
    emitted = [spec.tokens[0], 9]
    reply = d.step(DraftRound(outcomes=[Outcome(0, 1, emitted, next_k=0, build=False)]))
    assert reply.specs == {} and reply.hits == {}           # the cache is not looked up for an AR round
    assert d.build() == {}                                  # nothing pre-drafted for an AR round
    reply = d.step(DraftRound(outcomes=[Outcome(0, 0, [11], next_k=4, build=False)]))
    assert reply.hits == {}                                 # no cache was built: neither hit nor miss
    history = d.seqs[0].history
    assert reply.specs[0].source == "neural"
    assert reply.specs[0].tokens == _neural_drafts(draft_engine, [history], 4)[0]
    assert d.build() == {}                                  # an SD round: no build either
    d.release_all()


@pytest.mark.parametrize("params", [SamplingParams(), SamplingParams(temperature=0.8, top_k=50, seed=3)],
                         ids=["greedy", "sampled"])
@pytest.mark.parametrize("merged", [False, True], ids=["one-per-step", "merged"])
def test_a_catch_up_scores_the_draft_on_the_plain_steps_tokens(draft_engine, params, merged):
    """Shadow acceptance: the catch-up's forward scores the draft on the tokens plain target steps
    committed, as a speculation there would have been accepted (greedy: its argmax is the token;
    sampled: min(1, q(x) / p(x)), x drawn from the target's p). The speculating round's own outcome
    is not scored (no p for its bonus). The decoder tells a run of plain steps as one outcome
    (merged): scored the same."""
    context = PROMPT + [5, 7]
    [[h1, h2]] = _neural_drafts(draft_engine, [context], 2)   # the draft's greedy guesses after 7
    wrong = (h2 + 1) % 4000
    d = _drafter(draft_engine, "neural")
    _join(d, params)                                          # speculating from [5]
    p1, p2 = (None, None) if params.greedy else (0.3, 0.05)
    sampled = not params.greedy
    steps = ([Outcome(0, 0, [h1, wrong], next_k=0, build=False, p_plain=[p1, p2] if sampled else None)] if merged else
             [Outcome(0, 0, [h1], next_k=0, build=False, p_plain=[p1] if sampled else None),
              Outcome(0, 0, [wrong], next_k=0, build=False, p_plain=[p2] if sampled else None)])
    reply = d.step(DraftRound(outcomes=[Outcome(0, 0, [7], next_k=0, build=False)] + steps))
    slot = draft_engine.allocate()
    rows = draft_engine.forward([slot], [context + [h1]])[0][-2:]      # after 7 and after h1
    draft_engine.release(slot)
    if params.greedy:
        want = 1.0                                            # h1 guessed, `wrong` not
    else:
        q = probs(rows, params)
        want = min(1.0, float(q[0, h1]) / p1) + min(1.0, float(q[1, wrong]) / p2)
    assert reply.shadow[0][1] == 2 and reply.shadow[0][0] == pytest.approx(want, rel=1e-4)
    # told again with nothing new to score: no second count of the same tokens
    reply = d.step(DraftRound(outcomes=[Outcome(0, 0, [h2], next_k=3, build=False)]))
    assert reply.shadow == {}
    d.release_all()


@pytest.mark.parametrize("merged", [False, True], ids=["one-per-step", "merged"])
def test_a_long_catch_up_scores_only_its_last_tokens(draft_engine, merged):
    """A catch-up longer than SHADOW_ROWS per sequence (by 2 * SHADOW_ROWS in all) prefills the
    older tokens without the LM head and scores the draft on the latest SHADOW_ROWS only, each as
    a forward over the whole catch-up would have: greedy, whether its argmax is the token."""
    n = 4 * SHADOW_ROWS
    d = _drafter(draft_engine, "neural")
    _join(d, SamplingParams())                                   # speculating from [5]
    context = PROMPT + [5]
    guesses = []
    for _ in range(n):                                           # the draft's own greedy continuation,
        [[g]] = _neural_drafts(draft_engine, [context], 1)       # so every scored token is its guess
        guesses.append(g)
        context = context + [g]
    tokens = guesses[:-1] + [(guesses[-1] + 1) % 4000]           # ... but the last
    # (the first outcome is the speculating round's; the plain steps' follow, merged as the decoder tells them)
    told = ([Outcome(0, 0, tokens[:1], next_k=0, build=False), Outcome(0, 0, tokens[1:], next_k=0, build=False)] if merged else
            [Outcome(0, 0, [t], next_k=0, build=False) for t in tokens])
    reply = d.step(DraftRound(outcomes=told))
    assert reply.shadow[0] == (SHADOW_ROWS - 1, SHADOW_ROWS)
    s = d.seqs[0]
    assert draft_engine.length(s.slot) == len(s.history) - 1     # the KV holds every committed token
    d.release_all()


def test_drafting_after_untold_plain_steps_catches_up_first_and_times_it_apart(draft_engine):
    """A sequence that speculates again after CATCH_UP_LAG or more plain steps the drafter was not
    told is caught up before drafting (its plain steps scored, as at any catch-up), and the time
    that took is reported apart from drafting's (catch_up_ms: the policy prices drafting per K
    without it); fewer are fed to the first drafting forward, as before."""
    for lag, caught_up in ((CATCH_UP_LAG, True), (2, False)):
        d = _drafter(draft_engine, "neural")
        _join(d, SamplingParams())                               # speculating from [5]
        context = PROMPT + [5]
        guesses = []
        for _ in range(lag):
            [[g]] = _neural_drafts(draft_engine, [context], 1)
            guesses.append(g)
            context = context + [g]
        told = [Outcome(0, 0, guesses[:1], next_k=0, build=False), Outcome(0, 0, guesses[1:], next_k=2, build=False)]
        reply = d.step(DraftRound(outcomes=told))
        s = d.seqs[0]
        assert reply.specs[0].tokens == _neural_drafts(draft_engine, [s.history], 2)[0]
        if caught_up:
            assert reply.catch_up_ms > 0 and reply.shadow[0] == (lag - 1, lag - 1)   # all guessed
        else:
            assert reply.shadow == {}
        d.release_all()


def test_outcomes_of_plain_target_steps_bring_the_draft_kv_up_to_date(draft_engine):
    """A catch-up (outcomes told while the target takes plain steps): the drafter prefills what
    was committed, so the round that speculates again drafts exactly what drafting from the whole
    history would, with nothing left to prefill."""
    d = _drafter(draft_engine, "neural")
    _join(d, SamplingParams())
    slot = d.seqs[0].slot
    reply = d.step(DraftRound(outcomes=[Outcome(0, 0, [11], next_k=0, build=False),
                                        Outcome(0, 0, [12], next_k=0, build=False),
                                        Outcome(0, 0, [13], next_k=0, build=False)]))
    assert reply.specs == {} and reply.hits == {} and d.build() == {}
    history = d.seqs[0].history
    assert history[-3:] == [11, 12, 13]
    assert draft_engine.length(slot) == len(history) - 1    # all but the last committed token
    assert d.seqs[0].fast_guess == []                        # no n-gram guess for a round that drafts nothing
    reply = d.step(DraftRound(outcomes=[Outcome(0, 0, [14], next_k=3, build=False)]))
    assert reply.specs[0].tokens == _neural_drafts(draft_engine, [d.seqs[0].history], 3)[0]
    d.release_all()


def test_each_round_drafts_with_the_saguaro_c_it_was_told(draft_engine):
    """The round policy chooses C per round (Outcome.next_c): the build during that round and a
    backup drafted for it draw at that C, each speculation saying which (Speculation.c: the policy
    measures acceptance per C by it; a hit's is its build's); a round told none keeps the last, a C
    outside [0, 1] is a drafter failure, and greedy drafting, which C does not change, says 1."""
    d = _drafter(draft_engine, "neural")
    spec = _join(d, SamplingParams(temperature=0.8, seed=3))
    s = d.seqs[0]
    assert spec.c == 1.0 and {x.c for x in s.cache.values()} == {1.0}
    (j, c) = next(iter(s.cache))
    reply = d.step(DraftRound(outcomes=[Outcome(0, j, spec.tokens[:j] + [c], next_c=0.5)]))
    assert reply.hits == {0: True} and reply.specs[0].c == 1.0     # built the round before, at C = 1
    spec = reply.specs[0]
    d.build()
    assert s.c == 0.5 and {x.c for x in s.cache.values()} == {0.5}
    missed = next(t for t in range(draft_engine.vocab_size) if (0, t) not in s.cache and t != spec.tokens[0])
    reply = d.step(DraftRound(outcomes=[Outcome(0, 0, [missed])]))   # told no C: it keeps 0.5
    assert reply.hits == {0: False} and reply.specs[0].source == "neural" and reply.specs[0].c == 0.5
    d.build()
    with pytest.raises(DraftFailure, match="Saguaro C"):
        d.step(DraftRound(outcomes=[Outcome(0, 0, [missed], next_c=1.5)]))
    g = _drafter(draft_engine, "neural")
    spec = _join(g, SamplingParams())
    (j, c) = next(iter(g.seqs[0].cache))
    reply = g.step(DraftRound(outcomes=[Outcome(0, j, spec.tokens[:j] + [c], next_c=0.5)]))
    g.build()
    assert reply.specs[0].c == 1.0 and {x.c for x in g.seqs[0].cache.values()} == {1.0}
    g.release_all()


def test_each_round_builds_with_the_fan_out_budget_it_was_told(draft_engine):
    """The round policy chooses B per round (Outcome.next_budget): the build during that round has
    that many branches, a round told none keeps the last, and a budget the engine cannot hold is a
    drafter failure, not a silent cap."""
    d = _drafter(draft_engine, "neural")
    spec = _join(d, SamplingParams())
    s = d.seqs[0]
    assert len(s.cache) == 8
    for budget, want in ((2, 2), (None, 2), (8, 8), (5, 5)):
        (j, c) = next(iter(s.cache))
        reply = d.step(DraftRound(outcomes=[Outcome(0, j, spec.tokens[:j] + [c], next_budget=budget)]))
        assert reply.hits == {0: True}
        spec = reply.specs[0]
        d.build()
        assert len(s.cache) == want and sum(s.fanout) == want, (budget, s.fanout)
    for bad in (0, draft_engine.max_branches + 1):
        (j, c) = next(iter(s.cache))
        with pytest.raises(DraftFailure, match="fan-out budget"):
            d.step(DraftRound(outcomes=[Outcome(0, j, spec.tokens[:j] + [c], next_budget=bad)]))
