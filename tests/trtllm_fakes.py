"""A fake of TensorRT-LLM 0.14.0's executor bindings (tensorrt_llm.bindings.executor) that keeps
the upstream contract, backed by the PyTorch model of a Hugging Face checkpoint, so that the
TensorRT-LLM engine adapter can be driven without a GPU and its logits compared with the PyTorch
engine's.

Read against NVIDIA/TensorRT-LLM: cpp/tensorrt_llm/pybind/executor/bindings.cpp (commit 03961722,
a 0.14-era tree), cpp/include/tensorrt_llm/batch_manager/llmRequest.h and
cpp/tensorrt_llm/batch_manager/handleContextLogits.cpp. Each behaviour below names its source.
Not faked: scheduling, streaming, beam search, sampling configs, KV cache eviction (the fake's
cache never forgets, which is the hardest case for the adapter).
"""
from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from saguaro.config import EngineConfig
from saguaro.engines.torch_engine import TorchEngine
from saguaro.pair import ENGINE_SOURCE

GARBAGE = 1e4      # stale pinned memory: large enough that reading it changes every argmax


class ModelType(Enum):
    DECODER_ONLY = 0


class CommunicationType(Enum):
    MPI = 0


class CommunicationMode(Enum):
    LEADER = 0
    ORCHESTRATOR = 1


# bindings.cpp: OutputConfig(return_log_probs, return_context_logits, return_generation_logits,
# exclude_input_from_output, return_encoder_output), all defaulting to False.
def OutputConfig(return_log_probs=False, return_context_logits=False, return_generation_logits=False,
                 exclude_input_from_output=False, return_encoder_output=False):
    return SimpleNamespace(return_log_probs=return_log_probs, return_context_logits=return_context_logits,
                           return_generation_logits=return_generation_logits,
                           exclude_input_from_output=exclude_input_from_output)


# bindings.cpp: ExternalDraftTokensConfig(tokens, logits=None, acceptance_threshold=None).
def ExternalDraftTokensConfig(tokens, logits=None, acceptance_threshold=None):
    return SimpleNamespace(tokens=list(tokens), logits=logits, acceptance_threshold=acceptance_threshold)


# bindings.cpp: KvCacheConfig(enable_block_reuse=False, max_tokens=None, max_attention_window=None,
# sink_token_length=None, free_gpu_memory_fraction=None, host_cache_size=None, onboard_blocks=True).
def KvCacheConfig(enable_block_reuse=False, max_tokens=None, max_attention_window=None, sink_token_length=None,
                  free_gpu_memory_fraction=None, host_cache_size=None, onboard_blocks=True):
    if free_gpu_memory_fraction is not None and not 0.0 < free_gpu_memory_fraction <= 1.0:
        raise ValueError("free_gpu_memory_fraction must be in (0, 1]")
    return SimpleNamespace(enable_block_reuse=enable_block_reuse, free_gpu_memory_fraction=free_gpu_memory_fraction)


# bindings.cpp: ExecutorConfig(max_beam_width=1, scheduler_config, kv_cache_config, enable_chunked_context=False,
# ..., parallel_config=None, ...), parallel_config a read-write property.
def ExecutorConfig(max_beam_width=1, scheduler_config=None, kv_cache_config=None, enable_chunked_context=False,
                   normalize_log_probs=True, iter_stats_max_iterations=1000, request_stats_max_iterations=0,
                   batching_type=None, max_batch_size=None, max_num_tokens=None, parallel_config=None, **rest):
    return SimpleNamespace(max_beam_width=max_beam_width, kv_cache_config=kv_cache_config or KvCacheConfig(),
                           enable_chunked_context=enable_chunked_context, parallel_config=parallel_config)


# bindings.cpp: ParallelConfig(communication_type=MPI, communication_mode=LEADER, device_ids=None,
# participant_ids=None, orchestrator_config=None); OrchestratorConfig(is_orchestrator=True, worker_executable_path="").
def ParallelConfig(communication_type=CommunicationType.MPI, communication_mode=CommunicationMode.LEADER,
                   device_ids=None, participant_ids=None, orchestrator_config=None):
    return SimpleNamespace(communication_type=communication_type, communication_mode=communication_mode,
                           device_ids=device_ids, orchestrator_config=orchestrator_config)


def OrchestratorConfig(is_orchestrator=True, worker_executable_path=""):
    return SimpleNamespace(is_orchestrator=is_orchestrator, worker_executable_path=worker_executable_path)


class Request:
    """bindings.cpp: py::arg("input_token_ids"), py::kw_only(), py::arg("max_tokens") = None, ...:
    every argument after the prompt is keyword-only, and max_tokens (or the deprecated
    max_new_tokens) is required ("missing required argument max_tokens")."""

    def __init__(self, input_token_ids, *, max_tokens=None, max_new_tokens=None, streaming=False,
                 sampling_config=None, output_config=None, end_id=None, pad_id=None, position_ids=None,
                 bad_words=None, stop_words=None, embedding_bias=None, external_draft_tokens_config=None,
                 **rest):
        max_tokens = max_tokens if max_tokens is not None else max_new_tokens
        if max_tokens is None:
            raise RuntimeError("missing required argument max_tokens")
        self.input_token_ids, self.max_tokens = list(input_token_ids), int(max_tokens)
        self.output_config = output_config or OutputConfig()
        self.external_draft_tokens_config = external_draft_tokens_config
        self.streaming = streaming


class FakeExecutor:
    """Executor(model_path, model_type, executor_config) with enqueue_requests, await_responses,
    cancel_request and shutdown. The logits are the PyTorch model's on the engine's source
    checkpoint (saguaro_source.json, written by build_engines/build.py)."""

    def __init__(self, model_path, model_type, config) -> None:
        path = Path(model_path)
        cfg = json.loads((path / "config.json").read_text())
        build, pretrained = cfg["build_config"], cfg["pretrained_config"]
        self.build = build
        self.config = config
        self.vocab = int(pretrained["vocab_size"])
        # Logits come padded to vocab_size_padded (a multiple of the tensor-parallel size): the
        # ModelConfig's getVocabSizePadded. Two extra columns are enough to catch a missing slice.
        self.vocab_padded = self.vocab + 2
        # tokens_per_block lives in the engine's plugin_config (tensorrt_llm/plugin/plugin.py, default 64).
        self.tpb = int(build.get("plugin_config", {}).get("tokens_per_block", 64))
        self.reuse_enabled = bool(config.kv_cache_config.enable_block_reuse)
        # modeling_utils.py SpeculativeDecodingMode(IntFlag): DRAFT_TOKENS_EXTERNAL = 2 in config.json.
        self.external = build.get("speculative_decoding_mode") == 2
        source = Path(json.loads((path / ENGINE_SOURCE).read_text())["checkpoint"])
        self.model = TorchEngine(EngineConfig(checkpoint=str(source), max_slots=1, max_seq_len=int(build["max_seq_len"]),
                                              max_draft_len=int(build.get("max_draft_len") or 8), dtype="float32"))
        self.stored: set[tuple[int, ...]] = set()
        self.results: dict[int, Any] = {}
        self.requests: list[Request] = []      # everything enqueued, for assertions
        self.reused: list[int] = []            # prepopulated prompt length per request
        self.closed = False

    # -- what the model computes
    def _logits(self, ids: list[int]) -> torch.Tensor:
        """[len(ids), vocab_padded]: the logits after each position."""
        slot = self.model.allocate()
        try:
            rows = self.model.forward([slot], [ids])[0]
        finally:
            self.model.release(slot)
        return torch.cat([rows, torch.full((rows.shape[0], self.vocab_padded - self.vocab), GARBAGE)], dim=1)

    def _reusable(self, prompt: list[int]) -> int:
        """kvCacheManager: reuse matches whole tokens_per_block blocks from the start and never the
        prompt's last token (llmRequest.h setPrepopulatedPromptLen: TLLM_CHECK(prepopulatedPromptLen
        < promptLen)); blocks are stored when the earlier request completes (0.14 releases them
        for reuse at the end of the sequence), so requests of one batch do not reuse each other."""
        if not self.reuse_enabled:
            return 0
        n = 0
        while n + self.tpb <= len(prompt) - 1 and tuple(prompt[:n + self.tpb]) in self.stored:
            n += self.tpb
        return n

    def enqueue_requests(self, requests: list[Request]) -> list[int]:
        if not isinstance(requests, list) or not all(isinstance(r, Request) for r in requests):
            raise TypeError("enqueue_requests(requests: list[Request])")
        ids, finished = [], []
        for r in requests:
            rid = len(self.requests)
            self.requests.append(r)
            ids.append(rid)
            self.results[rid] = self._serve(r)
            if getattr(self.results[rid], "error", None) is None:     # a refused request stores no blocks
                finished.append(r.input_token_ids + list(self.results[rid].output_token_ids[0]))
        for seq in finished:        # completed: their full blocks become reusable
            self.stored.update(tuple(seq[:k]) for k in range(self.tpb, len(seq) + 1, self.tpb))
        return ids

    def _serve(self, r: Request) -> Any:
        prompt, out = r.input_token_ids, r.output_config
        if len(prompt) > int(self.build["max_input_len"]):
            return SimpleNamespace(error=f"prompt length {len(prompt)} exceeds max_input_len")
        draft = r.external_draft_tokens_config.tokens if r.external_draft_tokens_config else []
        if draft and not self.external:
            return SimpleNamespace(error="draft tokens need an engine built with draft_tokens_external")
        # executor.cpp: context logits need an engine built with gather_context_logits.
        if out.return_context_logits and not self.build.get("gather_context_logits"):
            return SimpleNamespace(error="Return context logit need to build engine with gather_context_logits")
        reused = self._reusable(prompt)
        self.reused.append(reused)
        full = self._logits(prompt + draft)
        # The engine accepts draft tokens while they equal its argmax, then adds its own token
        # (external draft tokens without logits: token comparison), then decodes on to max_tokens.
        tokens, k = [], 0
        while k < len(draft) and int(full[len(prompt) - 1 + k, :self.vocab].argmax()) == draft[k]:
            tokens.append(draft[k])
            k += 1
        step_logits = [full[len(prompt) - 1 + i] for i in range(k + 1)] if draft else [full[len(prompt) - 1]]
        tokens.append(int(step_logits[-1][:self.vocab].argmax()))
        while len(tokens) < r.max_tokens:
            row = self._logits(prompt + tokens)[-1]
            step_logits.append(row)
            tokens.append(int(row[:self.vocab].argmax()))
        result = SimpleNamespace(is_final=True, context_logits=None, generation_logits=None,
                                 output_token_ids=[tokens if out.exclude_input_from_output else prompt + tokens])
        if out.return_context_logits:
            # llmRequest.h allocContextLogitsHost: always [promptLen, vocabSizePadded]; handleContextLogits.cpp
            # copies only the computed rows, from getContextCurrentPosition() (= the reused length) on:
            # the reused rows keep whatever the pinned buffer held.
            ctx = torch.full((len(prompt), self.vocab_padded), GARBAGE)
            ctx[:reused] = torch.randn(reused, self.vocab_padded) * GARBAGE
            ctx[reused:] = full[reused:len(prompt)]
            result.context_logits = ctx
        if out.return_generation_logits:
            if not self.build.get("gather_generation_logits"):
                return SimpleNamespace(error="Return generation logit need to build engine with gather_generation_logits")
            if draft:
                # llmRequest.h allocTargetModelAcceptedTokenLogitsHost: [1, numDraftTokens + 1, vocabSizePadded],
                # filled from the context step (handleContextLogits.cpp copyLastContextLogits).
                result.generation_logits = full[len(prompt) - 1:].unsqueeze(0).clone()
            else:
                # llmRequest.h allocGenerationLogitsHost: [beamWidth, maxNewTokens, vocabSizePadded]; row 0 is
                # the last context position's (copyLastContextLogits), later rows one per decoding step.
                result.generation_logits = torch.stack(step_logits[:r.max_tokens]).unsqueeze(0)
        return result

    def await_responses(self, ids, timeout=None):
        if not isinstance(ids, list):
            raise TypeError("await_responses(ids: list[int], timeout)")
        responses = []
        for i in ids:
            result = self.results.pop(i)
            error = getattr(result, "error", None)
            responses.append([SimpleNamespace(request_id=i, has_error=lambda e=error: e is not None, error_msg=error,
                                              result=None if error else result)])
        return responses

    def cancel_request(self, request_id: int) -> None:
        self.results.pop(request_id, None)

    def shutdown(self) -> None:
        self.closed = True


def runtime() -> SimpleNamespace:
    """Stands in for `tensorrt_llm.bindings.executor` (monkeypatch trtllm_engine._runtime with it)."""
    return SimpleNamespace(
        ModelType=ModelType, CommunicationType=CommunicationType, CommunicationMode=CommunicationMode,
        OutputConfig=OutputConfig, ExternalDraftTokensConfig=ExternalDraftTokensConfig, KvCacheConfig=KvCacheConfig,
        ExecutorConfig=ExecutorConfig, ParallelConfig=ParallelConfig, OrchestratorConfig=OrchestratorConfig,
        Request=Request, Executor=FakeExecutor)


def engine_dir(path: Path, checkpoint: Path, tokens_per_block: int = 4, max_seq_len: int = 512,
               max_batch_size: int = 64, draft_tokens_external: bool = False, max_draft_len: int = 8,
               tp_size: int = 1) -> Path:
    """A folder like trtllm-build's output (0.14 config.json layout) plus build_engines' saguaro_source.json."""
    path.mkdir(parents=True, exist_ok=True)
    hf = json.loads((Path(checkpoint) / "config.json").read_text())
    build = {"max_input_len": max_seq_len - 1, "max_seq_len": max_seq_len, "max_batch_size": max_batch_size,
             "max_beam_width": 1, "gather_generation_logits": True,
             "gather_context_logits": not draft_tokens_external,
             "max_draft_len": max_draft_len if draft_tokens_external else 0,
             "speculative_decoding_mode": 2 if draft_tokens_external else 1,
             "plugin_config": {"use_paged_context_fmha": True, "tokens_per_block": tokens_per_block}}
    config = {"version": "0.14.0",
              "pretrained_config": {"architecture": hf["architectures"][0], "dtype": "float32",
                                    "vocab_size": hf["vocab_size"], "max_position_embeddings": hf["max_position_embeddings"],
                                    "mapping": {"world_size": tp_size, "tp_size": tp_size, "pp_size": 1}},
              "build_config": build}
    (path / "config.json").write_text(json.dumps(config))
    (path / ENGINE_SOURCE).write_text(json.dumps({"checkpoint": str(Path(checkpoint).resolve())}))
    for r in range(tp_size):
        (path / f"rank{r}.engine").write_bytes(b"")
    return path
