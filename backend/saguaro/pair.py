"""Draft/target pair validation, from the checkpoints' JSON files alone.

Speculative decoding is only exact and only fast when both models speak the same vocabulary: the
target verifies draft token ids against its own distribution over the same ids. What must match is
the tokenizer; the embedding tables may be padded to different sizes (Qwen2.5-7B has 152064 rows,
Qwen2.5-0.5B 151936, one tokenizer), and verification then runs over the ids both have. The mistakes
below are the most common open complaints against NVIDIA's speculative setup, so they are
checked before any engine is built or loaded, with a message naming the fix. Plain json and
hashlib only: the core calls this at startup.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from saguaro.errors import SaguaroError

# Architecture -> TensorRT-LLM example family (the folder holding its convert_checkpoint.py).
FAMILIES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen",
    "Qwen3ForCausalLM": "qwen",
}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES)


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    family: str                      # llama | qwen
    vocab_size: int
    max_context: int                 # max_position_embeddings
    dtype: str                       # torch_dtype / dtype in config.json, "" when absent
    eos_token_ids: tuple[int, ...]
    bos_token_id: int | None


@dataclass(frozen=True)
class PairInfo:
    target: ModelInfo
    draft: ModelInfo
    vocab_size: int                  # ids both models have: what verification runs over
    eos_token_ids: tuple[int, ...]   # the target's: it decides where generation ends
    bos_token_id: int | None
    max_context: int                 # positions both models can attend to
    tokenizer_sha256: str


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SaguaroError(f"{path} is not valid JSON ({e}): re-download the checkpoint") from e


def _ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(sorted({int(v) for v in value})) if isinstance(value, list) else (int(value),)


def read_model(model_dir: str | Path, role: str) -> ModelInfo:
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise SaguaroError(f"{role} checkpoint: no config.json in {d}: pass a Hugging Face checkpoint folder "
                           f"(config.json, *.safetensors, tokenizer.json)")
    c = _read_json(cfg_path)
    arch = (c.get("architectures") or ["<none>"])[0]
    if arch not in FAMILIES:
        raise SaguaroError(f"{role} checkpoint {d}: architectures={arch} is not supported; "
                           f"use a model of one of {', '.join(SUPPORTED_ARCHITECTURES)}")
    for key in ("vocab_size", "max_position_embeddings"):
        if not isinstance(c.get(key), int):
            raise SaguaroError(f"{role} checkpoint {d}: config.json lacks an integer {key}: "
                               f"re-export it with transformers' save_pretrained")
    # generation_config.json is where instruct models list their extra end tokens.
    gen_path = d / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    eos = _ids(c.get("eos_token_id")) or _ids(gen.get("eos_token_id"))
    bos = c.get("bos_token_id", gen.get("bos_token_id"))
    return ModelInfo(path=str(d), architecture=arch, family=FAMILIES[arch], vocab_size=c["vocab_size"],
                     max_context=c["max_position_embeddings"],
                     dtype=str(c.get("torch_dtype") or c.get("dtype") or ""),
                     eos_token_ids=eos, bos_token_id=None if bos is None else int(bos))


def _tokenizer_file(d: Path, role: str) -> Path:
    for name in ("tokenizer.json", "tokenizer.model"):
        if (d / name).is_file():
            return d / name
    raise SaguaroError(f"{role} checkpoint {d}: no tokenizer.json (or tokenizer.model): copy the tokenizer "
                       f"files from the model's Hugging Face repository into {d}")


def _vocab(tok: dict[str, Any]) -> dict[str, int]:
    model = tok.get("model", {})
    vocab = model.get("vocab", {})
    # BPE/WordPiece keep {token: id}; Unigram keeps [[token, score], ...] in id order.
    pairs = vocab.items() if isinstance(vocab, dict) else ((v[0], i) for i, v in enumerate(vocab))
    out = {str(t): int(i) for t, i in pairs}
    out.update({a["content"]: int(a["id"]) for a in tok.get("added_tokens", [])})
    return out


def _compare_tokenizers(target: Path, draft: Path) -> tuple[str, int | None]:
    """sha256 of the target's tokenizer file and the largest token id it has (None: not parsed, the
    files being equal or not JSON); SaguaroError when the draft's tokenizer differs in effect."""
    t_bytes, d_bytes = target.read_bytes(), draft.read_bytes()
    digest = hashlib.sha256(t_bytes).hexdigest()
    if t_bytes == d_bytes:      # the common case, and it skips parsing multi-MB JSON
        return digest, None
    fix = "use a draft from the same model family that ships the target's tokenizer"
    if target.suffix != ".json" or draft.suffix != ".json":
        raise SaguaroError(f"tokenizer: {draft} differs from {target}: {fix}")
    t, d = json.loads(t_bytes), json.loads(d_bytes)
    tv, dv = _vocab(t), _vocab(d)
    if tv != dv:
        diff = sorted(set(tv.items()) ^ set(dv.items()), key=lambda p: p[1])[:3]
        raise SaguaroError(f"tokenizer vocab differs between target and draft ({len(tv)} vs {len(dv)} entries; "
                           f"first differences {diff}): {fix}")
    # Same vocab, different rules (merges, normalizer, pre-tokenizer) still splits text differently.
    for key in ("model", "normalizer", "pre_tokenizer"):
        if t.get(key) != d.get(key):
            raise SaguaroError(f"tokenizer {key} rules differ between {target} and {draft} (same vocab, "
                               f"different tokenization): {fix}")
    return digest, max(tv.values(), default=-1)


def _largest_token_id(path: Path) -> int | None:
    """The largest id of a tokenizer.json (vocab and added tokens); None for other formats."""
    return max(_vocab(_read_json(path)).values(), default=-1) if path.suffix == ".json" else None


def _check_vocab_sizes(t: ModelInfo, d: ModelInfo, tokenizer: Path, largest: int | None) -> None:
    """Embedding sizes may differ (padding), but both must hold every id of the shared tokenizer."""
    if t.vocab_size == d.vocab_size:
        return
    largest = _largest_token_id(tokenizer) if largest is None else largest
    for role, m in (("target", t), ("draft", d)):
        if largest is not None and largest >= m.vocab_size:
            raise SaguaroError(f"vocab_size: the {role} has {m.vocab_size} ids but the tokenizer has ids up to "
                               f"{largest} (target {t.vocab_size}, draft {d.vocab_size}): pick a {role} of the same "
                               f"family whose vocab_size covers the tokenizer")


# Written by build_engines/build.py next to each TensorRT-LLM engine: the checkpoint it was built from.
ENGINE_SOURCE = "saguaro_source.json"


def source_checkpoint(model_dir: str | Path, role: str) -> Path:
    """The Hugging Face checkpoint behind model_dir: model_dir itself, or for a TensorRT-LLM engine
    folder (its config.json has pretrained_config and build_config, no architectures and no
    tokenizer) the checkpoint recorded at build time, whose vocab_size must match the engine's."""
    d = Path(model_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        return d
    engine = _read_json(cfg_path)
    if "pretrained_config" not in engine or "build_config" not in engine:
        return d
    pointer = d / ENGINE_SOURCE
    if not pointer.is_file():
        raise SaguaroError(f"{role} checkpoint {d} is a TensorRT-LLM engine without {ENGINE_SOURCE} (the checkpoint it "
                           f"was built from, which holds the tokenizer): rebuild it with build_engines/build.py "
                           f"--backend trtllm, or write {{\"checkpoint\": \"/path/to/hf-folder\"}} to {pointer}")
    src = Path(_read_json(pointer)["checkpoint"])
    if not src.is_absolute():
        src = (d / src).resolve()
    vocab = engine["pretrained_config"].get("vocab_size")
    hf = _read_json(src / "config.json") if (src / "config.json").is_file() else {}
    if vocab is not None and hf.get("vocab_size") not in (None, vocab):
        raise SaguaroError(f"{role} engine {d} has vocab_size {vocab} but its source checkpoint {src} has "
                           f"{hf['vocab_size']}: fix {pointer}, or rebuild the engine from that checkpoint")
    return src


def validate_pair(target_dir: str | Path, draft_dir: str | Path, num_draft_tokens: int | None = None,
                  max_draft_len: int | None = None, max_seq_len: int | None = None) -> PairInfo:
    """Check that draft and target can be served together; SaguaroError names the field and fix.
    Either may be a Hugging Face checkpoint folder or a TensorRT-LLM engine folder built by
    build_engines/build.py (its source checkpoint is checked)."""
    t = read_model(source_checkpoint(target_dir, "target"), "target")
    d = read_model(source_checkpoint(draft_dir, "draft"), "draft")
    tokenizer = _tokenizer_file(Path(t.path), "target")
    digest, largest = _compare_tokenizers(tokenizer, _tokenizer_file(Path(d.path), "draft"))
    _check_vocab_sizes(t, d, tokenizer, largest)
    if t.bos_token_id != d.bos_token_id:
        raise SaguaroError(f"bos_token_id: target {t.bos_token_id} != draft {d.bos_token_id}: set the same "
                           f"bos_token_id in both config.json files, or use a draft trained with the target's tokenizer")
    # Base and instruct variants may list different end tokens; only disjoint sets mean different conventions.
    if t.eos_token_ids and d.eos_token_ids and not set(t.eos_token_ids) & set(d.eos_token_ids):
        raise SaguaroError(f"eos_token_id: target {list(t.eos_token_ids)} and draft {list(d.eos_token_ids)} share "
                           f"no end token: fix eos_token_id in the draft's config.json, or use a matching draft")
    if num_draft_tokens is not None:
        if num_draft_tokens < 1:
            raise SaguaroError(f"num_draft_tokens={num_draft_tokens}: must be >= 1")
        if max_draft_len is not None and num_draft_tokens > max_draft_len:
            raise SaguaroError(f"num_draft_tokens={num_draft_tokens} > max_draft_len={max_draft_len}: lower "
                               f"num_draft_tokens, or rebuild the engines with --max-draft-len {num_draft_tokens}")
    context = min(t.max_context, d.max_context)
    if max_seq_len is not None:
        for role, m in (("target", t), ("draft", d)):
            if max_seq_len > m.max_context:
                raise SaguaroError(f"max_seq_len={max_seq_len} exceeds the {role}'s max_position_embeddings="
                                   f"{m.max_context} ({m.path}): lower --max-seq-len to <= {context}, or use a "
                                   f"{role} with a longer context")
        lookahead = (num_draft_tokens or 0) + 1
        if max_seq_len <= lookahead:
            raise SaguaroError(f"max_seq_len={max_seq_len} leaves no room for a prompt plus one round of "
                               f"{lookahead} tokens: raise --max-seq-len")
    return PairInfo(target=t, draft=d, vocab_size=min(t.vocab_size, d.vocab_size),
                    eos_token_ids=t.eos_token_ids or d.eos_token_ids, bos_token_id=t.bos_token_id,
                    max_context=context, tokenizer_sha256=digest)
