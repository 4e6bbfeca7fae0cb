"""The CPU bf16 path of the draft engine: oneDNN pre-packed linears and the dtype choice."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from saguaro.engines.torch_engine import resolve_dtype
from saguaro.model import PackedLinear, cpu_has_fast_bf16


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
    assert resolve_dtype("auto", "cpu", draft=True) == (torch.bfloat16 if cpu_has_fast_bf16() else torch.float32)
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("float32", "cpu", draft=True) == torch.float32


@pytest.mark.skipif(not cpu_has_fast_bf16(), reason="this CPU has no native bf16 matmul (AVX512-BF16 or AMX)")
def test_warm_up_leaves_results_unchanged():
    torch.manual_seed(0)
    lin = nn.Linear(64, 96, bias=False).to(torch.bfloat16).requires_grad_(False)
    packed = PackedLinear(lin)
    x = torch.randn(3, 70, 64, dtype=torch.bfloat16)
    before = packed(x)
    packed.warm(max_rows=256)        # every row count to 64, then the 64-row buckets to 256
    assert torch.equal(packed(x), before) and torch.equal(before, F.linear(x, lin.weight))
