"""Pairs that share a tokenizer but pad the vocabulary differently (Qwen2.5-7B's 152064 rows with
Qwen2.5-0.5B's 151936): the pair check compares tokenizers, and decoding runs over the ids both
models have, AR included, so greedy speculation stays identical to AR (docs/design.md, "Penalties,
bad words and log-probabilities")."""
from __future__ import annotations

import pytest
import torch

from saguaro.config import EngineConfig, SamplingParams, SpecConfig
from saguaro.decoder import Decoder
from saguaro.draft import Drafter, LocalDraft
from saguaro.engines.torch_engine import TorchEngine
from saguaro.errors import SaguaroError
from saguaro.pair import validate_pair
from tiny_models import hf_logits, save_random_model

SMALL = dict(arch="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)
TOKENIZER_IDS = 4096               # the demo tokenizer's, copied next to every checkpoint


def test_padded_vocabularies_with_one_tokenizer_are_a_pair(tmp_path):
    save_random_model(tmp_path / "target", vocab_size=TOKENIZER_IDS + 64, **SMALL)
    save_random_model(tmp_path / "draft", vocab_size=TOKENIZER_IDS, **SMALL)
    info = validate_pair(tmp_path / "target", tmp_path / "draft")
    assert (info.target.vocab_size, info.draft.vocab_size, info.vocab_size) == (4160, 4096, 4096)


def test_a_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    save_random_model(tmp_path / "target", vocab_size=TOKENIZER_IDS, **SMALL)
    save_random_model(tmp_path / "draft", vocab_size=TOKENIZER_IDS - 96, **SMALL)
    with pytest.raises(SaguaroError, match=r"vocab_size: the draft has 4000 ids but the tokenizer has ids up to 4095"):
        validate_pair(tmp_path / "target", tmp_path / "draft")


PROMPTS = [[1, 4, 2], [5], [7, 7, 3, 0]]
NEW = 12


def engines(root, v_target: int, v_draft: int):
    save_random_model(root / "target", seed=11, vocab_size=v_target, std=0.3, tokenizer=False, **SMALL)
    save_random_model(root / "draft", seed=12, vocab_size=v_draft, std=0.3, tokenizer=False, **SMALL)
    cfg = dict(dtype="float32", max_slots=8, max_seq_len=32, max_draft_len=4, max_branches=8, threads=1)
    return (TorchEngine(EngineConfig(checkpoint=str(root / "target"), **cfg)),
            TorchEngine(EngineConfig(checkpoint=str(root / "draft"), **cfg), branches=True))


@pytest.mark.parametrize("v_target, v_draft", [(12, 8), (8, 12)], ids=["target-pads-more", "draft-pads-more"])
def test_decoding_runs_over_the_shared_vocabulary(tmp_path, v_target, v_draft):
    target, draft = engines(tmp_path, v_target, v_draft)
    spec = SpecConfig(k=3, budget=6, policy=False)
    dec = Decoder(target, LocalDraft(Drafter(draft, spec)), spec)
    assert dec.vocab == 8
    greedy = SamplingParams(max_tokens=NEW)
    ar = dec.generate(PROMPTS, greedy, "ar")
    for mode in ("sd", "ssd"):
        assert dec.generate(PROMPTS, greedy, mode) == ar, mode
    sampled = [dec.generate(PROMPTS, SamplingParams(temperature=1.0, max_tokens=NEW, seed=s), m)
               for s in range(3) for m in ("ar", "sd", "ssd")]
    assert all(t < 8 for out in ar + [o for s in sampled for o in s] for t in out)
    assert target.active_slots == 0 and draft.active_slots == 0


def test_an_argmax_in_the_padding_is_recomputed_within_the_shared_vocabulary(tmp_path):
    # the target's own greedy choice falls in its padding somewhere on these prompts; the greedy fast
    # path (argmax ids from the engine) must then take the argmax over the shared ids instead
    target, draft = engines(tmp_path, 12, 8)
    spec = SpecConfig(k=3, budget=6, policy=False)
    dec = Decoder(target, LocalDraft(Drafter(draft, spec)), spec)
    ar = dec.generate(PROMPTS, SamplingParams(max_tokens=NEW), "ar")
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "target", dtype=torch.float32).eval()
    padded = 0
    for prompt, out in zip(PROMPTS, ar):
        logits = hf_logits(hf, prompt + out)[len(prompt) - 1: -1]
        assert logits[:, :8].argmax(-1).tolist() == out
        padded += int((logits.argmax(-1) >= 8).sum())
    assert padded > 0, "no argmax fell in the padding: the test does not exercise the fallback"
