"""The PyTorch engine against transformers (fp32 logit parity, max abs diff <= 1e-4; the demo target
also with its weights held in fp16, the CPU default) and its KV-slot
contract: chunked prefill, batched forwards of slots with different lengths, truncate (rollback),
slot reuse, slot exhaustion, and branch decoding with tree attention off one or two parents."""
from __future__ import annotations

import os
import threading

import pytest
import torch

from saguaro.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig
from saguaro.engines import torch_engine
from saguaro.engines.torch_engine import TorchEngine
from saguaro.errors import SaguaroError
from tiny_models import hf_logits, save_random_model

ATOL = 1e-4
MAX_SLOTS = 6

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               # small enough that the 64-token test sequences cross the scaled/smoothed bands
               "original_max_position_embeddings": 16, "rope_theta": 10000.0}
RANDOM_MODELS = {
    "qwen2-bias": dict(arch="qwen2", seed=1),
    "qwen3-qknorm": dict(arch="qwen3", seed=2),
    "llama-tied-gqa-llama3": dict(arch="llama", seed=3, tie_word_embeddings=True, num_attention_heads=8,
                                  num_key_value_heads=2, rope_parameters=LLAMA3_ROPE),
}


class Pair:
    """Our engine and the transformers model over one checkpoint."""

    def __init__(self, path, hf, dtype="float32"):
        self.hf, self.path = hf, path
        self.engine = TorchEngine(EngineConfig(checkpoint=str(path), dtype=dtype, max_slots=MAX_SLOTS,
                                               max_seq_len=64, max_draft_len=4, max_branches=8, threads=1),
                                  branches=True)
        self.vocab = self.engine.vocab_size
        self.gen = torch.Generator().manual_seed(1234)

    def tokens(self, n: int) -> list[int]:
        return torch.randint(self.vocab, (n,), generator=self.gen).tolist()

    def ref(self, tokens: list[int]) -> torch.Tensor:
        return hf_logits(self.hf, tokens)

    def fresh(self) -> int:
        """A clean slot: every test starts from an engine with nothing allocated."""
        e = self.engine
        for s in range(e.max_slots):
            e.release(s)
        assert e.active_slots == 0
        return e.allocate()


@pytest.fixture(scope="module", params=["demo-target", "demo-target-fp16-weights", "demo-draft", *RANDOM_MODELS])
def pair(request, tmp_path_factory) -> Pair:
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(1)
    name = request.param
    if name.startswith("demo"):
        path = DEMO_DRAFT if name == "demo-draft" else DEMO_TARGET
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        if name.endswith("fp16-weights"):      # the CPU default: fp32 math, weights held in fp16 (exactly)
            with pytest.MonkeyPatch.context() as m:   # a target's, also where draft engines take bf16
                m.setattr(torch_engine, "cpu_has_fast_bf16", lambda: False)
                pair = Pair(path, hf, dtype="auto")
            assert pair.engine.half_weights == (4 * 4 + 1, 0)
            return pair
    else:
        path = tmp_path_factory.mktemp(name)
        hf = save_random_model(path, **RANDOM_MODELS[name])
    return Pair(path, hf)


def assert_close(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
    diff = (ours - ref).abs().max().item()
    assert diff <= ATOL, f"{what}: max abs logit diff {diff:.2e} > {ATOL}"


def test_random_configs_load_what_they_claim(tmp_path):
    """The random checkpoints really exercise the features the parity tests are about."""
    from saguaro.model import ModelArgs

    for name, kw in RANDOM_MODELS.items():
        save_random_model(tmp_path / name, **kw)
        a = ModelArgs.from_hf(tmp_path / name)
        if name.startswith("qwen2"):
            assert a.qkv_bias and not a.qk_norm
        if name.startswith("qwen3"):
            assert a.qk_norm and a.head_dim * a.n_heads != a.dim
        if name.startswith("llama"):
            assert a.tie_embeddings and a.n_kv_heads < a.n_heads
            assert a.rope_scaling and a.rope_scaling["rope_type"] == "llama3"
            assert not (tmp_path / name / "config.json").read_text().count("lm_head")


def test_prefill_matches_transformers(pair):
    e, toks = pair.engine, pair.tokens(40)
    ref = pair.ref(toks)
    slot = pair.fresh()
    assert_close(e.forward([slot], [toks])[0], ref, "one-chunk prefill")
    assert e.length(slot) == 40
    # the same sequence in two chunks, then token-by-token decode
    slot2 = e.allocate()
    first = e.forward([slot2], [toks[:23]])[0]
    second = e.forward([slot2], [toks[23:36]])[0]
    assert_close(torch.cat([first, second]), ref[:36], "two-chunk prefill")
    for i in range(36, 40):
        assert_close(e.forward([slot2], [[toks[i]]])[0], ref[i:i + 1], f"decode at position {i}")
    assert e.forward([slot2], [[1, 2]], logits=False) == []
    assert e.length(slot2) == 42


def test_batched_forward_of_slots_with_different_lengths(pair):
    e = pair.engine
    seqs = [pair.tokens(n) for n in (30, 24, 26, 12)]
    cached = [6, 13, 20, 1]           # prefilled lengths: all different
    counts = [5, 1, 3, 8]             # tokens in the batched step: all different
    slots = [pair.fresh()] + [e.allocate() for _ in seqs[1:]]
    for s, toks, n in zip(slots, seqs, cached):
        e.forward([s], [toks[:n]], logits=False)
    out = e.forward(slots, [toks[n:n + c] for toks, n, c in zip(seqs, cached, counts)])
    for i, (toks, n, c) in enumerate(zip(seqs, cached, counts)):
        assert e.length(slots[i]) == n + c
        assert_close(out[i], pair.ref(toks[:n + c])[n:], f"batched slot {i}")
    # a second batched step (single-token decode for some, more for others) on top of the first
    counts2 = [1, 4, 1, 1]
    out = e.forward(slots, [toks[n + c:n + c + d] for toks, n, c, d in zip(seqs, cached, counts, counts2)])
    for i, (toks, n, c, d) in enumerate(zip(seqs, cached, counts, counts2)):
        assert_close(out[i], pair.ref(toks[:n + c + d])[n + c:], f"second batched step, slot {i}")
    # a batched step on a subset of slots, in a different order, leaves the others alone
    sub = [slots[2], slots[0]]
    before = e.length(slots[1])
    a, b = seqs[2], seqs[0]
    la, lb = e.length(slots[2]), e.length(slots[0])
    out = e.forward(sub, [[a[la]], b[lb:lb + 2]])
    assert_close(out[0], pair.ref(a[:la + 1])[la:], "subset batch, slot 2")
    assert_close(out[1], pair.ref(b[:lb + 2])[lb:], "subset batch, slot 0")
    assert e.length(slots[1]) == before == 18
    c1 = seqs[1]
    assert_close(e.forward([slots[1]], [c1[18:20]])[0], pair.ref(c1[:20])[18:], "slot left out of the subset batch")


def test_consecutive_slots_read_the_cache_as_slices_in_any_order(pair, monkeypatch):
    """A batch whose slots are consecutive, in whatever order it names them, reads the cache as
    one slice (no gather of every slot's keys and values per layer) and answers in its own order,
    with the logits the gather gives; other batches gather."""
    e = pair.engine
    first = pair.fresh()
    slots = [first] + [e.allocate() for _ in range(3)]
    assert sorted(slots) == list(range(min(slots), min(slots) + 4))
    seqs = [pair.tokens(n) for n in (20, 14, 17, 9)]
    for s, toks in zip(slots, seqs):
        e.forward([s], [toks[:-2]], logits=False)
    named = [slots[2], slots[0], slots[3], slots[1]]
    feeds = {s: toks[-2:] for s, toks in zip(slots, seqs)}
    gathered = e._gather_view
    monkeypatch.setattr(e, "_gather_view", lambda *a: pytest.fail("consecutive slots were gathered"))
    out = e.forward(named, [feeds[s] for s in named])
    for s, x in zip(named, out):
        toks = seqs[slots.index(s)]
        assert_close(x, pair.ref(toks)[-2:], f"slot {s}")
        e.truncate(s, len(toks) - 2)
    monkeypatch.setattr(e, "_gather_view", gathered)
    calls = []
    monkeypatch.setattr(e, "_gather_view", lambda *a: calls.append(a) or gathered(*a))
    apart = [max(slots), min(slots)]                  # 3 apart
    again = e.forward(apart, [feeds[s] for s in apart])
    assert calls, "slots that are not consecutive are gathered"
    for s, x in zip(apart, again):
        assert torch.equal(x, out[named.index(s)])


def test_truncate_then_reforward_equals_fresh_computation(pair):
    e = pair.engine
    a, rejected, c = pair.tokens(12), pair.tokens(5), pair.tokens(6)
    slot = pair.fresh()
    e.forward([slot], [a + rejected])
    e.truncate(slot, 12)
    assert e.length(slot) == 12
    assert_close(e.forward([slot], [c])[0], pair.ref(a + c)[12:], "re-forward after truncate")
    # rollback in the middle of a batched verify: one slot keeps 2 of 4 speculated tokens
    other = e.allocate()
    b = pair.tokens(9)
    e.forward([other], [b[:5]])
    spec_a, spec_b = pair.tokens(4), pair.tokens(4)
    e.forward([slot, other], [spec_a, spec_b])
    e.truncate(slot, 18 + 2)
    e.truncate(other, 5)
    x, y = pair.tokens(3), pair.tokens(2)
    out = e.forward([slot, other], [x, y])
    assert_close(out[0], pair.ref(a + c + spec_a[:2] + x)[20:], "batched re-forward after partial rollback")
    assert_close(out[1], pair.ref(b[:5] + y)[5:], "batched re-forward after full rollback")
    e.truncate(slot, 100)                       # truncate never grows a slot
    assert e.length(slot) == 23


def test_release_allocate_reuse_and_exhaustion(pair):
    e = pair.engine
    slot = pair.fresh()
    e.forward([slot], [pair.tokens(20)])
    held = [slot] + [e.allocate() for _ in range(MAX_SLOTS - 1)]
    assert sorted(held) == list(range(MAX_SLOTS)) and e.active_slots == MAX_SLOTS
    with pytest.raises(SaguaroError, match="KV slots"):
        e.allocate()
    e.release(slot)
    e.release(slot)                             # releasing a free slot is a no-op
    assert e.active_slots == MAX_SLOTS - 1
    again = e.allocate()
    assert again == slot and e.length(again) == 0
    toks = pair.tokens(11)
    assert_close(e.forward([again], [toks])[0], pair.ref(toks), "reused slot (stale KV must not leak in)")
    for s in held:
        e.release(s)
    assert e.active_slots == 0


def _branch_round(pair: Pair, parents: list[int], visible: list[int], seqs: dict[int, list[int]],
                  depths: int) -> None:
    """Run `depths` branch steps with random fed tokens and check every branch's logits against a
    plain forward of prefix[:visible] + its own tokens."""
    e = pair.engine
    n = len(parents)
    fed = [pair.tokens(depths) for _ in range(n)]
    lengths = {p: e.length(p) for p in set(parents)}
    snapshot = {p: (e.k_cache[:, p, :lengths[p]].clone(), e.v_cache[:, p, :lengths[p]].clone()) for p in set(parents)}
    refs = [pair.ref(seqs[p][:v] + f) for p, v, f in zip(parents, visible, fed)]
    pt, vt = torch.tensor(parents), torch.tensor(visible)
    for d in range(depths):
        out = e.branch_step(pt, vt, torch.tensor([f[d] for f in fed]), d)
        assert out.shape == (n, pair.vocab)
        for i in range(n):
            assert_close(out[i], refs[i][visible[i] + d],
                         f"branch {i} (parent {parents[i]}, visible {visible[i]}) at depth {d}")
    for p in set(parents):        # parents untouched: same length, same cached K/V bit for bit
        assert e.length(p) == lengths[p]
        assert torch.equal(e.k_cache[:, p, :lengths[p]], snapshot[p][0])
        assert torch.equal(e.v_cache[:, p, :lengths[p]], snapshot[p][1])


def test_branch_step_off_one_parent(pair):
    e = pair.engine
    slot = pair.fresh()
    seq = pair.tokens(40)
    e.forward([slot], [seq[:14]])
    # branches at several depths into the cached prefix, two sharing a visible length
    _branch_round(pair, [slot] * 5, [14, 14, 13, 10, 1], {slot: seq}, depths=4)
    # the parent then decodes on as if no branch had run
    out = e.forward([slot], [seq[14:17]])[0]
    assert_close(out, pair.ref(seq[:17])[14:], "parent forward after branches")
    # a new round reuses the scratch: results are still right (depth 0 resets it)
    _branch_round(pair, [slot] * 8, [17, 16, 15, 15, 12, 9, 3, 17], {slot: seq}, depths=3)
    _branch_round(pair, [slot], [17], {slot: seq}, depths=4)


def test_branch_step_off_two_parents(pair):
    e = pair.engine
    a_slot = pair.fresh()
    b_slot = e.allocate()
    third = e.allocate()          # a slot no branch uses, with a different length, stays intact
    seqs = {a_slot: pair.tokens(30), b_slot: pair.tokens(30), third: pair.tokens(30)}
    e.forward([a_slot, b_slot, third], [seqs[a_slot][:15], seqs[b_slot][:6], seqs[third][:9]])
    # interleaved parents, uneven branch counts (3 off a, 2 off b), several visible lengths each
    _branch_round(pair, [a_slot, b_slot, a_slot, b_slot, a_slot], [15, 6, 12, 4, 15], seqs, depths=4)
    # parents listed b first this time, and b with more branches than a
    _branch_round(pair, [b_slot, b_slot, a_slot, b_slot], [6, 5, 14, 2], seqs, depths=2)
    out = e.forward([a_slot, b_slot, third], [seqs[a_slot][15:16], seqs[b_slot][6:9], seqs[third][9:10]])
    assert_close(out[0], pair.ref(seqs[a_slot][:16])[15:], "parent a after branches")
    assert_close(out[1], pair.ref(seqs[b_slot][:9])[6:], "parent b after branches")
    assert_close(out[2], pair.ref(seqs[third][:10])[9:], "bystander slot after branches")


def test_branch_step_limits(pair):
    e = pair.engine
    slot = pair.fresh()
    e.forward([slot], [pair.tokens(5)])
    with pytest.raises(SaguaroError, match="max_branches"):
        e.branch_step(torch.tensor([slot] * 9), torch.tensor([5] * 9), torch.tensor([1] * 9), 0)
    e.branch_step(torch.tensor([slot]), torch.tensor([5]), torch.tensor([1]), 0)
    with pytest.raises(SaguaroError, match="max_draft_len"):
        e.branch_step(torch.tensor([slot]), torch.tensor([5]), torch.tensor([1]), 5)


def test_greedy_is_torch_argmax_first_of_ties():
    from saguaro.sampling import greedy
    torch.manual_seed(0)
    x = torch.randn(5, 4096)
    x[2, 7] = x[2, 9] = x[2].max() + 1          # a tie: the lower id wins, as with torch.argmax
    assert torch.equal(greedy(x), x.argmax(-1)) and int(greedy(x)[2]) == 7
    assert torch.equal(greedy(x[:, ::3]), x[:, ::3].argmax(-1))      # strided rows
    assert int(greedy(x[0])) == int(x[0].argmax())                   # one row
    assert torch.equal(greedy(x.bfloat16()), x.bfloat16().float().argmax(-1))


def test_fp16_weights_are_held_exactly_or_not_at_all():
    """A weight is packed for FBGEMM only when fp16 holds every entry exactly, scaled by a power of
    two: a one-hot input row reads one weight column back, so the layer must return the weights
    themselves (plus the bias), bit for bit, on the fp16 path (few rows) and the fp32 one (many)."""
    from torch import nn

    from saguaro.model import FEW_ROWS, HalfWeightLinear, fbgemm_fp16_available

    if not fbgemm_fp16_available():
        pytest.skip("this CPU or torch build has no FBGEMM")
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(40, 24, bias=True)
    with torch.no_grad():
        w = torch.randn(24, 40, generator=g).bfloat16().float()   # what a bf16 checkpoint holds
        w[0, 0], w[1, 1] = 1.5 * 2.0 ** -26, -1.75 * 2.0 ** -30    # below fp16's range unless scaled
        linear.weight.copy_(w)
        linear.bias.copy_(torch.randn(24, generator=g).bfloat16().float())
    half = HalfWeightLinear.lossless(linear)
    assert half is not None and half.unscale is not None
    eye = torch.eye(40)
    for rows in (1, 3, FEW_ROWS):
        assert torch.equal(half(eye[:rows]), w.t()[:rows] + linear.bias), f"{rows} rows"
    assert torch.equal(half(eye), w.t() + linear.bias)                  # 40 rows: the fp32 weight
    x = torch.randn(2, 3, 40, generator=g)
    ref = (x.double() @ w.double().t() + linear.bias.double()).float()
    assert torch.allclose(half(x), ref, atol=1e-5) and half(x).shape == (2, 3, 24)

    lossy = nn.Linear(40, 24, bias=False)       # fp32 weights with 24-bit mantissas: kept as they are
    assert HalfWeightLinear.lossless(lossy) is None
    with torch.no_grad():
        lossy.weight.copy_(w)
        lossy.weight[2, 2] = 2.0 ** -45            # 2^41 below the largest entry: more than fp16 spans
    assert HalfWeightLinear.lossless(lossy) is None


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two cores")
def test_forwards_on_the_targets_threads_keep_off_the_drafts_core():
    """The scheduler put the target's one thread on the draft's core after rounds on every core,
    and a draft woken there took the core from it; forwards on every core still use it."""
    cores = os.sched_getaffinity(0)
    draft_core = max(cores)
    engine = TorchEngine(EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=2, max_seq_len=64, threads=1,
                                      prefill_threads=len(cores), draft_core=draft_core))
    seen = {}

    def decode():                   # on a thread of its own: placement is per thread
        slot = engine.allocate()
        engine.forward([slot], [[1, 2, 3]], logits=False)      # a prefill (every core), then
        engine.forward([slot], [[4]])                           # a verify on the target's threads
        seen["narrow"] = os.sched_getaffinity(0)
        engine.use_all_cores(True)
        engine.forward([slot], [[5]])
        seen["wide"] = os.sched_getaffinity(0)

    t = threading.Thread(target=decode)
    t.start()
    t.join()
    assert seen == {"narrow": cores - {draft_core}, "wide": cores}
    assert os.sched_getaffinity(0) == cores                     # other threads stay where they were
