"""TensorRT-LLM's penalties, min_tokens, bad words and log-probabilities (saguaro.logits; docs/design.md,
"Penalties, bad words and log-probabilities").

Each processor against a hand-computed expectation; greedy SD and SSD token-identical to AR with all
of them on the demo pair; sampled SD and SSD with them fit the exactly enumerated AR distribution of a
tiny pair (chi-square, with a control that the same test rejects rows processed with the wrong
context); Event.log_probs equal a direct computation.
"""
from __future__ import annotations

import itertools
import json
import math
from collections import Counter

import numpy as np
import pytest
import torch

import saguaro.decoder
import saguaro.logits
import saguaro.sampling
from saguaro.config import DEMO_DRAFT, DEMO_TARGET, DEV_PROMPTS, EngineConfig, SamplingParams, SpecConfig
from saguaro.decoder import Decoder
from saguaro.draft import Drafter, LocalDraft
from saguaro.engines.torch_engine import TorchEngine
from saguaro.errors import SaguaroError
from saguaro.llm import build_decoder
from saguaro.logits import MIN_LENGTH_MASK, active, banned, process
from saguaro.sampling import distribution, probability, token_log_probs
from saguaro.text import load_tokenizer
from random_rounds import RandomRounds
from test_exactness import chi_square_p
from tiny_models import save_random_model

GREEDY = SamplingParams()


def rows(*values) -> torch.Tensor:
    return torch.tensor([list(values)], dtype=torch.float32)


# ---------------------------------------------------------------- each processor, by hand

def test_nothing_set_is_inactive_and_each_field_activates():
    assert not active(SamplingParams(temperature=0.7, top_k=3, top_p=0.9, end_id=2, return_log_probs=True))
    assert not active(SamplingParams(min_tokens=3))          # no end_id: nothing to ban
    for change in (dict(repetition_penalty=1.1), dict(presence_penalty=0.5), dict(frequency_penalty=-0.5),
                   dict(min_tokens=1, end_id=0), dict(bad_words=((4,),))):
        assert active(SamplingParams(**change)), change


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    x = process(rows(2.0, -1.0, 0.5, -0.5, 3.0), GREEDY.with_(repetition_penalty=2.0), [0, 1], [], [])
    assert x.tolist() == [[1.0, -2.0, 0.5, -0.5, 3.0]]


def test_penalties_apply_in_order_repetition_presence_frequency():
    p = GREEDY.with_(repetition_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    x = process(rows(-1.0, 2.0, 4.0), p, [0, 1, 1], [], [])
    # token 0 (once): -1 * 2 - 0.5 - 0.25 = -2.75; token 1 (twice): 2 / 2 - 0.5 - 0.5 = 0; token 2 unseen
    assert x.tolist() == [[-2.75, 0.0, 4.0]]


def test_temperature_scales_before_the_penalties():
    # TensorRT-LLM: logit / T, then - presence (not (logit - presence) / T)
    x = process(rows(2.0, 1.0, 0.0), SamplingParams(temperature=0.5, presence_penalty=1.0), [0], [], [])
    assert x.tolist() == [[3.0, 2.0, 0.0]]


def test_each_row_counts_prompt_output_and_the_draft_tokens_before_it():
    p = GREEDY.with_(frequency_penalty=0.5)
    x = process(torch.zeros(3, 4), p, [1, 1], [2, 1], [2, 3])
    # row 0: {1: 3, 2: 1}; row 1: + d1 = 2; row 2: + d2 = 3
    assert x.tolist() == [[0.0, -1.5, -0.5, 0.0], [0.0, -1.5, -1.0, 0.0], [0.0, -1.5, -1.0, -0.5]]


def test_tokens_beyond_the_vocabulary_are_neither_counted_nor_banned():
    p = GREEDY.with_(presence_penalty=1.0, bad_words=((9,), (1, 8)))
    assert process(torch.zeros(1, 3), p, [0, 9], [], []).tolist() == [[-1.0, 0.0, 0.0]]


def test_min_tokens_bans_end_id_while_fewer_tokens_are_generated():
    p = GREEDY.with_(min_tokens=2, end_id=3)
    x = process(torch.zeros(3, 5), p, [0, 3], [4], [1, 2])      # 1 generated before row 0; the prompt never counts
    assert x[:, 3].tolist() == [MIN_LENGTH_MASK, 0.0, 0.0]
    assert (x[:, [0, 1, 2, 4]] == 0).all()


def test_bad_words_ban_the_last_token_where_the_context_ends_with_the_rest():
    words = ((7,), (1, 2), (3, 4, 5))
    # the prompt's last token and the output's complete (3, 4): 5 is banned at row 0
    assert sorted(banned([9, 3, 4], words)) == [5, 7]
    assert sorted(banned([3, 4, 1], words)) == [2, 7]
    assert banned([4], words) == [7]
    x = process(torch.zeros(3, 8), GREEDY.with_(bad_words=words), [0, 3], [4], [1, 2])
    ninf = float("-inf")
    assert x.tolist() == [[0, 0, 0, 0, 0, ninf, 0, ninf], [0, 0, ninf, 0, 0, 0, 0, ninf], [0, 0, 0, 0, 0, 0, 0, ninf]]


def test_processing_leaves_the_engine_rows_alone():
    out = torch.ones(2, 4)
    process(out, GREEDY.with_(repetition_penalty=2.0, bad_words=((1,),)), [0], [], [2])
    assert (out == 1).all()


def test_log_probs_are_over_the_whole_vocabulary_before_top_k():
    x = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, float("-inf")]])
    expected = [2.0 - math.log(math.e + math.e ** 2 + math.e ** 3), -math.log(2)]
    assert token_log_probs(x, [1, 0]) == pytest.approx(expected)
    # top-k = 1 keeps only token 2, but the log-probability stays the unnormalized one
    assert distribution(x[:1], SamplingParams(temperature=1.0, top_k=1)).tolist() == [[0.0, 0.0, 1.0]]


@pytest.mark.parametrize("change, match", [
    (dict(repetition_penalty=0.0), r"repetition_penalty=0.0: must be a number > 0 that float32 holds"),
    (dict(repetition_penalty=float("nan")), r"repetition_penalty=nan"),
    (dict(presence_penalty=float("inf")), r"presence_penalty=inf: must be a number float32 holds"),
    (dict(frequency_penalty=float("nan")), r"frequency_penalty=nan: must be a number float32 holds"),
    (dict(min_tokens=-1), r"min_tokens=-1: must be >= 0"),
    (dict(bad_words=((1,), ())), r"bad_words\[1\] is empty"),
    (dict(bad_words=((1, -5),)), r"bad_words\[0\]=\[1, -5\]: token ids must be integers >= 0"),
])
def test_validation_names_the_field_and_the_fix(change, match):
    with pytest.raises(SaguaroError, match=match):
        SamplingParams(**change).validate()


# ---------------------------------------------------------------- greedy: SD and SSD == AR (demo pair)

NEW = 24


@pytest.fixture(scope="module")
def demo():
    """Prompts, their processing params and AR's output with them (the target alone)."""
    tok = load_tokenizer(DEMO_TARGET)
    prompts = [tok.encode(json.loads(line)["prompt"]).ids for line in DEV_PROMPTS.read_text().splitlines()[:2]]
    dec = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET)), draft=None)
    try:
        plain = dec.generate(prompts, SamplingParams(max_tokens=NEW), "ar")
        params = [processed_params(p) for p in plain]
        ar = [dec.generate([pr], p, "ar")[0] for pr, p in zip(prompts, params)]
    finally:
        dec.close()
    return prompts, params, plain, ar


def processed_params(plain: list[int]) -> SamplingParams:
    """Penalties, a bad word of one token and one of two, taken from the unprocessed output so that
    they bite; end_id: the unprocessed second token, banned for the first 6."""
    return SamplingParams(max_tokens=NEW, repetition_penalty=1.3, presence_penalty=0.4, frequency_penalty=0.2,
                          bad_words=((plain[8],), (plain[3], plain[4])), min_tokens=6, end_id=plain[1])


@pytest.mark.parametrize("mode, backup, chooser", [("sd", "neural", None), ("ssd", "auto", "random")])
def test_greedy_speculation_with_processing_equals_autoregressive(demo, mode, backup, chooser):
    prompts, params, plain, ar = demo
    dec = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET)), EngineConfig(checkpoint=str(DEMO_DRAFT)),
                        SpecConfig(k=3, budget=8, backup=backup, policy=False), draft_process=False)
    if chooser:
        dec.policy = RandomRounds(max_k=4, seed=7)
    try:
        ids = [dec.add(pr, p, mode) for pr, p in zip(prompts, params)]   # batched: each row its own context
        out = {i: [] for i in ids}
        while dec.active:
            for e in dec.step():
                out[e.seq_id].extend(e.tokens)
        drafted, slots = sum(r.drafted for r in dec.history), dec.target.active_slots
    finally:
        dec.close()
    assert [out[i] for i in ids] == ar
    assert drafted > 0 and slots == 0
    for a, pl, p, pr in zip(ar, plain, params, prompts):
        assert a != pl[: len(a)], "the processing changed nothing"
        assert p.bad_words[0][0] not in a
        context = pr + a
        assert all(tuple(context[j - 1: j + 1]) != p.bad_words[1] for j in range(len(pr), len(context)))
        assert p.end_id not in a[: p.min_tokens]
        assert p.end_id not in a[:-1], "generation goes on after end_id"


# ---------------------------------------------------------------- sampled: the distribution (tiny pair)

V_TARGET, V_DRAFT = 9, 6          # the draft pads less: verification runs over the first 6 ids
N_TOKENS = 3                      # a new sequence's first round is a target step: the other two
                                  # tokens come from verifying K = 2 draft tokens (rows 0..2)
PROMPT = [3]                      # one token: no per-sequence prefill forward
BATCH = 250
K = 2
TINY = dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1, std=0.12, tokenizer=False)
# end_id 3 may come only as the last of the 3 tokens; 2 never; 5 never right after 4
SAMPLED = SamplingParams(temperature=1.0, max_tokens=N_TOKENS, repetition_penalty=1.6, presence_penalty=0.6,
                         frequency_penalty=0.4, bad_words=((2,), (4, 5)), min_tokens=2, end_id=3)
SAMPLES = 2000                    # over the 125 cells that can be drawn (5 tokens at each of 3 positions)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-padded")
    target_hf = save_random_model(root / "target", seed=301, vocab_size=V_TARGET, **TINY)
    save_random_model(root / "draft", seed=302, vocab_size=V_DRAFT, **TINY)
    cfg = dict(dtype="float32", max_slots=BATCH, max_seq_len=len(PROMPT) + N_TOKENS + 1, max_draft_len=K,
               max_branches=6, threads=1)
    target = TorchEngine(EngineConfig(checkpoint=str(root / "target"), **cfg))
    draft = TorchEngine(EngineConfig(checkpoint=str(root / "draft"), **cfg), branches=True)
    return target_hf, target, draft


def tiny_decoder(tiny, spec: SpecConfig) -> Decoder:
    _, target, draft = tiny
    return Decoder(target, LocalDraft(Drafter(draft, spec)), spec)


def exact_distribution(hf, params: SamplingParams) -> np.ndarray:
    """P(x_1..x_N | PROMPT) of plain sampling from the processed target over the shared ids."""
    joint = torch.ones((), dtype=torch.float64)
    with torch.no_grad():
        for n in range(N_TOKENS):
            prefixes = [list(p) for p in itertools.product(range(V_DRAFT), repeat=n)]
            logits = hf(torch.tensor([PROMPT + p for p in prefixes]), use_cache=False).logits[:, -1, :V_DRAFT]
            dist = torch.cat([distribution(process(row[None], params, PROMPT, p, []), params)
                              for row, p in zip(logits.float(), prefixes)])
            joint = joint[..., None] * dist.double().view(*[V_DRAFT] * n, V_DRAFT)
    return (joint / joint.sum()).numpy()


def sample_counts(dec: Decoder, params: SamplingParams, mode: str, seed: int, samples: int = SAMPLES) -> Counter:
    counts: Counter = Counter()
    for start in range(0, samples, BATCH):
        ids = [dec.add(PROMPT, params.with_(seed=seed + start + i), mode) for i in range(BATCH)]
        out = {i: [] for i in ids}
        while dec.active:
            for e in dec.step():
                out[e.seq_id].extend(e.tokens)
        for toks in out.values():
            assert len(toks) == N_TOKENS
            counts[tuple(toks)] += 1
    return counts


def p_value(counts: Counter, joint: np.ndarray) -> float:
    """test_exactness's chi-square test; 0 when a sample fell in a cell of probability 0 (a banned
    token was emitted)."""
    try:
        return chi_square_p(counts, joint)
    except AssertionError:
        return 0.0


@pytest.fixture(scope="module")
def joint(tiny):
    return exact_distribution(tiny[0], SAMPLED)


# AR's processed distribution itself is checked exactly, token by token, by the log-probability test
@pytest.mark.parametrize("mode, spec, seed", [
    ("sd", SpecConfig(k=K, budget=6), 10**6),
    ("ssd", SpecConfig(k=K, budget=6, saguaro_c=0.3, backup="neural", policy=False), 2 * 10**6),
], ids=["sd", "ssd"])
def test_sampled_decoding_with_processing_matches_the_processed_target(tiny, joint, mode, spec, seed):
    dec = tiny_decoder(tiny, spec)
    counts = sample_counts(dec, SAMPLED, mode, seed)
    p = p_value(counts, joint)
    drafted = sum(r.drafted for r in dec.history)
    print(f"\n{mode} with processing: p={p:.3g}, {drafted} draft tokens verified")
    assert drafted > SAMPLES, drafted
    assert p > 1e-3, f"{mode}: sampled tokens differ from the processed target's distribution (chi-square p = {p:.3g}; " \
                     f"0: a banned token was emitted)"


def test_rows_processed_with_the_wrong_context_fail_the_same_test(tiny, joint, monkeypatch):
    # the classic mistake: every row of a round processed with the round's context, not its own
    monkeypatch.setattr(saguaro.decoder, "process",
                        lambda rows, p, prompt, output, draft: process(rows, p, prompt, output, []))
    dec = tiny_decoder(tiny, SpecConfig(k=K, budget=6))
    p = p_value(sample_counts(dec, SAMPLED, "sd", seed=3 * 10**6, samples=SAMPLES // 2), joint)
    print(f"\nrows processed with the round's context: p={p:.3g}")
    assert p < 1e-6, f"the chi-square test did not catch rows processed with the wrong context: p = {p:.3g}"


# ---------------------------------------------------------------- log-probabilities

@pytest.mark.parametrize("mode, params", [
    ("sd", SAMPLED.with_(max_tokens=4, min_tokens=1, return_log_probs=True)),
    ("ssd", SAMPLED.with_(temperature=0.0, max_tokens=4, return_log_probs=True)),
    ("ar", SAMPLED.with_(temperature=0.8, max_tokens=4, return_log_probs=True)),
    ("sd", SamplingParams(temperature=0.8, max_tokens=4, return_log_probs=True)),
])
def test_log_probs_are_the_processed_targets(tiny, mode, params):
    hf = tiny[0]
    dec = tiny_decoder(tiny, SpecConfig(k=K, budget=6, policy=False))
    ids = [dec.add(PROMPT, params.with_(seed=i), mode) for i in range(8)]
    tokens, logps = {i: [] for i in ids}, {i: [] for i in ids}
    while dec.active:
        for e in dec.step():
            assert len(e.log_probs) == len(e.tokens)
            tokens[e.seq_id] += e.tokens
            logps[e.seq_id] += e.log_probs
    for i in ids:
        out = tokens[i]
        with torch.no_grad():
            logits = hf(torch.tensor([PROMPT + out]), use_cache=False).logits[0, len(PROMPT) - 1: -1, :V_DRAFT]
        expected = []
        for j, row in enumerate(logits.float()):
            x = process(row[None], params, PROMPT, out[:j], []) if active(params) else row[None] / params.temperature
            expected += token_log_probs(x, [out[j]])
        assert logps[i] == pytest.approx(expected, abs=1e-4)
        assert all(v > -math.inf for v in logps[i])


def test_probability_reads_the_same_float_as_torch_indexing() -> None:
    # the drafter scores plain steps on this value (Outcome.p_plain): the numpy read must equal torch's
    g = torch.Generator().manual_seed(3)
    p = distribution(torch.randn(2, 4096, generator=g) / 0.7, SamplingParams(temperature=0.7, top_p=0.9))
    for token in (0, 17, 4095, int(p[0].argmax())):
        assert probability(p, token) == float(p[0, token])
    strided = torch.randn(4096, 3, generator=g).softmax(0).t()     # a view, not contiguous
    assert probability(strided, 5) == float(strided[0, 5])


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1e-45}, {"frequency_penalty": -3e38},
                                     {"presence_penalty": -3.4e38}, {"repetition_penalty": 3e38, "frequency_penalty": 3e38}])
def test_an_extreme_penalty_gives_huge_logits_never_inf_or_nan(penalty):
    # inf logits made NaN probabilities: a garbage draw, and a NaN p(x) the drafter refused, which
    # turned speculation off for every request in flight
    p = SamplingParams(temperature=0.7, **penalty).validate()
    torch.manual_seed(0)
    rows = torch.randn(3, 50) * 10
    x = saguaro.logits.process(rows, p, prompt=[1, 2, 3], output=[4, 4], draft=[5, 6])
    assert torch.isfinite(x).all()
    q = saguaro.sampling.distribution(x, p)
    assert torch.isfinite(q).all() and torch.allclose(q.sum(-1), torch.ones(3))


@pytest.mark.parametrize("field,value", [("repetition_penalty", 1e-50), ("repetition_penalty", 1e39),
                                         ("presence_penalty", 1e39), ("frequency_penalty", -1e39),
                                         ("frequency_penalty", math.nan)])
def test_a_penalty_float32_cannot_hold_is_refused_naming_it(field, value):
    with pytest.raises(SaguaroError, match=f"{field}=.*float32"):
        SamplingParams(temperature=0.7, **{field: value}).validate()
