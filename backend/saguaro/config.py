"""All configuration in one typed place. Defaults serve the vendored demo pair on this CPU."""
from __future__ import annotations

import math
import numbers
import struct
from dataclasses import dataclass, field, replace
from pathlib import Path

from saguaro.errors import SaguaroError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
DEMO_TARGET = PROJECT_ROOT / "models" / "demo-code-target"
DEMO_DRAFT = PROJECT_ROOT / "models" / "demo-code-draft"
DEV_PROMPTS = PROJECT_ROOT / "prompts" / "dev.jsonl"

MODES = ("ar", "sd", "ssd")
FLOAT32_MAX = 3.4028234663852886e38  # the largest float32
MIN_TEMPERATURE = 1e-3               # smallest temperature > 0 a request may ask for
BACKUPS = ("auto", "neural", "fast")
FANOUTS = ("geometric", "uniform")


@dataclass(frozen=True)
class EngineConfig:
    """One model instance (target or draft)."""
    checkpoint: str = str(DEMO_TARGET)
    engine: str = "torch"            # torch | trtllm
    device: str = "cpu"
    dtype: str = "auto"              # auto: bfloat16 on CUDA; on CPU float32 math, the weights held in
                                     # fp16 where that is exact (float32: plain fp32 weights)
    max_slots: int = 16              # sequences live at once
    max_seq_len: int = 1024          # prompt + generated + one speculation
    max_draft_len: int = 8           # largest K a request may ask for
    max_branches: int = 64           # speculation-cache branches per sequence (draft only)
    threads: int = 1                 # intra-op threads on CPU (0: leave torch's default)
    prefill_threads: int = 0         # threads for prompt prefill (0: same as threads); a prompt is
                                     # one big matmul-bound forward that all cores can share
    draft_core: int | None = None    # CPU target: the core its draft is pinned to. Forwards on `threads`
                                     # run off it, those on prefill_threads (every core) on it too
    device_ids: tuple[int, ...] = ()  # trtllm: one GPU per tensor-parallel rank (empty: the instance's GPU)
    kv_cache_free_gpu_memory_fraction: float = 0.4  # trtllm: KV cache share of free GPU memory; 0.4 is
                                     # safe for two engines on one GPU, build_engines sets 0.9 on a GPU of its own

    def validate(self) -> "EngineConfig":
        if self.engine not in ("torch", "trtllm"):
            raise SaguaroError(f"engine={self.engine!r}: use 'torch' (CPU or CUDA) or 'trtllm' (GPU)")
        for name in ("max_slots", "max_seq_len", "max_draft_len"):
            if getattr(self, name) < 1:
                raise SaguaroError(f"{name}={getattr(self, name)}: must be >= 1")
        if self.draft_core is not None and self.draft_core < 0:
            raise SaguaroError(f"draft_core={self.draft_core}: a CPU core number (0 or more), or unset")
        if not 0.0 < self.kv_cache_free_gpu_memory_fraction < 1.0:
            raise SaguaroError(f"kv_cache_free_gpu_memory_fraction={self.kv_cache_free_gpu_memory_fraction}: must be "
                               f"in (0, 1); 0.4 when target and draft share a GPU, up to 0.9 on a GPU of its own")
        return self


@dataclass(frozen=True)
class SpecConfig:
    """How speculation is done. K may be overridden per request up to the engines' max_draft_len."""
    k: int = 3                       # draft tokens per round
    budget: int = 8                  # B: speculation-cache branches per sequence per round
    fanout: str = "geometric"        # geometric (docs/design.md, "Fan-out") | uniform
    accept_rate: float | None = None  # a; None: fitted online from observed rounds
    power: float | None = None       # r in 1 - p_hit(F) = F^-r; None: fitted online
    saguaro_c: float = 1.0           # C in [0, 1]; 1.0 = plain draft sampling (docs/design.md, "Saguaro sampling")
    backup: str = "auto"             # auto (b* rule) | neural | fast
    draft_timeout_s: float = 10.0    # after this the request falls back to target-only decoding
    policy: bool = True              # ssd requests that do not pin K: each round the fastest of AR, SD
                                     # and SSD (docs/design.md, "The round policy"); False: SSD at K always
    policy_max_k: int = 6            # largest K the policy tries (and the engines' max_draft_len)

    def validate(self, max_draft_len: int, max_branches: int) -> "SpecConfig":
        self.validate_drafting()
        if not 1 <= self.k <= max_draft_len:
            raise SaguaroError(f"num_draft_tokens (K)={self.k}: must be in [1, {max_draft_len}] "
                               "(raise max_draft_len, in the target's and the draft's configs, to allow more)")
        if not 1 <= self.budget <= max_branches:
            raise SaguaroError(f"fanout_budget (B)={self.budget}: must be in [1, {max_branches}] "
                               "(raise the draft's max_branches to allow more)")
        if not 0.0 <= self.saguaro_c <= 1.0:
            raise SaguaroError(f"saguaro_c={self.saguaro_c}: must be in [0, 1] (1 disables Saguaro sampling)")
        if self.policy_max_k < 1:
            raise SaguaroError(f"policy_max_k={self.policy_max_k}: must be >= 1 (the largest K the round policy tries)")
        return self

    def validate_drafting(self) -> "SpecConfig":
        """The fields the draft model reads from its own config (K and B are `ssd`'s)."""
        if self.fanout not in FANOUTS:
            raise SaguaroError(f"fanout={self.fanout!r}: use one of {FANOUTS}")
        if self.backup not in BACKUPS:
            raise SaguaroError(f"backup={self.backup!r}: use one of {BACKUPS}")
        if self.accept_rate is not None and not 0.0 < self.accept_rate < 1.0:
            raise SaguaroError(f"accept_rate={self.accept_rate}: must be in (0, 1), or None to fit it online")
        if self.power is not None and self.power <= 0:
            raise SaguaroError(f"power={self.power}: must be > 0, or None to fit it online")
        return self


@dataclass(frozen=True)
class SamplingParams:
    """Per request. temperature 0 means greedy."""
    max_tokens: int = 128
    temperature: float = 0.0
    top_k: int = 0                   # 0: off
    top_p: float = 1.0
    seed: int | None = None
    end_id: int | None = None        # stop after emitting this token
    stop: tuple[tuple[int, ...], ...] = field(default_factory=tuple)  # stop token sequences
    # What changes the target's distribution (NVIDIA's names; applied alike in plain decoding and
    # inside verification, so greedy stays identical to AR and sampling stays exact):
    repetition_penalty: float = 1.0  # 1: off
    presence_penalty: float = 0.0    # 0: off
    frequency_penalty: float = 0.0   # 0: off
    min_tokens: int = 0              # end_id banned before this many tokens (stop sequences are not)
    bad_words: tuple[tuple[int, ...], ...] = field(default_factory=tuple)  # token sequences never produced
    return_log_probs: bool = False   # Event.log_probs: each emitted token's log-probability under the target

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> "SamplingParams":
        if self.max_tokens <= 0:
            raise SaguaroError(f"max_tokens={self.max_tokens}: must be >= 1")
        if not (self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature < math.inf):
            raise SaguaroError(f"temperature={self.temperature}: must be 0 (greedy) or a finite number >= "
                               f"{MIN_TEMPERATURE} (below it the scaled logits overflow)")
        if not 0.0 < self.top_p <= 1.0:
            raise SaguaroError(f"top_p={self.top_p}: must be in (0, 1]")
        if self.top_k < 0:
            raise SaguaroError(f"top_k={self.top_k}: must be >= 0 (0 = off)")
        self._validate_processing()
        return self

    def _validate_processing(self) -> None:
        """The fields saguaro.logits applies; TensorRT-LLM's own checks (repetition_penalty > 0,
        min_tokens >= 0: cpp/tensorrt_llm/executor/samplingConfig.cpp @ 3585984b32cded5cc002d3087d3da4b0fd9fb8a5)
        plus finiteness."""
        # (as float32, the precision they are applied in)
        if not 0.0 < _float32(self.repetition_penalty) < math.inf:
            raise SaguaroError(f"repetition_penalty={self.repetition_penalty}: must be a number > 0 that float32 holds "
                               f"(1 = off; above 1 discourages tokens already in the prompt or output)")
        for name in ("presence_penalty", "frequency_penalty"):
            if not math.isfinite(_float32(getattr(self, name))):
                raise SaguaroError(f"{name}={getattr(self, name)}: must be a number float32 holds (0 = off)")
        if self.min_tokens < 0:
            raise SaguaroError(f"min_tokens={self.min_tokens}: must be >= 0 (0 = off)")
        for i, word in enumerate(self.bad_words):
            if not word:
                raise SaguaroError(f"bad_words[{i}] is empty: each entry is a sequence of at least one token id")
            if any(not isinstance(t, numbers.Integral) or t < 0 for t in word):
                raise SaguaroError(f"bad_words[{i}]={list(word)}: token ids must be integers >= 0")

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def _float32(x: float) -> float:
    """x rounded to float32 (inf where it overflows, 0 where it underflows)."""
    return float(struct.unpack("f", struct.pack("f", x))[0]) if abs(x) <= FLOAT32_MAX else math.copysign(math.inf, x)
