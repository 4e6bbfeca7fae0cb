"""Exactness of sampled decoding, statistically (docs/design.md, "Exactness").

A tiny random target/draft pair (vocabulary 8) makes the joint distribution of the first 4
generated tokens enumerable exactly: 8^4 cells, each the product of the target's conditional
probabilities under the request's distribution (`saguaro.sampling.probs`: temperature, top-k,
top-p). SSD (Saguaro C = 0.3, neural and fast backups), SD and AR samples must fit it by a
chi-square goodness-of-fit test over >= 20k samples; so must sequences whose rounds switch between
AR, SD and SSD at random (K too), right after rejections and cache misses included, and sequences
run by the round policy itself; and the same test must reject a drafter that hands verification
the wrong q, which shows it has the power to catch the classic bug.
"""
from __future__ import annotations

import itertools
import time
from collections import Counter

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from saguaro.config import EngineConfig, SamplingParams, SpecConfig
from saguaro.decoder import Decoder
from saguaro.draft import Drafter, LocalDraft
from saguaro.engines.torch_engine import TorchEngine
from saguaro.sampling import probs, sample_rows, saguaro
from random_rounds import RandomRounds
from tiny_models import save_random_model

V = 8                 # vocabulary
N_TOKENS = 4          # generated tokens whose joint distribution is tested: a new sequence's first
                      # round is a target step, so the rest cover speculation, cache and backups
SAMPLES = 20_000      # per case (the floor)
# Sequences decoded together (KV slots on each engine). Larger batches are slower here: the
# draft's cache build does per-sequence Python work, and its branch layout is O(batch x branches).
BATCH = 250
K = 2
BUDGET = 6            # fan-out budget: a mix of cache hits and misses on a vocabulary of 8
PROMPT = [3]          # one token: no per-sequence prefill forward (20k of them would dominate)
TINY = dict(arch="llama", vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, std=0.12, tokenizer=False)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-pair")
    target_hf = save_random_model(root / "target", seed=101, **TINY)
    save_random_model(root / "draft", seed=202, **TINY)
    return root, target_hf


@pytest.fixture(scope="module")
def engines(models):
    root, _ = models
    cfg = dict(dtype="float32", max_slots=BATCH, max_seq_len=len(PROMPT) + N_TOKENS + 1, max_draft_len=K,
               max_branches=BUDGET, threads=1)
    target = TorchEngine(EngineConfig(checkpoint=str(root / "target"), **cfg))
    draft = TorchEngine(EngineConfig(checkpoint=str(root / "draft"), **cfg), branches=True)
    return target, draft


def exact_distribution(hf, params: SamplingParams) -> np.ndarray:
    """P(x_1..x_N | PROMPT) under autoregressive sampling from the target: [V] * N_TOKENS."""
    joint = torch.ones((), dtype=torch.float64)
    with torch.no_grad():
        for n in range(N_TOKENS):
            prefixes = [PROMPT + list(p) for p in itertools.product(range(V), repeat=n)]
            logits = hf(torch.tensor(prefixes), use_cache=False).logits[:, -1].float()
            joint = joint[..., None] * probs(logits, params).double().view(*[V] * n, V)
    assert abs(joint.sum().item() - 1) < 1e-5      # fp32 softmax rows
    return (joint / joint.sum()).numpy()


def sample_decoder(dec: Decoder, params: SamplingParams, mode: str, n: int, seed: int,
                   switches: Counter | None = None) -> Counter:
    """n sequences (each its own seed), BATCH at a time; counts of their first N_TOKENS tokens.
    switches, if given, counts rounds whose type differs from the sequence's previous round, by
    what that round ended with (a rejection, a cache miss)."""
    counts: Counter = Counter()
    done = 0
    while done < n:
        ids = [dec.add(PROMPT, params.with_(seed=seed + done + i), mode=mode) for i in range(min(BATCH, n - done))]
        out: dict[int, list[int]] = {i: [] for i in ids}
        last: dict[int, tuple[str, bool, bool, int]] = {}   # kind, rejected, missed, misses so far
        while dec.active:
            for e in dec.step():
                out[e.seq_id].extend(e.tokens)
                kind, misses = e.kind, e.stats.cache_misses
                prev = last.get(e.seq_id)
                if switches is not None and prev is not None and prev[0] != kind:
                    switches["after a rejection"] += prev[1]
                    switches["after a cache miss"] += prev[2]
                last[e.seq_id] = (kind, e.accepted < e.drafted, misses > (prev[3] if prev else 0), misses)
        for toks in out.values():
            assert len(toks) == N_TOKENS
            counts[tuple(toks)] += 1
        done += len(ids)
    assert dec.target.active_slots == 0
    assert dec.draft.drafter.engine.active_slots == 0
    return counts


def chi_square_p(counts: Counter, joint: np.ndarray) -> float:
    n = sum(counts.values())
    observed = np.zeros(joint.size)
    for toks, c in counts.items():
        observed[np.ravel_multi_index(toks, joint.shape)] += c
    expected = joint.reshape(-1) * n
    impossible = expected == 0
    assert observed[impossible].sum() == 0, "samples in cells the distribution gives probability 0"
    # merge every cell with expected count < 5 into one pooled cell (itself >= 5, or folded into
    # the smallest kept cell)
    keep = expected >= 5
    obs, exp = list(observed[keep]), list(expected[keep])
    pooled_o, pooled_e = observed[~keep].sum(), expected[~keep].sum()
    if pooled_e >= 5:
        obs.append(pooled_o)
        exp.append(pooled_e)
    elif pooled_e > 0:
        i = int(np.argmin(exp))
        obs[i] += pooled_o
        exp[i] += pooled_e
    exp = np.array(exp) * (n / sum(exp))
    return float(chisquare(np.array(obs), exp).pvalue)


def make_decoder(engines, spec: SpecConfig) -> Decoder:
    target, draft = engines
    for e in engines:
        assert e.active_slots == 0
    return Decoder(target, LocalDraft(Drafter(draft, spec)), spec)


# plain SSD (policy off): every round pre-drafts, so hits and misses are both frequent
SSD = dict(k=K, budget=BUDGET, saguaro_c=0.3, policy=False)
CASES = [
    # id, mode, spec, params[, mark]
    ("ssd-neural-t0.7", "ssd", SpecConfig(**SSD, backup="neural"), SamplingParams(temperature=0.7)),
    # cases marked slow run with `pytest -m slow`: the t0.7 cases cover the t1.0 ones' code paths
    ("ssd-neural-t1.0", "ssd", SpecConfig(**SSD, backup="neural"), SamplingParams(temperature=1.0), pytest.mark.slow),
    # the fast backup also serves the switching cases' SSD rounds (RandomRounds picks either backup)
    ("ssd-fast-t0.7", "ssd", SpecConfig(**SSD, backup="fast"), SamplingParams(temperature=0.7), pytest.mark.slow),
    ("ssd-fast-t1.0", "ssd", SpecConfig(**SSD, backup="fast"), SamplingParams(temperature=1.0), pytest.mark.slow),
    ("ssd-neural-topk-topp", "ssd", SpecConfig(**SSD, backup="neural"),
     SamplingParams(temperature=0.9, top_k=5, top_p=0.8)),
    ("sd-t1.0", "sd", SpecConfig(k=K, budget=BUDGET), SamplingParams(temperature=1.0)),
    ("ar-t0.7", "ar", SpecConfig(k=K, budget=BUDGET), SamplingParams(temperature=0.7)),
]


@pytest.mark.parametrize("seed,mode,spec,params", [pytest.param(i * 10**6, *c[1:4], id=c[0], marks=c[4:])
                                                   for i, c in enumerate(CASES)])
def test_sampled_decoding_matches_autoregressive_distribution(models, engines, seed, mode, spec, params):
    _, target_hf = models
    joint = exact_distribution(target_hf, params.with_(max_tokens=N_TOKENS))
    dec = make_decoder(engines, spec)
    t0 = time.perf_counter()
    counts = sample_decoder(dec, params.with_(max_tokens=N_TOKENS), mode, SAMPLES, seed=seed)
    elapsed = time.perf_counter() - t0
    p = chi_square_p(counts, joint)
    rounds = dec.history
    hits = sum(r.hits for r in rounds)
    misses = sum(r.misses for r in rounds)
    print(f"\n{mode} {spec.backup} T={params.temperature}: p={p:.3g}, {SAMPLES} samples in {elapsed:.1f}s, "
          f"hits {hits} misses {misses}, backups {Counter(r.backup for r in rounds if r.misses)}")
    if mode == "ssd":      # both paths of the cache were exercised
        assert min(hits, misses) > SAMPLES // 20, (hits, misses)
    assert p > 1e-3, f"{mode}: the sampled distribution differs from AR sampling (chi-square p = {p:.3g})"


SMALL = 3             # fan-out budget of the switching cases: more misses to switch after
SWITCH_CASES = [
    # id, spec, params, policy (random round types, or the real round policy)[, mark]
    ("switching-neural-t0.7", SpecConfig(k=K, budget=SMALL, saguaro_c=0.3, backup="neural"), SamplingParams(temperature=0.7), "random"),
    ("switching-fast-t1.0", SpecConfig(k=K, budget=SMALL, saguaro_c=0.3, backup="fast"), SamplingParams(temperature=1.0), "random"),
    # top-k/top-p is covered by ssd-neural-topk-topp, switching by the two above: `pytest -m slow`
    ("switching-topk-topp", SpecConfig(k=K, budget=SMALL, backup="auto"), SamplingParams(temperature=0.9, top_k=5, top_p=0.8), "random",
     pytest.mark.slow),
    ("policy-t0.7", SpecConfig(k=K, budget=BUDGET), SamplingParams(temperature=0.7), "policy"),   # (C chosen: 1 or 0.5)
]


@pytest.mark.parametrize("seed,spec,params,policy", [pytest.param((len(CASES) + 1 + i) * 10**6, *c[1:4], id=c[0], marks=c[4:])
                                                   for i, c in enumerate(SWITCH_CASES)])
def test_sampled_decoding_with_switching_round_types_matches(models, engines, seed, spec, params, policy):
    _, target_hf = models
    joint = exact_distribution(target_hf, params.with_(max_tokens=N_TOKENS))
    dec = make_decoder(engines, spec)
    if policy == "random":
        dec.policy = RandomRounds(max_k=K, seed=seed)
    switches: Counter = Counter()
    counts = sample_decoder(dec, params.with_(max_tokens=N_TOKENS), "ssd", SAMPLES, seed=seed, switches=switches)
    p = chi_square_p(counts, joint)
    kinds = Counter(k for r in dec.history for k in ("ar", "sd", "ssd") for _ in range(getattr(r, k)))
    print(f"\n{policy} rounds, T={params.temperature}: p={p:.3g}, round types {dict(kinds)}, switches {dict(switches)}")
    if policy == "random":   # the switches the issue names happened, often
        assert switches["after a rejection"] > SAMPLES // 10 and switches["after a cache miss"] > SAMPLES // 100, switches
        assert min(kinds.values()) > SAMPLES // 10, kinds
        # and SSD rounds that changed Saguaro C while looking in caches the round before built at the other
        h = dec.history
        c_switched = sum(b.hits for a, b in zip(h, h[1:]) if a.saguaro_c != b.saguaro_c and a.ssd and b.ssd)
        assert c_switched > SAMPLES // 100, c_switched
    assert p > 1e-3, f"{policy} round types: the sampled distribution differs from AR sampling (chi-square p = {p:.3g})"


def _choose_reporting_unreshaped_q(self, seqs, counts, logits, fanout):
    """Drafter._choose with the classic bug: the token is drawn from the Saguaro-reshaped q, but
    verification is handed the plain draft distribution."""
    s = seqs[0]
    q_plain = probs(logits, s.params)
    q_sampled = saguaro(q_plain, fanout, s.c) if s.mode == "ssd" else q_plain
    return sample_rows(q_sampled, [(x.generator, n) for x, n in zip(seqs, counts)]), q_plain


def test_wrong_q_fails_the_same_test(models, engines, monkeypatch):
    _, target_hf = models
    params = SamplingParams(temperature=1.0, max_tokens=N_TOKENS)
    monkeypatch.setattr(Drafter, "_choose", _choose_reporting_unreshaped_q)
    dec = make_decoder(engines, SpecConfig(**SSD, backup="neural"))
    counts = sample_decoder(dec, params, "ssd", SAMPLES, seed=len(CASES) * 10**6)
    p = chi_square_p(counts, exact_distribution(target_hf, params))
    print(f"\nwrong q (sampled from the reshaped q, verified with the plain one): p={p:.3g}")
    assert p < 1e-6, f"the chi-square test did not catch a wrong q: p = {p:.3g}"


def test_plain_steps_drawn_together_are_the_draws_each_would_make(engines):
    """A round's sampled plain steps are drawn together (Decoder._draw_plain: one distribution and
    one inverse CDF per sampling setting) with each row's uniform from its own generator: the same
    tokens and p(token) as each sequence's own draw (_accept), whose distribution the chi-square
    cases above test; a speculating, processed, log-prob or greedy sequence is left to _accept."""
    dec = make_decoder(engines, SpecConfig(k=K, budget=BUDGET))
    settings = [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3), SamplingParams(temperature=0.9, top_k=3),
                SamplingParams(temperature=0.9, top_p=0.6), SamplingParams(temperature=0.7, return_log_probs=True),
                SamplingParams(temperature=0.7, repetition_penalty=1.3), SamplingParams()]
    seqs = [dec.seqs[dec.add(PROMPT, p.with_(seed=i, max_tokens=N_TOKENS), mode="ar")] for i, p in enumerate(settings * 3)]
    try:
        for trial in range(50):
            outputs = [torch.randn(1, V) * 3 for _ in seqs]
            states = [s.generator.get_state() if s.generator is not None else None for s in seqs]
            drawn = dec._draw_plain(seqs, outputs)
            assert {s.seq_id for s in seqs if not s.params.greedy and not s.processed and not s.params.return_log_probs} == set(drawn)
            for s, out, state in zip(seqs, outputs, states):
                if s.seq_id in drawn:
                    s.generator.set_state(state)
                    k, token, p = dec._accept(s, dec._scaled(s, out, []), [], False)
                    assert (k, token) == (0, drawn[s.seq_id][0]) and p == [pytest.approx(drawn[s.seq_id][1])]
    finally:
        for s in seqs:
            dec.abort(s.seq_id)
