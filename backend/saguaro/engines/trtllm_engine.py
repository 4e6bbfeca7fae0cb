"""The Engine interface on TensorRT-LLM's executor (GPU production path).

TensorRT-LLM owns its KV cache; there is no API to append to or roll back a sequence's cache in
place. So a slot here is a host-side token list, and every call submits the slot's whole history
plus the new tokens as a fresh request that generates one token. With KV-cache block reuse the
executor finds the history's blocks from earlier requests and computes only the tail, so the cost
is that of an incremental step; truncate() is free (the next request simply stops matching).
Branches are requests whose prompts share the parent's prefix, batched in one enqueue.

Logits: a request of n > 1 new tokens returns context logits (one row per computed prompt
position, so the engine needs --gather_context_logits); a single new token returns the generation
logits of its one step (--gather_generation_logits), one row instead of a block's worth. Block
reuse skips the logits of reused positions too: if it ever covers some of the new tokens (another
request already submitted the same tokens, e.g. a branch that became the accepted path), those rows
are recomputed by one-token requests ending at each of them (refill_requests).

Everything that decides what is sent is in pure functions (forward_requests, branch_requests,
extend_branches, take_logits, refill_requests, read_engine_config), tested without a GPU.
"""
from __future__ import annotations

import datetime
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saguaro.engines.base import Engine
from saguaro.errors import SaguaroError

if TYPE_CHECKING:
    from saguaro.config import EngineConfig

BUILD_HINT = "rebuild with build_engines/build.py --backend trtllm"


@dataclass(frozen=True)
class RequestSpec:
    input_ids: list[int]    # the whole prompt: history + new tokens
    want: int               # logits rows wanted: for the last `want` positions of input_ids
    context: bool           # True: read context logits; False: the one generation-logits row


@dataclass(frozen=True)
class EngineLimits:
    vocab_size: int
    max_seq_len: int
    max_batch_size: int
    tp_size: int


def read_engine_config(engine_dir: str | Path) -> EngineLimits:
    """Limits from a trtllm-build output's config.json; SaguaroError if it lacks what we rely on."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise SaguaroError(f"no TensorRT-LLM engine at {engine_dir} (config.json missing): {BUILD_HINT}")
    cfg = json.loads(path.read_text())
    pretrained, build = cfg.get("pretrained_config", {}), cfg.get("build_config", {})
    needs = {"gather_context_logits": "--gather_context_logits",
             "gather_generation_logits": "--gather_generation_logits"}
    for key, flag in needs.items():
        if build.get(key) is False:
            raise SaguaroError(f"engine {engine_dir} was built without {flag}: the core verifies on per-position "
                               f"logits; {BUILD_HINT}")
    if build.get("plugin_config", {}).get("use_paged_context_fmha") is False:
        raise SaguaroError(f"engine {engine_dir} was built without --use_paged_context_fmha enable, which KV-cache "
                           f"block reuse needs; {BUILD_HINT}")
    return EngineLimits(vocab_size=int(pretrained["vocab_size"]), max_seq_len=int(build["max_seq_len"]),
                        max_batch_size=int(build["max_batch_size"]),
                        tp_size=int(pretrained.get("mapping", {}).get("tp_size", 1)))


def forward_requests(histories: list[list[int]], tokens: list[list[int]]) -> list[RequestSpec]:
    """One request per slot: its history plus the tokens to append."""
    return [RequestSpec(input_ids=h + t, want=len(t), context=len(t) > 1) for h, t in zip(histories, tokens)]


def extend_branches(previous: list[list[int]] | None, tokens: list[int], depth: int) -> list[list[int]]:
    """Branch token lists after feeding `tokens` at `depth` (depth 0 starts new branches)."""
    if depth == 0:
        return [[t] for t in tokens]
    if previous is None or len(previous) != len(tokens) or any(len(b) != depth for b in previous):
        raise SaguaroError(f"branch_step depth={depth} must follow depth {depth - 1} with the same {len(tokens)} "
                           f"branches: start new branches at depth 0")
    return [b + [t] for b, t in zip(previous, tokens)]


def branch_requests(histories: list[list[int]], parents: list[int], visible: list[int],
                    branches: list[list[int]]) -> list[RequestSpec]:
    """One request per branch: the parent's first `visible` tokens plus the branch's tokens so far;
    its generation logits are the logits at the branch's newest token."""
    specs = []
    for p, v, b in zip(parents, visible, branches):
        if not 0 <= v <= len(histories[p]):
            raise SaguaroError(f"branch visible={v} outside parent slot {p} of length {len(histories[p])}")
        specs.append(RequestSpec(input_ids=histories[p][:v] + b, want=1, context=False))
    return specs


def take_logits(spec: RequestSpec, context: torch.Tensor | None, generation: torch.Tensor | None,
                vocab_size: int) -> tuple[torch.Tensor, int]:
    """Rows for the spec's last positions, [rows, vocab] float32, and how many leading wanted rows
    are missing because block reuse skipped their positions. Logits come padded to a multiple of
    the tensor-parallel size, hence the slice to vocab_size."""
    if not spec.context:
        if generation is None:
            raise SaguaroError(f"TensorRT-LLM returned no generation logits: {BUILD_HINT} (--gather_generation_logits)")
        return generation.reshape(-1, generation.shape[-1])[:1, :vocab_size].float(), 0
    if context is None:
        raise SaguaroError(f"TensorRT-LLM returned no context logits: {BUILD_HINT} (--gather_context_logits)")
    rows = context[-min(spec.want, context.shape[0]):, :vocab_size].float()
    return rows, spec.want - rows.shape[0]


def refill_requests(spec: RequestSpec, missing: int) -> list[RequestSpec]:
    """One-token requests ending at each of the first `missing` wanted positions: the last prompt
    position is always computed, so their generation logits are exactly those rows."""
    start = len(spec.input_ids) - spec.want
    return [RequestSpec(input_ids=spec.input_ids[:start + j + 1], want=1, context=False) for j in range(missing)]


def _runtime() -> Any:
    """tensorrt_llm's executor bindings, imported only when a TrtllmEngine is built."""
    try:
        if not torch.cuda.is_available():
            raise RuntimeError("torch sees no CUDA device")
        import tensorrt_llm.bindings.executor as trtllm
    except (ImportError, OSError, RuntimeError) as e:
        raise SaguaroError(f"engine=trtllm requires a GPU with TensorRT-LLM ({e}): use engine=torch on CPU, or serve "
                           f"from nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3 (docker compose up)") from e
    return trtllm


class TrtllmEngine(Engine):
    def __init__(self, engine_dir: str | Path, max_slots: int = 16, max_branches: int | None = None, max_draft_len: int = 8,
                 device_ids: list[int] | None = None, kv_cache_free_gpu_memory_fraction: float = 0.9,
                 timeout_s: float = 60.0) -> None:
        trtllm = _runtime()
        limits = read_engine_config(engine_dir)
        self.vocab_size = limits.vocab_size
        self.max_seq_len = limits.max_seq_len - 1   # every request generates one token we discard
        self.max_slots, self.max_draft_len = max_slots, max_draft_len
        self.max_branches = max_branches or limits.max_batch_size
        self.timeout_s = timeout_s
        self._trtllm = trtllm
        self._history: dict[int, list[int]] = {}
        self._branches: list[list[int]] | None = None
        kv = trtllm.KvCacheConfig(enable_block_reuse=True,
                                  free_gpu_memory_fraction=kv_cache_free_gpu_memory_fraction)
        config = trtllm.ExecutorConfig(max_beam_width=1, kv_cache_config=kv, enable_chunked_context=True)
        if limits.tp_size > 1:
            # Inside a Triton Python-backend stub there is no mpirun: orchestrator mode spawns the
            # tensor-parallel workers itself.
            import tensorrt_llm
            worker = Path(tensorrt_llm.__file__).parent / "bin" / "executorWorker"
            config.parallel_config = trtllm.ParallelConfig(
                trtllm.CommunicationType.MPI, trtllm.CommunicationMode.ORCHESTRATOR, device_ids=device_ids,
                orchestrator_config=trtllm.OrchestratorConfig(True, str(worker)))
        elif device_ids:
            # A Python-backend instance is told its GPU but CUDA_VISIBLE_DEVICES is not narrowed for it.
            config.parallel_config = trtllm.ParallelConfig(
                trtllm.CommunicationType.MPI, trtllm.CommunicationMode.LEADER, device_ids=device_ids)
        self._executor = trtllm.Executor(Path(engine_dir), trtllm.ModelType.DECODER_ONLY, config)

    @classmethod
    def from_config(cls, cfg: "EngineConfig", branches: bool = False) -> "TrtllmEngine":
        """cfg.checkpoint is the engine folder (trtllm-build's output); device cuda:N pins GPU N."""
        device_ids = [int(cfg.device.split(":")[1])] if cfg.device.startswith("cuda:") else None
        return cls(cfg.checkpoint, max_slots=cfg.max_slots, max_branches=cfg.max_branches if branches else 0,
                   max_draft_len=cfg.max_draft_len, device_ids=device_ids)

    # ---- slots: host-side token lists
    def allocate(self) -> int:
        free = next((s for s in range(self.max_slots) if s not in self._history), None)
        if free is None:
            raise SaguaroError(f"all {self.max_slots} slots are in use: raise max_slots or retry later")
        self._history[free] = []
        return free

    def release(self, slot: int) -> None:
        self._history.pop(slot, None)

    def length(self, slot: int) -> int:
        return len(self._history[slot])

    def truncate(self, slot: int, length: int) -> None:
        del self._history[slot][length:]

    @property
    def active_slots(self) -> int:
        return len(self._history)

    # ---- compute
    def forward(self, slots: list[int], tokens: list[list[int]], logits: bool = True) -> list[torch.Tensor]:
        for s, t in zip(slots, tokens):
            if len(self._history[s]) + len(t) > self.max_seq_len:
                raise SaguaroError(f"slot {s}: {len(self._history[s])} + {len(t)} tokens exceed max_seq_len="
                                   f"{self.max_seq_len}: shorten the request or rebuild with a larger --max-seq-len")
        busy = [i for i, t in enumerate(tokens) if t]
        specs = forward_requests([self._history[slots[i]] for i in busy], [tokens[i] for i in busy])
        rows = dict(zip(busy, self._logits(specs)))
        for s, t in zip(slots, tokens):
            self._history[s].extend(t)
        return [rows.get(i, torch.empty(0, self.vocab_size)) for i in range(len(slots))]

    def branch_step(self, parents: torch.Tensor, visible: torch.Tensor, tokens: torch.Tensor,
                    depth: int) -> torch.Tensor:
        self._branches = extend_branches(self._branches, tokens.tolist(), depth)
        specs = branch_requests(self._history, parents.tolist(), visible.tolist(), self._branches)
        return torch.cat(self._logits(specs))

    def close(self) -> None:
        self._executor.shutdown()

    # ---- executor round trips
    def _logits(self, specs: list[RequestSpec]) -> list[torch.Tensor]:
        results = self._run(specs)
        rows, refills = [], []
        for spec, result in zip(specs, results):
            r, missing = take_logits(spec, result.context_logits, result.generation_logits, self.vocab_size)
            rows.append(r)
            refills.append(refill_requests(spec, missing))
        flat = [s for group in refills for s in group]
        if flat:
            extra = iter(self._logits(flat))
            rows = [torch.cat([next(extra) for _ in group] + [r]) if group else r for group, r in zip(refills, rows)]
        return rows

    def _run(self, specs: list[RequestSpec]) -> list[Any]:
        t = self._trtllm
        # max_tokens positionally: the keyword was max_new_tokens in older releases.
        requests = [t.Request(s.input_ids, 1,
                              output_config=t.OutputConfig(return_context_logits=s.context,
                                                           return_generation_logits=not s.context,
                                                           exclude_input_from_output=True))
                    for s in specs]
        ids = self._executor.enqueue_requests(requests)
        done: dict[int, Any] = {}
        deadline = time.monotonic() + self.timeout_s
        while len(done) < len(ids):
            pending = [i for i in ids if i not in done]
            left = deadline - time.monotonic()
            if left <= 0:
                for i in pending:
                    self._executor.cancel_request(i)
                raise SaguaroError(f"TensorRT-LLM did not answer {len(pending)} requests within {self.timeout_s}s: "
                                   f"check the GPU, or raise the timeout")
            for i, responses in zip(pending, self._executor.await_responses(pending, datetime.timedelta(seconds=left))):
                for r in responses:
                    if r.has_error():
                        raise SaguaroError(f"TensorRT-LLM request failed: {r.error_msg}")
                    if r.result.is_final:
                        done[i] = r.result
        return [done[i] for i in ids]
