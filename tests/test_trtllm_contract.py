"""The TensorRT-LLM engine adapter against fakes of TensorRT-LLM 0.14.0's executor contract
(tests/trtllm_fakes.py): every logits row it returns for the calls a speculative decoder makes
equals the PyTorch engine's on the same checkpoint, and greedy SD/SSD through engine=trtllm
equals autoregressive decoding. CPU only; the one GPU test is marked gpu and skips here."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import trtllm_fakes as F
from saguaro.config import DEMO_DRAFT, DEMO_TARGET, DEV_PROMPTS, EngineConfig, SamplingParams, SpecConfig
from saguaro.engines import trtllm_engine as T
from saguaro.engines.torch_engine import TorchEngine
from saguaro.errors import SaguaroError
from saguaro.llm import build_decoder
from saguaro.text import load_tokenizer

ATOL = 1e-4
TPB = 4                  # small blocks: block reuse covers wanted rows often


@pytest.fixture
def fake_runtime(monkeypatch):
    monkeypatch.setattr(T, "_runtime", F.runtime)
    monkeypatch.setattr(T, "executor_worker", lambda: Path("/opt/tensorrt_llm/bin/executorWorker"))


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    tok = load_tokenizer(DEMO_TARGET)
    return [tok.encode(json.loads(line)["prompt"]).ids for line in DEV_PROMPTS.read_text().splitlines()]


def torch_engine(checkpoint: Path, branches: bool = False) -> TorchEngine:
    return TorchEngine(EngineConfig(checkpoint=str(checkpoint), dtype="float32", max_slots=4, max_seq_len=400,
                                    max_branches=8), branches=branches)


class Pair:
    """The adapter and the PyTorch engine driven with the same calls; every row compared."""

    def __init__(self, adapter: T.TrtllmEngine, reference: TorchEngine) -> None:
        self.a, self.r = adapter, reference
        self.slots: dict[str, tuple[int, int]] = {}
        self.rows = 0

    def new(self, name: str) -> None:
        self.slots[name] = (self.a.allocate(), self.r.allocate())

    def truncate(self, name: str, length: int) -> None:
        a, r = self.slots[name]
        self.a.truncate(a, length)
        self.r.truncate(r, length)
        assert self.a.length(a) == self.r.length(r) == length

    def forward(self, names: list[str], tokens: list[list[int]], logits: bool = True) -> list[torch.Tensor]:
        got = self.a.forward([self.slots[n][0] for n in names], tokens, logits)
        want = self.r.forward([self.slots[n][1] for n in names], tokens, logits)
        assert len(got) == len(want)
        for g, w in zip(got, want):
            assert g.shape == w.shape
            assert (g - w).abs().max() <= ATOL
            self.rows += g.shape[0]
        return want

    def branch_step(self, names: list[str], visible: list[int], tokens: list[int], depth: int) -> None:
        args = [torch.tensor(visible), torch.tensor(tokens), depth]
        got = self.a.branch_step(torch.tensor([self.slots[n][0] for n in names]), *args)
        want = self.r.branch_step(torch.tensor([self.slots[n][1] for n in names]), *args)
        assert got.shape == want.shape and (got - want).abs().max() <= ATOL
        self.rows += got.shape[0]


def argmax_tokens(logits: torch.Tensor, n: int) -> list[int]:
    return logits.argmax(-1).tolist()[:n]


# ---------------------------------------------------------------- the contract itself

def test_fake_request_is_keyword_only_like_the_bindings():
    with pytest.raises(TypeError):
        F.Request([1, 2, 3], 1)                                  # the adapter's old positional max_tokens
    with pytest.raises(RuntimeError, match="missing required argument max_tokens"):
        F.Request([1, 2, 3])
    assert F.Request([1, 2, 3], max_tokens=1).max_tokens == 1


def test_read_engine_config(tmp_path):
    d = F.engine_dir(tmp_path / "e", DEMO_TARGET, tokens_per_block=32)
    assert T.read_engine_config(d) == T.EngineLimits(4096, 512, 64, 1, tokens_per_block=32)
    ext = T.read_engine_config(F.engine_dir(tmp_path / "x", DEMO_TARGET, draft_tokens_external=True, max_draft_len=6))
    assert ext.draft_tokens_external and ext.max_draft_len == 6
    cfg = json.loads((d / "config.json").read_text())
    for change, match in (({"gather_context_logits": False}, "without --gather_context_logits"),
                          ({"gather_generation_logits": False}, "without --gather_generation_logits"),
                          ({"plugin_config": {"use_paged_context_fmha": False}}, "use_paged_context_fmha")):
        (d / "config.json").write_text(json.dumps({**cfg, "build_config": {**cfg["build_config"], **change}}))
        with pytest.raises(SaguaroError, match=match):
            T.read_engine_config(d)
    with pytest.raises(SaguaroError, match="no TensorRT-LLM engine"):
        T.read_engine_config(tmp_path / "nowhere")


def test_engine_without_gpu_names_the_fix(tmp_path):
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt_llm"):
        pytest.skip("this machine has CUDA and tensorrt_llm")
    with pytest.raises(SaguaroError, match="requires a GPU with TensorRT-LLM.*use engine=torch on CPU"):
        T.TrtllmEngine(F.engine_dir(tmp_path / "e", DEMO_TARGET))


def test_reuse_mirror_bounds_whole_blocks():
    m = T.ReuseMirror(4)
    assert m.reusable(list(range(20))) == 0
    m.store(list(range(10)))                          # blocks [0..4), [4..8); 8, 9 are no full block
    assert m.reusable(list(range(20))) == 8
    assert m.reusable(list(range(9))) == 8            # the last position is never reused
    assert m.reusable(list(range(8))) == 4
    assert m.reusable([0, 1, 2, 3, 9, 9, 9, 9, 9]) == 4
    small = T.ReuseMirror(4, capacity=2)
    small.store(list(range(12)))
    assert small.reusable(list(range(13))) == 0       # the first block left: nothing chains from it
    spec = T.RequestSpec(list(range(10)), 4, T.CONTEXT)
    assert T.stale_rows(spec, 8) == 2 and T.stale_rows(spec, 4) == 0 and T.stale_rows(spec, 16) == 4
    assert T.refill_requests(spec, 2) == [T.RequestSpec(list(range(7)), 1, T.GENERATION),
                                          T.RequestSpec(list(range(8)), 1, T.GENERATION)]


def test_rank_devices():
    assert T.rank_devices((), 4) is None
    assert T.rank_devices((2,), 1) == [2]
    assert T.rank_devices((2,), 4) == [2, 3, 4, 5]      # a KIND_GPU instance names only its first GPU
    assert T.rank_devices((0, 2, 4, 6), 4) == [0, 2, 4, 6]
    with pytest.raises(SaguaroError, match="names 2 GPUs for an engine built with tp_size=4"):
        T.rank_devices((0, 1), 4)


def test_placement_reaches_the_executor(tmp_path, fake_runtime):
    tp2 = F.engine_dir(tmp_path / "tp2", DEMO_TARGET, tp_size=2)
    eng = T.TrtllmEngine.from_config(EngineConfig(checkpoint=str(tp2), engine="trtllm", device="cuda:1",
                                                  kv_cache_free_gpu_memory_fraction=0.9))
    cfg = eng._executor.config
    assert cfg.parallel_config.device_ids == [1, 2]
    assert cfg.parallel_config.communication_mode == F.CommunicationMode.ORCHESTRATOR
    assert cfg.parallel_config.orchestrator_config.worker_executable_path == "/opt/tensorrt_llm/bin/executorWorker"
    assert cfg.kv_cache_config.free_gpu_memory_fraction == 0.9 and cfg.kv_cache_config.enable_block_reuse
    one = F.engine_dir(tmp_path / "tp1", DEMO_DRAFT)
    eng = T.TrtllmEngine.from_config(EngineConfig(checkpoint=str(one), engine="trtllm", device_ids=(3,)))
    assert eng._executor.config.parallel_config.device_ids == [3]
    assert eng._executor.config.kv_cache_config.free_gpu_memory_fraction == 0.4     # the shared-GPU default
    assert not hasattr(eng._executor.config, "gather_generation_logits")    # 0.14: a build flag only


def test_newer_executor_configs(tmp_path, monkeypatch):
    """TensorRT-LLM 1.x (nanobind executorConfig.cpp) has ExecutorConfig(gather_generation_logits=False)
    and KvCacheConfig(enable_partial_reuse=True); the adapter turns the first on, the second off."""
    rt = F.runtime()
    older_executor, older_kv = rt.ExecutorConfig, rt.KvCacheConfig
    rt.ExecutorConfig = lambda **kw: SimpleNamespace(**vars(older_executor(**kw)), gather_generation_logits=False)
    # KvCacheConfig(..., *, enable_partial_reuse=True, ...): partial-block reuse, on by default
    rt.KvCacheConfig = lambda enable_partial_reuse=True, **kw: SimpleNamespace(
        **vars(older_kv(**kw)), enable_partial_reuse=enable_partial_reuse)
    monkeypatch.setattr(T, "_runtime", lambda: rt)
    eng = T.TrtllmEngine(F.engine_dir(tmp_path / "e", DEMO_DRAFT))
    assert eng._executor.config.gather_generation_logits is True
    assert eng._executor.config.kv_cache_config.enable_partial_reuse is False


def test_kv_fraction_is_checked():
    with pytest.raises(SaguaroError, match="kv_cache_free_gpu_memory_fraction=1.5"):
        EngineConfig(engine="trtllm", kv_cache_free_gpu_memory_fraction=1.5).validate()


# ---------------------------------------------------------------- logits, row by row, against the PyTorch engine

def test_target_calls_match_the_pytorch_engine(tmp_path, fake_runtime, prompts):
    adapter = T.TrtllmEngine(F.engine_dir(tmp_path / "t", DEMO_TARGET, tokens_per_block=TPB), max_slots=4)
    p = Pair(adapter, torch_engine(DEMO_TARGET))
    fake = adapter._executor
    prompt = prompts[0][:37]
    p.new("a")
    assert p.forward(["a"], [prompt[:-1]], logits=False) == []            # prefill
    req = fake.requests[-1]
    assert req.max_tokens == 1 and not req.output_config.return_context_logits \
        and not req.output_config.return_generation_logits, "a prefill asks for no logits"
    first = p.forward(["a"], [prompt[-1:]])[0]                              # one token: generation logits
    x = int(first.argmax())
    drafts = [x, 11, 12, 13]
    verify = p.forward(["a"], [drafts])[0]                                  # K+1 verify: context logits
    start = len(prompt)
    p.truncate("a", start + 2)                                              # rejection: 1 of 3 accepted
    # Re-verify over tokens submitted before: the previous request stored blocks covering them.
    n = len(fake.requests)
    p.forward(["a"], [drafts[2:] + [int(verify[1].argmax())]])
    assert fake.reused[n] == 40 > start + 2, "block reuse skipped the first wanted row"
    assert [len(r.input_token_ids) for r in fake.requests[n + 1:]] == [40], "and the adapter recomputed it"
    # Several slots in one call: a repeated prompt (every full block reused) and a new one.
    p.new("b")
    p.new("c")
    p.forward(["b", "c"], [prompt, prompts[1][:29]])
    stale_before = len(fake.requests)
    p.forward(["b", "c"], [drafts, [5, 6, 7]])
    p.truncate("b", len(prompt) + 1)
    p.truncate("c", 30)
    p.forward(["b", "c"], [drafts[1:], [6, 7, 8, 9]])
    refills = [r for r in fake.requests[stale_before:] if r.output_config.return_generation_logits]
    assert refills, "the repeated prompt's reused rows were recomputed by one-token requests"
    p.forward(["c"], [[1]])
    assert p.rows >= 20


def test_stale_rows_would_reach_verification_without_the_mirror(tmp_path, fake_runtime, prompts):
    """The fake really returns garbage for reused rows: reading the context logits as-is would be wrong."""
    adapter = T.TrtllmEngine(F.engine_dir(tmp_path / "t", DEMO_TARGET, tokens_per_block=TPB), max_slots=2)
    prompt = prompts[2][:21]
    a = adapter.allocate()
    adapter.forward([a], [prompt])
    fake = adapter._executor
    req = F.Request(prompt, max_tokens=1, output_config=F.OutputConfig(return_context_logits=True))
    (result,), = [[r.result for r in rs] for rs in fake.await_responses(fake.enqueue_requests([req]))]
    assert result.context_logits.shape == (len(prompt), fake.vocab_padded)   # full length, always
    reference = torch_engine(DEMO_TARGET)
    want = reference.forward([reference.allocate()], [prompt])[0]
    reused = fake.reused[-1]
    assert reused == 20
    assert (result.context_logits[:reused, :4096] - want[:reused]).abs().max() > 1.0
    assert (result.context_logits[reused:, :4096] - want[reused:]).abs().max() <= ATOL


def test_draft_calls_match_the_pytorch_engine(tmp_path, fake_runtime, prompts):
    adapter = T.TrtllmEngine(F.engine_dir(tmp_path / "d", DEMO_DRAFT, tokens_per_block=TPB), max_slots=4, max_branches=8)
    p = Pair(adapter, torch_engine(DEMO_DRAFT, branches=True))
    p.new("a")
    p.new("b")
    pa, pb = prompts[3][:26], prompts[4][:19]
    p.forward(["a", "b"], [pa[:-1], pb[:-1]], logits=False)
    p.forward(["a", "b"], [pa[-1:], pb[-1:]])
    # The speculation cache: branches off both parents, some seeing less than the whole prefix.
    na, nb = len(pa), len(pb)
    parents, visible = ["a", "a", "a", "b", "b"], [na, na, na - 2, nb, nb - 1]
    p.branch_step(parents, visible, [5, 6, 7, 8, 9], 0)
    p.branch_step(parents, visible, [10, 11, 12, 13, 14], 1)
    p.branch_step(parents, visible, [15, 16, 17, 18, 19], 2)
    # A cache hit: the accepted branch's tokens become the history (submitted before as branch
    # prompts, so their blocks are reusable) and the glue forward covers them.
    p.forward(["a"], [[5, 10, 15, 20]])
    p.truncate("b", nb - 1)
    p.forward(["b"], [[pb[-1], 8, 13]])
    assert p.rows >= 15


def test_draft_tokens_external_target(tmp_path, fake_runtime, prompts):
    """Greedy rounds send the speculation as draft tokens and read the engine's own acceptance;
    logits rounds use one-token requests (this engine has no context logits)."""
    d = F.engine_dir(tmp_path / "x", DEMO_TARGET, tokens_per_block=TPB, draft_tokens_external=True, max_draft_len=6)
    adapter = T.TrtllmEngine(d, max_slots=2)
    assert adapter.limits.max_draft_len == 6
    p = Pair(adapter, torch_engine(DEMO_TARGET))
    fake = adapter._executor
    prompt = prompts[5][:30]
    p.new("a")
    p.forward(["a"], [prompt[:-1]], logits=False)
    first = p.forward(["a"], [prompt[-1:]])[0]
    best = [int(first.argmax())]
    ref_slot = p.slots["a"][1]
    for _ in range(3):                                     # the greedy continuation, as the draft would guess it
        best.append(int(p.r.forward([ref_slot], [[best[-1]]])[0].argmax()))
    p.r.truncate(ref_slot, len(prompt))
    for drafts in ([best[0], best[1], best[2], best[3]], [best[0], best[1], 999, 5]):
        start = adapter.length(p.slots["a"][0])
        n = len(fake.requests)
        ids = adapter.forward_greedy([p.slots["a"][0]], [drafts])[0]
        want = p.r.forward([ref_slot], [drafts])[0].argmax(-1)
        (req,) = fake.requests[n:]
        assert req.external_draft_tokens_config.tokens == drafts[1:] and req.max_tokens == len(drafts)
        assert not req.output_config.return_context_logits and not req.output_config.return_generation_logits
        k = 0
        while k < len(drafts) - 1 and drafts[k + 1] == int(want[k]):
            k += 1
        assert ids[:k + 1].tolist() == want[:k + 1].tolist() and (ids[k + 1:] == -1).all()
        adapter.truncate(p.slots["a"][0], start)
        p.r.truncate(ref_slot, start)
    with pytest.raises(SaguaroError, match="num_draft_tokens=7 exceeds the target engine's max_draft_len=6"):
        adapter.forward_greedy([p.slots["a"][0]], [[best[0]] + [5] * 7])
    n = len(fake.requests)
    p.forward(["a"], [[best[0], best[1], 7, 8]])           # sampled rounds: exact logits, row by row
    assert len(fake.requests) - n == 4
    assert all(r.output_config.return_generation_logits and not r.output_config.return_context_logits
               for r in fake.requests[n:])


def test_long_prompts_get_one_request_per_row(tmp_path, fake_runtime, prompts):
    """Past context_logits_values the prompt's whole context logits are not worth shipping."""
    d = F.engine_dir(tmp_path / "t", DEMO_TARGET, tokens_per_block=TPB)
    adapter = T.TrtllmEngine(d, max_slots=1, context_logits_values=4096 * 20)     # prompts up to 20 tokens
    p = Pair(adapter, torch_engine(DEMO_TARGET))
    fake = adapter._executor
    p.new("a")
    p.forward(["a"], [prompts[6][:12]])
    assert fake.requests[-1].output_config.return_context_logits                  # 12 positions: context logits
    n = len(fake.requests)
    p.forward(["a"], [prompts[6][12:16]])
    assert fake.requests[-1].output_config.return_context_logits
    p.forward(["a"], [prompts[6][16:21]])                                          # 21 positions: per row
    assert [len(r.input_token_ids) for r in fake.requests[n + 1:]] == [17, 18, 19, 20, 21]
    assert not any(r.output_config.return_context_logits for r in fake.requests[n + 1:])


# ---------------------------------------------------------------- the whole decoder through engine=trtllm

@pytest.mark.parametrize("mode,external", [("ssd", False), ("sd", False), ("ssd", True)])
def test_greedy_speculative_through_trtllm_equals_ar(tmp_path, fake_runtime, prompts, mode, external):
    params = SamplingParams(max_tokens=20)
    ar = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET)), draft=None)
    try:
        want = [ar.generate([p[:40]], params, "ar")[0] for p in prompts[:3]]
    finally:
        ar.close()
    target = F.engine_dir(tmp_path / "t", DEMO_TARGET, tokens_per_block=TPB, draft_tokens_external=external)
    draft = F.engine_dir(tmp_path / "d", DEMO_DRAFT, tokens_per_block=TPB)
    dec = build_decoder(EngineConfig(checkpoint=str(target), engine="trtllm", max_slots=4),
                        EngineConfig(checkpoint=str(draft), engine="trtllm", max_slots=4, max_branches=8),
                        SpecConfig(k=3, budget=6), draft_process=False)
    try:
        got = [dec.generate([p[:40]], params, mode)[0] for p in prompts[:3]]
        accepted = sum(s.accepted for s in dec.history)
    finally:
        dec.close()
    assert got == want
    assert accepted > 0, "the draft's speculations were verified through the adapter"


@pytest.mark.parametrize("mode", ["ssd", "sd"])
def test_a_request_as_long_as_max_seq_len_drafts_within_the_draft_engine(tmp_path, fake_runtime, prompts, mode):
    """prompt + max_tokens = the engines' limit (max_seq_len 61, trtllm-build's max_input_len 60 as
    build_engines builds it; TensorRT-LLM refuses a longer prompt, llmRequest.h validate()): the
    drafter drafted K tokens, and pre-drafted K past the longest outcome, whatever the request had
    left, so its last rounds failed in the draft engine (served, every request in flight then lost speculation)."""
    params = SamplingParams(max_tokens=20)
    ar = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET)), draft=None)
    try:
        want = ar.generate([prompts[0][:40]], params, "ar")[0]
    finally:
        ar.close()
    target = F.engine_dir(tmp_path / "t", DEMO_TARGET, tokens_per_block=TPB, max_seq_len=61)
    draft = F.engine_dir(tmp_path / "d", DEMO_DRAFT, tokens_per_block=TPB, max_seq_len=61)
    dec = build_decoder(EngineConfig(checkpoint=str(target), engine="trtllm", max_slots=4),
                        EngineConfig(checkpoint=str(draft), engine="trtllm", max_slots=4, max_branches=8),
                        SpecConfig(k=4, budget=6, policy=False), draft_process=False)
    assert dec.target.max_seq_len == 60 == len(prompts[0][:40]) + params.max_tokens
    degraded, real = [], dec._degrade
    dec._degrade = lambda: (degraded.append(True), real())
    try:
        got = dec.generate([prompts[0][:40]], params, mode)[0]
    finally:
        dec.close()
    assert got == want and not degraded


# ---------------------------------------------------------------- a real GPU

@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("tensorrt_llm")),
                    reason="needs a CUDA GPU and tensorrt_llm (nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3)")
def test_trtllm_engine_matches_transformers_on_gpu(tmp_path):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from build_engines import build as B
    from transformers import AutoModelForCausalLM
    result = B.build(B.BuildOptions(target=str(DEMO_TARGET), draft=str(DEMO_DRAFT), output=str(tmp_path),
                                    backend="trtllm", max_seq_len=512, dtype="float32"))
    eng = T.TrtllmEngine(result.target, max_slots=1)
    ref = AutoModelForCausalLM.from_pretrained(DEMO_TARGET, dtype=torch.float32).eval()
    ids = [5, 17, 300, 2, 99, 100, 101]
    slot = eng.allocate()
    got = torch.cat(eng.forward([slot], [ids[:4]]) + eng.forward([slot], [ids[4:]]))
    want = ref(input_ids=torch.tensor([ids])).logits[0]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 1e-2
    eng.close()
