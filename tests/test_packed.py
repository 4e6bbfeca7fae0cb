"""The CPU bf16 path of the draft engine: oneDNN pre-packed linears and the dtype choice."""
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saguaro.engines.torch_engine import resolve_dtype
from saguaro.model import PackedLinear, cpu_has_fast_bf16, fbgemm_fp16_available


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16 matmul (AVX512-BF16 or AMX)")
@pytest.mark.parametrize("rows", [1, 8, 64, 100, 300])   # the last two are padded to 64-row buckets
def test_packed_linear_equals_linear(rows):
    torch.manual_seed(0)
    lin = nn.Linear(192, 320, bias=True).to(torch.bfloat16).requires_grad_(False)
    x = torch.randn(1, rows, 192, dtype=torch.bfloat16)
    assert torch.equal(PackedLinear(lin)(x), F.linear(x, lin.weight, lin.bias))


def test_auto_dtype():
    # the target's greedy output must not depend on how many tokens a forward carries: fp32
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cpu", draft=True) == (
        torch.bfloat16 if cpu_has_fast_bf16() and not fbgemm_fp16_available() else torch.float32)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float32", "cpu") == torch.float32


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16 matmul (AVX512-BF16 or AMX)")
def test_warm_up_leaves_results_unchanged():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False)
    packed = PackedLinear(lin)
    x = torch.randn(3, 70, 64, dtype=torch.bfloat16)
    before = packed(x)
    packed.warm(max_rows=256)        # every row count to 64, then the 64-row buckets to 256
    assert torch.equal(packed(x), before) and torch.equal(before, F.linear(x, lin.weight))


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16 matmul (AVX512-BF16 or AMX)")
def test_a_draft_engine_runs_few_rows_in_fp32_and_many_in_bf16():
    """A draft's forward of a few rows is bound by per-op cost, where fp32 on fp16-held weights beat
    bf16 (bf16 attention alone cost 5x fp32's at one row); one of many rows (a prompt, a catch-up)
    is bound by arithmetic, where native bf16 is faster. A target keeps fp32 for both: its
    numerics are the output's."""
    from saguaro.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig
    from saguaro.engines.torch_engine import TorchEngine
    from saguaro.model import FEW_ROWS_ONE_THREAD, HalfWeightLinear

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = EngineConfig(checkpoint=str(DEMO_DRAFT), max_slots=2, max_seq_len=128, max_branches=8, threads=1)
        draft, reference = TorchEngine(cfg, branches=True), TorchEngine(replace(cfg, dtype="float32"), branches=True)
        layers = [m for m in draft.model.modules() if isinstance(m, HalfWeightLinear)]
        plain = [m for m in reference.model.modules() if isinstance(m, nn.Linear)]
        assert draft.model.embed.weight.dtype == torch.float32 and len(layers) == len(plain) == draft.half_weights[0] == 5
        torch.manual_seed(0)
        for layer, fp32 in zip(layers, plain):
            assert isinstance(layer.many, PackedLinear) and layer.many.weight.dtype == torch.bfloat16
            assert layer.weight is None                          # the fp32 weight is not kept
            few, many = torch.randn(1, 3, fp32.in_features), torch.randn(1, 100, fp32.in_features)
            assert torch.allclose(layer(few), fp32(few), atol=1e-5)                            # FBGEMM, fp32 math
            assert torch.equal(layer(many), layer.many(many.bfloat16()).float())              # oneDNN, bf16
        assert FEW_ROWS_ONE_THREAD < 100
        prompt = torch.randint(draft.vocab_size, (100,), generator=torch.Generator().manual_seed(1)).tolist()
        ours, ref = (e.forward([e.allocate()], [prompt])[0] for e in (draft, reference))
        assert (ours - ref).abs().max() < 0.15 and (ours.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95
        target = TorchEngine(replace(cfg, checkpoint=str(DEMO_TARGET)))
        assert all(m.many is None and m.weight is not None
                   for m in target.model.modules() if isinstance(m, HalfWeightLinear))
    finally:
        torch.set_num_threads(threads)


def test_a_draft_without_fbgemm_stays_in_bf16_where_the_cpu_has_it(monkeypatch):
    """Without FBGEMM a draft's weights cannot be held in fp16 for its few rows: bf16 throughout,
    where the CPU has native bf16; fp32 elsewhere. A target is fp32 either way."""
    from saguaro.engines import torch_engine

    monkeypatch.setattr(torch_engine, "fbgemm_fp16_available", lambda: False)
    for fast_bf16 in (True, False):
        monkeypatch.setattr(torch_engine, "cpu_has_fast_bf16", lambda: fast_bf16)
        assert resolve_dtype("auto", "cpu", draft=True) == (torch.bfloat16 if fast_bf16 else torch.float32)
        assert resolve_dtype("auto", "cpu") == torch.float32
