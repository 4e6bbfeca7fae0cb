"""A compact Llama-family decoder (Llama 2/3, Mistral, Qwen2/2.5, Qwen3) over an explicit KV cache.

gpt-fast style: one module per concept, fused projections (one matmul for q/k/v, one for
gate/up) because on CPU a small model's forward costs per op more than per FLOP. The cache is
owned by the caller (the engine) and passed in as tensors; the model only reads and writes the
positions it is told to.
"""
from __future__ import annotations

import copy
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from saguaro.errors import SaguaroError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    qkv_bias: bool          # Qwen2/2.5
    qk_norm: bool           # Qwen3
    tie_embeddings: bool

    @classmethod
    def from_hf(cls, checkpoint_dir: str | Path) -> "ModelArgs":
        path = Path(checkpoint_dir) / "config.json"
        if not path.is_file():
            raise SaguaroError(f"no config.json in {checkpoint_dir}: point the engine at a Hugging Face checkpoint folder")
        c = json.loads(path.read_text())
        arch = (c.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise SaguaroError(f"{checkpoint_dir}: architecture {arch} is not supported; use one of {', '.join(SUPPORTED_ARCHITECTURES)}")
        # transformers >= 5 nests rope settings under rope_parameters; older configs keep them flat.
        rope = dict(c.get("rope_parameters") or c.get("rope_scaling") or {})
        rope_theta = float(rope.pop("rope_theta", c.get("rope_theta", 10000.0)))
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        n_heads = c["num_attention_heads"]
        return cls(
            vocab_size=c["vocab_size"], dim=c["hidden_size"], n_layers=c["num_hidden_layers"],
            n_heads=n_heads, n_kv_heads=c.get("num_key_value_heads") or n_heads,
            head_dim=c.get("head_dim") or c["hidden_size"] // n_heads,
            intermediate_size=c["intermediate_size"], norm_eps=c.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta, rope_scaling=None if rope_type == "default" else rope,
            max_position_embeddings=c.get("max_position_embeddings", 4096),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(c.get("attention_bias", False)),
            qk_norm=arch == "Qwen3ForCausalLM",
            tie_embeddings=bool(c.get("tie_word_embeddings", False)),
        )


def rope_tables(args: ModelArgs, max_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of shape [max_len, head_dim] (the half-rotation layout HF checkpoints use)."""
    d = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    attention_factor = 1.0
    scaling = args.rope_scaling
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type"))
        factor = float(scaling.get("factor", 1.0))
        if kind == "linear":
            inv_freq = inv_freq / factor
        elif kind == "llama3":
            low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
            old_len = scaling.get("original_max_position_embeddings", 8192)
            wavelen = 2 * math.pi / inv_freq
            smooth = ((old_len / wavelen) - low) / (high - low)
            scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
            middle = (wavelen <= old_len / low) & (wavelen >= old_len / high)
            inv_freq = torch.where(middle, (1 - smooth) * inv_freq / factor + smooth * inv_freq, scaled)
        elif kind == "yarn":
            old_len = scaling.get("original_max_position_embeddings", args.max_position_embeddings)
            beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)
            dim_of = lambda rot: d * math.log(old_len / (rot * 2 * math.pi)) / (2 * math.log(args.rope_theta))
            low, high = max(math.floor(dim_of(beta_fast)), 0), min(math.ceil(dim_of(beta_slow)), d - 1)
            ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / max(high - low, 1e-3)).clamp(0, 1)
            inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)
            attention_factor = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0)
        else:
            raise SaguaroError(f"rope_scaling type {kind!r} is not supported; supported: linear, llama3, yarn")
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    sin = angles.sin() * attention_factor
    # The rotation's sign lives in the table: apply_rope then swaps halves without negating one.
    signed_sin = torch.cat([-sin, sin], dim=-1)
    return (torch.cat([angles, angles], dim=-1).cos() * attention_factor).float(), signed_sin.float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, T, heads, head_dim]; cos/sin: [N, T, head_dim], sin's first half negated (rope_tables)."""
    half = x.shape[-1] // 2
    return x * cos.unsqueeze(2) + torch.cat([x[..., half:], x[..., :half]], dim=-1) * sin.unsqueeze(2)


class PackedLinear(nn.Module):
    """nn.Linear with its weight pre-packed for oneDNN: bf16 matmuls on CPUs with native bf16
    (AVX512-BF16, AMX) run 3-4x faster than fp32 ones at the few-row shapes decoding uses."""

    BUCKET = 64

    def __init__(self, linear: nn.Linear, warm_rows: int = 0, min_rows: int = 1):
        super().__init__()
        self.in_features = linear.in_features
        self.weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), None)
        self.bias = None if linear.bias is None else linear.bias.detach()
        if warm_rows:
            self.warm(warm_rows, min_rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows <= self.BUCKET:
            return self._linear(x.contiguous())
        # oneDNN generates a kernel for every new row count (about 0.3 ms each), and prompts come in
        # every length: pad them to a multiple of BUCKET rows so a few kernels serve them all.
        flat = F.pad(x.reshape(rows, x.shape[-1]), (0, 0, 0, -rows % self.BUCKET))
        return self._linear(flat)[:rows].view(*x.shape[:-1], -1)

    def _linear(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    @torch.inference_mode()
    def warm(self, max_rows: int, min_rows: int = 1) -> None:
        """Generate the kernels of every row count from min_rows up to max_rows now: the first call
        with a new count costs several times a warm one, and would otherwise land on a request's
        first round (a new prompt's prefill, a new batch size)."""
        for rows in [*range(min_rows, self.BUCKET + 1), *range(2 * self.BUCKET, max_rows + self.BUCKET, self.BUCKET)]:
            self.forward(torch.zeros(rows, self.in_features, dtype=torch.bfloat16))


def replace_linears(module: nn.Module, make) -> tuple[int, int]:
    """Replace every nn.Linear inside module by make(linear) where that returns a module (None:
    keep it); returns (layers replaced, layers kept)."""
    replaced = kept = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            new = make(child)
            if new is None:
                kept += 1
            else:
                setattr(module, name, new)
                replaced += 1
        else:
            r, k = replace_linears(child, make)
            replaced, kept = replaced + r, kept + k
    return replaced, kept


def pack_linears(module: nn.Module, warm_rows: int = 0) -> None:
    """Replace every nn.Linear by a PackedLinear, its kernels generated for up to warm_rows rows."""
    replace_linears(module, lambda linear: PackedLinear(linear, warm_rows))


class HalfWeightLinear(nn.Module):
    """nn.Linear in fp32 with a copy of its weight held in fp16 for FBGEMM's fp16-weight GEMM, used
    for forwards of a few rows. Those are bound by reading the weights from memory: FBGEMM reads
    half the bytes, once for all rows, where MKL's fp32 GEMM reads them again per row at 2-5 rows.
    On the demo target (2 vCPUs) a 1-token forward went from 6.8 to 5.3 ms and a 3-token verify
    from 11.2 to 6.7 ms (docs/design.md, "The engine on CPU"). Many rows (a prompt's prefill) are
    bound by arithmetic, which MKL does faster and on every thread: they keep the fp32 weight (a
    draft's, on a CPU with native bf16, a bf16 copy instead: `lossless`).

    Lossless: the weight is scaled by a power of two that brings its largest entry near fp16's
    maximum, and packed only when every scaled entry converts to fp16 and back unchanged (a
    bfloat16 checkpoint's weights do, 8 significant bits against fp16's 11, unless a layer's
    entries span more than fp16's range; the demo pair's all do). Products and sums stay fp32
    and scaling by a power of two is exact in floating point, so the output is the fp32 layer's up
    to summation order, the freedom any other fp32 kernel has too."""

    def __init__(self, linear: nn.Linear, packed: torch.Tensor, scale: float, many: "PackedLinear | None" = None):
        super().__init__()
        # with a bf16 copy for many rows the fp32 weight is never read again: not kept
        self.weight = linear.weight if many is None else None
        self.bias, self.packed = linear.bias, packed
        self.packed_bias = None if linear.bias is None else linear.bias.detach() * scale
        self.unscale = None if scale == 1.0 else torch.tensor(1.0 / scale)
        self.many = many

    @classmethod
    def lossless(cls, linear: nn.Linear, many_rows: int = 0) -> "HalfWeightLinear | None":
        """The layer with its weight also packed, or None when fp16 cannot hold the weight exactly.
        many_rows > 0: forwards of many rows run in bf16 on a oneDNN-packed copy (`PackedLinear`)
        whose kernels are generated for up to many_rows rows, for a draft engine, whose numerics
        never change the output: a prompt's prefill or a catch-up is bound by arithmetic, which
        native bf16 does ~1.6x faster than fp32."""
        w = linear.weight.detach()
        if w.dtype != torch.float32 or not w.numel() or not torch.isfinite(w).all():
            return None
        top = float(w.abs().max())
        scale = 1.0 if top == 0 else 2.0 ** math.floor(math.log2(FP16_MAX / top))
        scaled = w * scale
        if not torch.equal(scaled.half().float(), scaled):
            return None
        with warnings.catch_warnings():   # deprecated in favour of torchao, which is not a dependency
            warnings.simplefilter("ignore")
            try:
                packed = torch.fbgemm_pack_gemm_matrix_fp16(scaled)
                # warns once per process, at the first call: that call is made here
                torch.fbgemm_linear_fp16_weight_fp32_activation(torch.zeros(1, w.shape[1]), packed, None)
            except RuntimeError:          # "Your CPU does not support FBGEMM."
                return None
        # fewer than FEW_ROWS + 1 rows never reach the copy: their kernels are not generated
        many = PackedLinear(copy.deepcopy(linear).to(torch.bfloat16), many_rows, FEW_ROWS + 1) if many_rows else None
        return cls(linear, packed, scale, many)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // x.shape[-1]
        if rows > (FEW_ROWS_ONE_THREAD if torch.get_num_threads() == 1 else FEW_ROWS):
            if self.many is not None:
                return self.many(x.to(torch.bfloat16)).to(x.dtype)
            return F.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, x.shape[-1])
        if not flat.is_contiguous():
            flat = flat.contiguous()
        y = torch.fbgemm_linear_fp16_weight_fp32_activation(flat, self.packed, self.packed_bias)
        if self.unscale is not None:
            y.mul_(self.unscale)
        return y.view(*x.shape[:-1], y.shape[-1])


FP16_MAX = 32768.0      # a power of two below fp16's largest value (65504)
# Rows up to which the fp16 weights are faster (measured, the demo target's layers on 2 vCPUs):
# FBGEMM runs on one thread, MKL's fp32 GEMM on all of them, and from ~20 rows on two threads
# (~64 on one) arithmetic outweighs reading the weights.
FEW_ROWS, FEW_ROWS_ONE_THREAD = 16, 48


def hold_weights_in_fp16(module: nn.Module, many_rows: int = 0) -> tuple[int, int]:
    """Replace every fp32 nn.Linear whose weight fp16 holds exactly by a HalfWeightLinear; returns
    (layers packed, layers left in fp32). Nothing changes where this CPU has no FBGEMM.
    many_rows > 0 (a draft's, where the CPU has native bf16): many-row forwards in bf16, for up
    to many_rows rows (`HalfWeightLinear.lossless`)."""
    if not fbgemm_fp16_available():
        return replace_linears(module, lambda linear: None)
    return replace_linears(module, lambda linear: HalfWeightLinear.lossless(linear, many_rows))


def fbgemm_fp16_available() -> bool:
    """This torch was built with FBGEMM and this CPU runs it (AVX2 or later)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch, "fbgemm_pack_gemm_matrix_fp16") \
        and torch.backends.cpu.get_cpu_capability() != "DEFAULT"


def cpu_has_fast_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.q_size, self.kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.qkv = nn.Linear(args.dim, self.q_size + 2 * self.kv_size, bias=args.qkv_bias)
        self.o = nn.Linear(self.q_size, args.dim, bias=False)
        if args.qk_norm:
            self.q_norm, self.k_norm = RMSNorm(args.head_dim, args.norm_eps), RMSNorm(args.head_dim, args.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: "CacheView") -> torch.Tensor:
        a = self.args
        n, t, _ = x.shape
        qk, v = self.qkv(x).split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = qk.view(n, t, a.n_heads + a.n_kv_heads, a.head_dim)   # q's heads, then k's
        v = v.view(n, t, a.n_kv_heads, a.head_dim)
        if a.qk_norm:
            q, k = qk.split([a.n_heads, a.n_kv_heads], dim=2)
            qk = torch.cat([self.q_norm(q), self.k_norm(k)], dim=2)
        # one rotation for q and k together: a small model's forward costs per op
        q, k = apply_rope(qk, cos, sin).split([a.n_heads, a.n_kv_heads], dim=2)
        keys, values = cache.update(k, v)        # [N', L, kv_heads, head_dim]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
            attn_mask=cache.mask, enable_gqa=a.n_kv_heads != a.n_heads)
        return self.o(out.transpose(1, 2).reshape(n, t, self.q_size))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_up = nn.Linear(args.dim, 2 * args.intermediate_size, bias=False)
        self.down = nn.Linear(args.intermediate_size, args.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.attn_norm, self.mlp_norm = RMSNorm(args.dim, args.norm_eps), RMSNorm(args.dim, args.norm_eps)
        self.attn, self.mlp = Attention(args), MLP(args)

    def forward(self, x, cos, sin, cache):
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.mlp(self.mlp_norm(x))


class CacheView:
    """Where one forward reads and writes KV, set up once per forward by the engine and handed to
    every layer in turn (`layer` advances). `write(layer, k, v)` stores the new entries and
    returns the keys/values attention reads; `mask` is the boolean attention mask for them."""

    def __init__(self, write, mask: torch.Tensor | None):
        self._write, self.mask, self.layer = write, mask, 0

    def update(self, k: torch.Tensor, v: torch.Tensor):
        out = self._write(self.layer, k, v)
        self.layer += 1
        return out


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        # given its (empty) weight: Embedding's own random init imports torch._dynamo, ~1.5 s of
        # every engine's start; the checkpoint's weights replace it (from_hf)
        self.embed = nn.Embedding(args.vocab_size, args.dim, _weight=torch.empty(args.vocab_size, args.dim))
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: CacheView,
                logits_from: int = 0) -> torch.Tensor:
        """tokens [N, T] -> float32 logits [N, T - logits_from, vocab]."""
        x = self.embed(tokens)
        for layer in self.layers:
            x = layer(x, cos, sin, cache)
        return self.lm_head(self.norm(x[:, logits_from:])).float()

    @classmethod
    def from_hf(cls, checkpoint_dir: str | Path, dtype: torch.dtype, device: str) -> "Transformer":
        args = ModelArgs.from_hf(checkpoint_dir)
        files = sorted(Path(checkpoint_dir).glob("*.safetensors"))
        if not files:
            raise SaguaroError(f"no *.safetensors in {checkpoint_dir}: convert the checkpoint with save_pretrained(safe_serialization=True)")
        hf: dict[str, torch.Tensor] = {}
        for f in files:
            hf.update(load_file(f))
        with torch.device("meta"):
            model = cls(args)
        model.load_state_dict(_from_hf_names(hf, args), assign=True, strict=True)
        return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def _from_hf_names(hf: dict[str, torch.Tensor], args: ModelArgs) -> dict[str, torch.Tensor]:
    """Map HF tensor names to ours, fusing q/k/v and gate/up."""
    def take(name: str) -> torch.Tensor:
        if name not in hf:
            raise SaguaroError(f"checkpoint lacks tensor {name}: is it a {', '.join(SUPPORTED_ARCHITECTURES)} checkpoint?")
        return hf[name]

    sd = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    sd["lm_head.weight"] = sd["embed.weight"] if args.tie_embeddings or "lm_head.weight" not in hf else hf["lm_head.weight"]
    for i in range(args.n_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "attn.qkv.weight"] = torch.cat([take(p + f"self_attn.{x}_proj.weight") for x in "qkv"])
        if args.qkv_bias:
            sd[o + "attn.qkv.bias"] = torch.cat([take(p + f"self_attn.{x}_proj.bias") for x in "qkv"])
        if args.qk_norm:
            sd[o + "attn.q_norm.weight"] = take(p + "self_attn.q_norm.weight")
            sd[o + "attn.k_norm.weight"] = take(p + "self_attn.k_norm.weight")
        sd[o + "attn.o.weight"] = take(p + "self_attn.o_proj.weight")
        sd[o + "mlp.gate_up.weight"] = torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")])
        sd[o + "mlp.down.weight"] = take(p + "mlp.down_proj.weight")
        sd[o + "attn_norm.weight"] = take(p + "input_layernorm.weight")
        sd[o + "mlp_norm.weight"] = take(p + "post_attention_layernorm.weight")
    return sd
