"""Small random Hugging Face checkpoints for the core's tests (transformers is a test-only dependency).

`save_random_model` builds a Llama-family model with transformers itself, gives every weight a
random value of a chosen scale (norm weights and biases too, so q/k norms and qkv biases matter),
and saves it as a checkpoint our engine loads. It returns the fp32 transformers model, the
reference the engine's logits are compared with.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import torch

from saguaro.config import DEMO_TARGET


def hf_config(arch: str, **overrides):
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    base = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                bos_token_id=0, eos_token_id=0)
    if arch == "qwen2":        # qkv bias, GQA
        cfg = Qwen2Config(**{**base, **overrides})
    elif arch == "qwen3":      # q/k norm, head_dim independent of hidden/heads
        cfg = Qwen3Config(**{**base, "head_dim": 24, **overrides})
    elif arch == "llama":
        cfg = LlamaConfig(**{**base, **overrides})
    else:
        raise ValueError(arch)
    return cfg


def save_random_model(path: Path, arch: str = "llama", seed: int = 0, std: float = 0.25,
                      tokenizer: bool = True, **overrides):
    """Random-init checkpoint at `path` (config.json, model.safetensors[, tokenizer.json]); returns
    the transformers model in fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    cfg = hf_config(arch, **overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    path = Path(path)
    model.save_pretrained(path, safe_serialization=True)
    if tokenizer:
        shutil.copy(DEMO_TARGET / "tokenizer.json", path / "tokenizer.json")
    return model


@torch.no_grad()
def hf_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), vocab] fp32 logits of a full forward without cache."""
    return model(torch.tensor([tokens]), use_cache=False).logits[0].float()
