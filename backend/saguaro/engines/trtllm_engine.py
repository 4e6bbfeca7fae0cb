"""The Engine interface on TensorRT-LLM's executor (GPU production path), written against
TensorRT-LLM 0.14.0 (the 24.10 Triton image); docs/design.md ("The TensorRT-LLM path") says which
upstream behaviour each rule below rests on and which calls each round makes.

TensorRT-LLM owns its KV cache; there is no API to append to or roll back a sequence's cache in
place. So a slot here is a host-side token list, and every call submits the slot's whole history
plus the new tokens as a fresh request. KV-cache block reuse lets a request skip the *full*
`tokens_per_block` blocks that a completed earlier request stored; the tail after the last full
block is recomputed on every call, so a call costs a context pass over up to tokens_per_block - 1
old tokens plus the new ones. truncate() is free (the next request simply stops matching).
Branches are requests whose prompts share the parent's prefix, batched in one enqueue.

Logits, per kind of call:
- prefill (logits=False): no logits asked for at all.
- one new token: the generation logits of the request's one step, [beam, steps, vocab_padded],
  whose first row is the last prompt position's logits.
- n > 1 new tokens on an engine built with --gather_context_logits, for a prompt short enough
  (CONTEXT_LOGITS_VALUES): context logits, always [prompt_len, vocab_padded]; rows of positions
  that block reuse skipped are never written (stale memory), so the adapter keeps its own upper
  bound of what may have been reused (ReuseMirror) and recomputes those rows by one-token
  requests (refill_requests). Longer prompts: one one-token request per wanted row.
- n > 1 new tokens on a target built with --speculative_decoding_mode draft_tokens_external
  (no context logits there): greedy verification sends tokens[1:] as the request's draft tokens
  and reads the engine's accepted tokens (one request, no logits); logits verification asks one
  one-token request per row.

Everything that decides what is sent is in pure functions and small classes (forward_requests,
branch_requests, extend_branches, take_rows, refill_requests, ReuseMirror, read_engine_config,
rank_devices), tested against fakes of the upstream contract without a GPU.
"""
from __future__ import annotations

import datetime
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from saguaro.engines.base import Engine
from saguaro.errors import SaguaroError
from saguaro.sampling import greedy

if TYPE_CHECKING:
    from saguaro.config import EngineConfig

BUILD_HINT = "rebuild with build_engines/build.py --backend trtllm"
NO_LOGITS, CONTEXT, GENERATION, DRAFT_IDS = "none", "context", "generation", "draft_ids"
# Context logits cover the whole prompt: past this many values (64 MB in fp32; 128 positions of a
# 128k vocabulary) one-token requests per wanted row move less than the prompt's rows would.
CONTEXT_LOGITS_VALUES = 1 << 24
DRAFT_TOKENS_EXTERNAL_MODE = 2


@dataclass(frozen=True)
class RequestSpec:
    input_ids: list[int]          # the whole prompt: history + new tokens (without draft tokens)
    want: int                     # rows wanted, for the last `want` positions (with draft tokens: of the round)
    logits: str = CONTEXT         # NO_LOGITS | CONTEXT | GENERATION | DRAFT_IDS
    draft: tuple[int, ...] = ()   # DRAFT_IDS: the tokens the engine verifies itself


@dataclass(frozen=True)
class EngineLimits:
    vocab_size: int
    max_seq_len: int
    max_batch_size: int
    tp_size: int
    tokens_per_block: int = 64
    draft_tokens_external: bool = False   # target built to verify draft tokens itself
    max_draft_len: int = 0                # draft tokens one request may carry (draft_tokens_external)


def read_engine_config(engine_dir: str | Path) -> EngineLimits:
    """Limits from a trtllm-build output's config.json (0.14 layout: pretrained_config and
    build_config, plugin options under build_config.plugin_config); SaguaroError naming the
    missing build flag when the engine cannot serve the core."""
    path = Path(engine_dir) / "config.json"
    if not path.is_file():
        raise SaguaroError(f"no TensorRT-LLM engine at {engine_dir} (config.json missing): {BUILD_HINT}")
    cfg = json.loads(path.read_text())
    pretrained, build = cfg.get("pretrained_config", {}), cfg.get("build_config", {})
    plugins = build.get("plugin_config", {})
    # SpeculativeDecodingMode is an IntFlag saved as its value (tensorrt_llm/models/modeling_utils.py):
    # NONE = 1, DRAFT_TOKENS_EXTERNAL = 2.
    external = build.get("speculative_decoding_mode") in (DRAFT_TOKENS_EXTERNAL_MODE, "draft_tokens_external")
    if build.get("gather_generation_logits") is False:
        raise SaguaroError(f"engine {engine_dir} was built without --gather_generation_logits: the core verifies "
                           f"on per-position logits; {BUILD_HINT}")
    if build.get("gather_context_logits") is False and not external:
        raise SaguaroError(f"engine {engine_dir} was built without --gather_context_logits: multi-token forwards "
                           f"read context logits; {BUILD_HINT}")
    if plugins.get("use_paged_context_fmha") is False:
        raise SaguaroError(f"engine {engine_dir} was built without --use_paged_context_fmha enable, which KV-cache "
                           f"block reuse needs; {BUILD_HINT}")
    return EngineLimits(vocab_size=int(pretrained["vocab_size"]), max_seq_len=int(build["max_seq_len"]),
                        max_batch_size=int(build["max_batch_size"]),
                        tp_size=int(pretrained.get("mapping", {}).get("tp_size", 1)),
                        tokens_per_block=int(plugins.get("tokens_per_block") or 64),
                        draft_tokens_external=external, max_draft_len=int(build.get("max_draft_len") or 0))


def rank_devices(device_ids: tuple[int, ...] | list[int], tp_size: int) -> list[int] | None:
    """One GPU per tensor-parallel rank: the list as given when it has tp_size ids, one id
    extended to tp_size consecutive GPUs (a KIND_GPU instance is told only its first), None
    when nothing was said (the executor's own default)."""
    ids = list(device_ids)
    if not ids:
        return None
    if len(ids) == tp_size:
        return ids
    if len(ids) == 1:
        return list(range(ids[0], ids[0] + tp_size))
    raise SaguaroError(f"gpu_device_ids={','.join(map(str, ids))} names {len(ids)} GPUs for an engine built with "
                       f"tp_size={tp_size}: list one GPU per rank (or only the first)")


class ReuseMirror:
    """An upper bound, kept on the host, of how much of a prompt TensorRT-LLM's block reuse may
    skip. Reuse matches whole blocks of tokens_per_block tokens, chained from the start, against
    blocks stored by requests that completed earlier, and never the prompt's last position. We
    record every completed request's full blocks (prompt and generated tokens: more than the
    engine stores, so the bound only ever errs towards recomputing a row). Least recently used
    blocks leave past `capacity`, far more blocks than a GPU's KV cache holds."""

    def __init__(self, tokens_per_block: int, capacity: int = 1 << 20) -> None:
        self.tpb, self.capacity = tokens_per_block, capacity
        self.blocks: OrderedDict[int, None] = OrderedDict()

    def _keys(self, ids: list[int], limit: int):
        key = 0
        for b in range(limit // self.tpb):
            key = hash((key, tuple(ids[b * self.tpb:(b + 1) * self.tpb])))
            yield key

    def reusable(self, ids: list[int]) -> int:
        """Leading positions of ids that the engine may take from its cache, not compute."""
        n = 0
        for key in self._keys(ids, len(ids) - 1):
            if key not in self.blocks:
                break
            self.blocks.move_to_end(key)
            n += self.tpb
        return n

    def store(self, ids: list[int]) -> None:
        for key in self._keys(ids, len(ids)):
            self.blocks[key] = None
            self.blocks.move_to_end(key)
        while len(self.blocks) > self.capacity:
            self.blocks.popitem(last=False)


def forward_requests(histories: list[list[int]], tokens: list[list[int]], logits: bool = True,
                     external: bool = False, ids_only: bool = False,
                     context_rows: int | None = None) -> list[RequestSpec]:
    """One request per slot: its history plus the tokens to append. external: the engine takes
    draft tokens (greedy multi-token forwards become one DRAFT_IDS request) and has no context
    logits. context_rows: the longest prompt whose context logits (one row per prompt position,
    wanted or not) are worth shipping; longer ones get one one-token request per wanted row."""
    specs = []
    for h, t in zip(histories, tokens):
        if not logits:
            specs.append(RequestSpec(h + t, 0, NO_LOGITS))
        elif len(t) == 1:
            specs.append(RequestSpec(h + t, 1, GENERATION))
        elif external and ids_only:
            specs.append(RequestSpec(h + t[:1], len(t), DRAFT_IDS, tuple(t[1:])))
        elif external or (context_rows is not None and len(h) + len(t) > context_rows):
            specs += [RequestSpec(h + t[:i + 1], 1, GENERATION) for i in range(len(t))]
        else:
            specs.append(RequestSpec(h + t, len(t), CONTEXT))
    return specs


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
        specs.append(RequestSpec(histories[p][:v] + b, 1, GENERATION))
    return specs


def take_rows(spec: RequestSpec, result: Any, vocab_size: int) -> torch.Tensor:
    """The spec's wanted rows from a Result, [rows, vocab] float32 (logits), or [rows] int64
    (DRAFT_IDS: argmax ids up to the engine's first rejection, -1 after it). Logits come padded
    to vocab_padded (a multiple of the tensor-parallel size), hence the slice to vocab_size."""
    if spec.logits == DRAFT_IDS:
        out = list(result.output_token_ids[0])
        k = 0
        while k < len(spec.draft) and k < len(out) - 1 and out[k] == spec.draft[k]:
            k += 1
        if not out:
            raise SaguaroError("TensorRT-LLM returned no tokens for a draft-token verification request")
        return torch.tensor(out[:k + 1] + [-1] * (spec.want - k - 1), dtype=torch.long)
    if spec.logits == GENERATION:
        gen = result.generation_logits
        if gen is None:
            raise SaguaroError(f"TensorRT-LLM returned no generation logits: {BUILD_HINT} (--gather_generation_logits)")
        return gen.reshape(-1, gen.shape[-1])[:1, :vocab_size].float()   # [beam, steps, V]: beam 0, step 0
    ctx = result.context_logits
    if ctx is None:
        raise SaguaroError(f"TensorRT-LLM returned no context logits: {BUILD_HINT} (--gather_context_logits)")
    if ctx.shape[0] != len(spec.input_ids):
        raise SaguaroError(f"TensorRT-LLM returned {ctx.shape[0]} context-logit rows for a {len(spec.input_ids)}-token "
                           f"prompt; this adapter expects one row per prompt position (TensorRT-LLM 0.14)")
    return ctx[-spec.want:, :vocab_size].float()


def stale_rows(spec: RequestSpec, reusable: int) -> int:
    """How many leading wanted rows of a CONTEXT request lie in positions block reuse may skip."""
    start = len(spec.input_ids) - spec.want
    return max(0, min(spec.want, reusable - start)) if spec.logits == CONTEXT else 0


def refill_requests(spec: RequestSpec, missing: int) -> list[RequestSpec]:
    """One-token requests ending at each of the first `missing` wanted positions: a prompt's last
    position is always computed, so their generation logits are exactly those rows."""
    start = len(spec.input_ids) - spec.want
    return [RequestSpec(spec.input_ids[:start + j + 1], 1, GENERATION) for j in range(missing)]


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


def executor_worker() -> Path:
    """The executorWorker binary the wheel ships, which orchestrator mode starts once per rank."""
    import tensorrt_llm
    return Path(tensorrt_llm.__file__).parent / "bin" / "executorWorker"


class TrtllmEngine(Engine):
    def __init__(self, engine_dir: str | Path, max_slots: int = 16, max_branches: int | None = None, max_draft_len: int = 8,
                 device_ids: tuple[int, ...] = (), kv_cache_free_gpu_memory_fraction: float = 0.4,
                 timeout_s: float = 60.0, context_logits_values: int = CONTEXT_LOGITS_VALUES) -> None:
        trtllm = _runtime()
        limits = read_engine_config(engine_dir)
        self.limits = limits
        self.vocab_size = limits.vocab_size
        self.max_seq_len = limits.max_seq_len - 1   # every request generates one token we discard
        self.max_slots, self.max_draft_len = max_slots, max_draft_len
        self.max_branches = max_branches or limits.max_batch_size
        self.timeout_s = timeout_s
        self.context_rows = context_logits_values // limits.vocab_size
        self.reuse = ReuseMirror(limits.tokens_per_block)
        self._trtllm = trtllm
        self._history: dict[int, list[int]] = {}
        self._branches: list[list[int]] | None = None
        kv_args = {"enable_block_reuse": True, "free_gpu_memory_fraction": kv_cache_free_gpu_memory_fraction}
        try:
            # 1.x also reuses partly matching blocks by default (nanobind executorConfig.cpp); ReuseMirror
            # bounds whole-block reuse, as 0.14 does it.
            kv = trtllm.KvCacheConfig(**kv_args, enable_partial_reuse=False)
        except TypeError:          # 0.14: no such argument, whole blocks only
            kv = trtllm.KvCacheConfig(**kv_args)
        config = trtllm.ExecutorConfig(max_beam_width=1, kv_cache_config=kv, enable_chunked_context=True)
        if hasattr(config, "gather_generation_logits"):
            # 1.x asks for generation logits at runtime too (nanobind executorConfig.cpp); 0.14 only at build time.
            config.gather_generation_logits = True
        devices = rank_devices(device_ids, limits.tp_size)
        if limits.tp_size > 1:
            # Inside a Triton Python-backend stub there is no mpirun: orchestrator mode spawns the
            # tensor-parallel workers itself, one per listed device.
            config.parallel_config = trtllm.ParallelConfig(
                trtllm.CommunicationType.MPI, trtllm.CommunicationMode.ORCHESTRATOR, device_ids=devices,
                orchestrator_config=trtllm.OrchestratorConfig(True, str(executor_worker())))
        elif devices:
            # A Python-backend instance is told its GPU but CUDA_VISIBLE_DEVICES is not narrowed for it.
            config.parallel_config = trtllm.ParallelConfig(
                trtllm.CommunicationType.MPI, trtllm.CommunicationMode.LEADER, device_ids=devices)
        self._executor = trtllm.Executor(Path(engine_dir), trtllm.ModelType.DECODER_ONLY, config)

    @classmethod
    def from_config(cls, cfg: "EngineConfig", branches: bool = False) -> "TrtllmEngine":
        """cfg.checkpoint is the engine folder (trtllm-build's output); cfg.device_ids (or a KIND_GPU
        instance's cuda:N) place its ranks."""
        device_ids = tuple(cfg.device_ids) or ((int(cfg.device.split(":")[1]),) if cfg.device.startswith("cuda:") else ())
        return cls(cfg.checkpoint, max_slots=cfg.max_slots, max_branches=cfg.max_branches if branches else 0,
                   max_draft_len=cfg.max_draft_len, device_ids=device_ids,
                   kv_cache_free_gpu_memory_fraction=cfg.kv_cache_free_gpu_memory_fraction)

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
        return self._forward(slots, tokens, logits, greedy_ids=False)

    def forward_greedy(self, slots: list[int], tokens: list[list[int]]) -> list[torch.Tensor]:
        if not self.limits.draft_tokens_external:
            return super().forward_greedy(slots, tokens)
        return self._forward(slots, tokens, True, greedy_ids=True)

    def _forward(self, slots: list[int], tokens: list[list[int]], logits: bool, greedy_ids: bool) -> list[torch.Tensor]:
        for s, t in zip(slots, tokens):
            if len(self._history[s]) + len(t) > self.max_seq_len:
                raise SaguaroError(f"slot {s}: {len(self._history[s])} + {len(t)} tokens exceed max_seq_len="
                                   f"{self.max_seq_len}: shorten the request or rebuild with a larger --max-seq-len")
            if greedy_ids and self.limits.draft_tokens_external and len(t) - 1 > self.limits.max_draft_len:
                raise SaguaroError(f"num_draft_tokens={len(t) - 1} exceeds the target engine's max_draft_len="
                                   f"{self.limits.max_draft_len}: lower it, or rebuild with --max-draft-len {len(t) - 1}")
        busy = [i for i, t in enumerate(tokens) if t]
        external = self.limits.draft_tokens_external
        per_slot = [forward_requests([self._history[slots[i]]], [tokens[i]], logits, external, greedy_ids,
                                     self.context_rows) for i in busy]
        rows = self._rows([s for group in per_slot for s in group])
        out: dict[int, torch.Tensor] = {}
        for i, group in zip(busy, per_slot):
            mine = torch.cat([rows.pop(0) for _ in group]) if logits else None
            out[i] = greedy(mine) if greedy_ids and mine.dim() == 2 else mine   # DRAFT_IDS rows are ids already
        for s, t in zip(slots, tokens):
            self._history[s].extend(t)
        if not logits:
            return []
        empty = torch.empty(0, dtype=torch.long) if greedy_ids else torch.empty(0, self.vocab_size)
        return [out.get(i, empty) for i in range(len(slots))]

    def branch_step(self, parents: torch.Tensor, visible: torch.Tensor, tokens: torch.Tensor,
                    depth: int) -> torch.Tensor:
        self._branches = extend_branches(self._branches, tokens.tolist(), depth)
        specs = branch_requests(self._history, parents.tolist(), visible.tolist(), self._branches)
        return torch.cat(self._rows(specs))

    def close(self) -> None:
        self._executor.shutdown()

    # ---- executor round trips
    def _rows(self, specs: list[RequestSpec]) -> list[torch.Tensor]:
        """Each spec's wanted rows; context rows that block reuse may have skipped are recomputed."""
        stale = []
        for s in specs:
            stale.append(stale_rows(s, self.reuse.reusable(s.input_ids)))
            # Recorded before the batch runs: a release that reuses blocks within one batch errs
            # towards a refill, not a stale row.
            self.reuse.store(s.input_ids)
        results = self._run(specs)
        rows = [take_rows(s, r, self.vocab_size) if s.logits != NO_LOGITS else torch.empty(0)
                for s, r in zip(specs, results)]
        refills = [refill_requests(s, n) for s, n in zip(specs, stale)]
        flat = [r for group in refills for r in group]
        if flat:
            extra = iter(self._rows(flat))
            rows = [torch.cat([next(extra) for _ in group] + [r[len(group):]]) if group else r
                    for group, r in zip(refills, rows)]
        return rows

    def _request(self, spec: RequestSpec) -> Any:
        t = self._trtllm
        # Everything after input_token_ids is keyword-only in the bindings (pybind/executor/bindings.cpp).
        output = t.OutputConfig(return_context_logits=spec.logits == CONTEXT,
                                return_generation_logits=spec.logits == GENERATION,
                                exclude_input_from_output=True)
        if spec.logits == DRAFT_IDS:
            # NVIDIA's draft-target layout (tensorrtllm_backend tensorrt_llm_bls): K draft tokens, K + 1 to generate.
            return t.Request(spec.input_ids, max_tokens=len(spec.draft) + 1, output_config=output,
                             external_draft_tokens_config=t.ExternalDraftTokensConfig(list(spec.draft)))
        return t.Request(spec.input_ids, max_tokens=1, output_config=output)

    def _run(self, specs: list[RequestSpec]) -> list[Any]:
        ids = self._executor.enqueue_requests([self._request(s) for s in specs])
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
        for spec, i in zip(specs, ids):
            self.reuse.store(spec.input_ids + list(spec.draft) + list(done[i].output_token_ids[0]))
        return [done[i] for i in ids]
