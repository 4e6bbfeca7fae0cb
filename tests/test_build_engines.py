"""build_engines/build.py, saguaro.pair, the TensorRT-LLM engine's request building, docker-compose.yml.

Everything here runs on CPU; the one test that needs CUDA + tensorrt_llm is marked gpu and skips."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import shlex
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from build_engines import build as B  # noqa: E402
from saguaro.engines import trtllm_engine as T  # noqa: E402
from saguaro.errors import SaguaroError  # noqa: E402
from saguaro.pair import validate_pair  # noqa: E402

DEMO_T = ROOT / "models" / "demo-code-target"
DEMO_D = ROOT / "models" / "demo-code-draft"

# The documented CLIs: trtllm-build (tensorrt_llm/commands/build.py, plugin options from
# PluginConfig, https://nvidia.github.io/TensorRT-LLM/commands/trtllm-build.html) and
# examples/{llama,qwen}/convert_checkpoint.py. Value None: a store_true flag.
TRTLLM_BUILD_FLAGS = {"--checkpoint_dir": str, "--output_dir": str, "--gemm_plugin": {"auto"},
                      "--use_paged_context_fmha": {"enable"}, "--max_batch_size": int, "--max_input_len": int,
                      "--max_seq_len": int, "--gather_context_logits": None, "--gather_generation_logits": None,
                      "--speculative_decoding_mode": {"draft_tokens_external"}, "--max_draft_len": int}
CONVERT_FLAGS = {"--model_dir": str, "--output_dir": str, "--dtype": {"float32", "bfloat16", "float16"},
                 "--tp_size": int}


def flags(argv: list[str], documented: dict) -> dict[str, str | bool]:
    """argv's --flags as a dict, asserting each flag and value fits the documented CLI."""
    out: dict[str, str | bool] = {}
    i = 0
    while i < len(argv):
        name = argv[i]
        assert name in documented, f"{name} is not a documented flag"
        kind = documented[name]
        if kind is None:
            out[name] = True
            i += 1
            continue
        value = argv[i + 1]
        if kind is int:
            int(value)
        elif isinstance(kind, set):
            assert value in kind, f"{name} {value} not in {kind}"
        out[name] = value
        i += 2
    return out


def dry_run_commands(capsys, argv: list[str]) -> list[list[str]]:
    assert B.main(argv + ["--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return [shlex.split(line.split("would run: ", 1)[1]) for line in lines if "would run: " in line]


def copy_pair(tmp_path: Path, arch: str = "LlamaForCausalLM", **draft_changes) -> tuple[Path, Path]:
    """Config + tokenizer copies of the demo pair (no weights) with the given architecture."""
    dirs = []
    for role, src in (("target", DEMO_T), ("draft", DEMO_D)):
        d = tmp_path / role
        d.mkdir()
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
            shutil.copy(src / name, d / name)
        cfg = json.loads((d / "config.json").read_text())
        cfg["architectures"] = [arch]
        cfg["model_type"] = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3"}.get(arch, "llama")
        if role == "draft":
            cfg.update(draft_changes)
        (d / "config.json").write_text(json.dumps(cfg))
        dirs.append(d)
    return dirs[0], dirs[1]


# ---------------------------------------------------------------- dry-run command lines

def test_dry_run_trtllm_llama_demo_pair(tmp_path, capsys):
    out, examples = tmp_path / "out", tmp_path / "TensorRT-LLM" / "examples"
    cmds = dry_run_commands(capsys, ["--target", str(DEMO_T), "--draft", str(DEMO_D), "--output", str(out),
                                     "--backend", "trtllm", "--tp-size", "2", "--max-seq-len", "1024",
                                     "--max-draft-len", "6", "--draft-tokens-external",
                                     "--trtllm-examples", str(examples)])
    assert [c[0] for c in cmds] == [sys.executable, "trtllm-build", sys.executable, "trtllm-build"]
    base = out.resolve() / "trtllm"
    for role, (convert, build), tp, batch in (("target", cmds[:2], "2", "8"), ("draft", cmds[2:], "1", "64")):
        assert convert[1] == str(examples / "llama" / "convert_checkpoint.py")   # the 0.14 layout
        c = flags(convert[2:], CONVERT_FLAGS)
        assert c == {"--model_dir": str((DEMO_T if role == "target" else DEMO_D).resolve()),
                     "--output_dir": str(base / role / "checkpoint"), "--dtype": "bfloat16", "--tp_size": tp}
        b = flags(build[1:], TRTLLM_BUILD_FLAGS)
        expected = {"--checkpoint_dir": str(base / role / "checkpoint"), "--output_dir": str(base / role / "engine"),
                    "--gemm_plugin": "auto", "--use_paged_context_fmha": "enable", "--max_batch_size": batch,
                    "--max_input_len": "1023", "--max_seq_len": "1024", "--gather_context_logits": True,
                    "--gather_generation_logits": True}
        if role == "target":
            expected |= {"--speculative_decoding_mode": "draft_tokens_external", "--max_draft_len": "6"}
        assert b == expected
    assert not out.exists(), "a dry run writes nothing"


@pytest.mark.parametrize("arch", ["Qwen2ForCausalLM", "Qwen3ForCausalLM"])
def test_dry_run_trtllm_qwen_pair(tmp_path, capsys, arch):
    target, draft = copy_pair(tmp_path, arch)
    examples = tmp_path / "examples"
    newer = examples / "models" / "core" / "qwen" / "convert_checkpoint.py"
    newer.parent.mkdir(parents=True)
    newer.touch()
    cmds = dry_run_commands(capsys, ["--target", str(target), "--draft", str(draft), "--output", str(tmp_path / "o"),
                                     "--backend", "trtllm", "--dtype", "float16", "--trtllm-examples", str(examples)])
    converts = [c for c in cmds if c[0] == sys.executable]
    assert [c[1] for c in converts] == [str(newer)] * 2
    assert {flags(c[2:], CONVERT_FLAGS)["--dtype"] for c in converts} == {"float16"}
    builds = [flags(c[1:], TRTLLM_BUILD_FLAGS) for c in cmds if c[0] == "trtllm-build"]
    assert all("--speculative_decoding_mode" not in b for b in builds)
    # default max_seq_len: both contexts are 2048 here
    assert {b["--max_seq_len"] for b in builds} == {"2048"}


def test_dry_run_torch_lists_files(tmp_path, capsys):
    assert B.main(["--target", str(DEMO_T), "--draft", str(DEMO_D), "--output", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for role in ("target", "draft"):
        for name in ("config.json", "model.safetensors", "tokenizer.json", "model.onnx"):
            assert f"would write {(tmp_path / 'o').resolve() / 'torch' / role / name}" in out
    assert not (tmp_path / "o").exists()


def test_convert_script_layouts(tmp_path):
    assert B.convert_script(tmp_path, "llama") == tmp_path / "llama" / "convert_checkpoint.py"
    newer = tmp_path / "models" / "core" / "llama" / "convert_checkpoint.py"
    newer.parent.mkdir(parents=True)
    newer.touch()
    assert B.convert_script(tmp_path, "llama") == newer
    assert B.resolve_dtype("auto", "bfloat16") == "bfloat16"
    assert B.resolve_dtype("auto", "") == "float16"
    assert B.resolve_dtype("float32", "bfloat16") == "float32"


def test_trtllm_build_without_tools_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(B.shutil, "which", lambda name: None)
    with pytest.raises(SaguaroError, match="trtllm-build not found.*--backend torch"):
        B.build(B.BuildOptions(target=str(DEMO_T), draft=str(DEMO_D), output=str(tmp_path), backend="trtllm"))


# ---------------------------------------------------------------- pair validation

def test_demo_pair_is_valid():
    info = validate_pair(DEMO_T, DEMO_D, num_draft_tokens=4, max_draft_len=8, max_seq_len=2048)
    assert (info.vocab_size, info.eos_token_ids, info.bos_token_id, info.max_context) == (4096, (0,), 0, 2048)
    assert info.target.family == info.draft.family == "llama"
    assert info.target.dtype == "bfloat16" and len(info.tokenizer_sha256) == 64


def _edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("case, match", [
    ("vocab_size", r"vocab_size: target 4096 != draft 5000"),
    ("tokenizer_vocab", r"tokenizer vocab differs"),
    ("tokenizer_merges", r"tokenizer model rules differ"),
    ("architecture", r"architectures=GPT2LMHeadModel is not supported; use a model of one of LlamaForCausalLM"),
    ("bos", r"bos_token_id: target 0 != draft 7"),
    ("eos", r"eos_token_id: .* share no end token"),
    ("no_config", r"no config.json"),
    ("no_tokenizer", r"no tokenizer.json"),
])
def test_bad_pairs(tmp_path, case, match):
    target, draft = copy_pair(tmp_path)
    if case == "vocab_size":
        _edit_json(draft / "config.json", lambda c: c.update(vocab_size=5000))
    elif case == "tokenizer_vocab":
        _edit_json(draft / "tokenizer.json", lambda t: t["model"]["vocab"].update({"zzz_new": 4095}))
    elif case == "tokenizer_merges":
        _edit_json(draft / "tokenizer.json", lambda t: t["model"]["merges"].pop())
    elif case == "architecture":
        _edit_json(draft / "config.json", lambda c: c.update(architectures=["GPT2LMHeadModel"]))
    elif case == "bos":
        _edit_json(draft / "config.json", lambda c: c.update(bos_token_id=7))
    elif case == "eos":
        _edit_json(draft / "config.json", lambda c: c.update(eos_token_id=[5, 6]))
    elif case == "no_config":
        (draft / "config.json").unlink()
    elif case == "no_tokenizer":
        (draft / "tokenizer.json").unlink()
    with pytest.raises(SaguaroError, match=match):
        validate_pair(target, draft)


def test_eos_overlap_is_enough(tmp_path):
    # A base draft (one end token) with an instruct target (several) is a valid pair.
    target, draft = copy_pair(tmp_path)
    _edit_json(target / "config.json", lambda c: c.update(eos_token_id=[0, 3]))
    assert validate_pair(target, draft).eos_token_ids == (0, 3)


def test_limits_errors():
    with pytest.raises(SaguaroError, match=r"num_draft_tokens=9 > max_draft_len=8: .*--max-draft-len 9"):
        validate_pair(DEMO_T, DEMO_D, num_draft_tokens=9, max_draft_len=8)
    with pytest.raises(SaguaroError, match=r"num_draft_tokens=0: must be >= 1"):
        validate_pair(DEMO_T, DEMO_D, num_draft_tokens=0)
    with pytest.raises(SaguaroError, match=r"max_seq_len=4096 exceeds the target's max_position_embeddings=2048"):
        validate_pair(DEMO_T, DEMO_D, max_seq_len=4096)


def test_cli_reports_bad_pair_and_prompt_limits(tmp_path, capsys):
    base = ["--target", str(DEMO_T), "--draft", str(DEMO_D), "--output", str(tmp_path), "--dry-run"]
    assert B.main(base + ["--num-draft-tokens", "12"]) == 2
    assert "num_draft_tokens=12 > max_draft_len=8" in capsys.readouterr().err
    assert B.main(base + ["--max-seq-len", "512", "--max-input-len", "510"]) == 2
    assert "max_input_len=510: a prompt plus one round of max_draft_len+1=9 tokens must fit in max_seq_len=512; " \
           "use --max-input-len <= 503" in capsys.readouterr().err


# ---------------------------------------------------------------- model repository template filling

SAMPLE_PBTXT = '''name: "target"
backend: "python"
max_batch_size: 0
parameters: {
  key: "engine"
  value: {
    string_value: "torch"
  }
}
parameters { key: "checkpoint" value: { string_value: "${checkpoint}" } }
parameters { key: "threads" value: { string_value: "1" } }
parameters [
  # a list form, as the repository's own files use
  { key: "tokenizer_dir" value: { string_value: "${model_repository}/../models/demo-code-target" } },
  { key: "max_tokens_limit", value: { string_value: "512" } }
]
instance_group [ { count: 1, kind: KIND_CPU } ]
ensemble_scheduling { step [ { model_name: "x" model_version: -1 input_map { key: "engine" value: "engine" } } ] }
'''


def test_fill_parameters_replaces_adds_and_preserves():
    text = B.fill_parameters(SAMPLE_PBTXT, {"engine": "trtllm", "checkpoint": "/e/target", "max_seq_len": "2048",
                                            "note": 'say "hi" \\ bye', "tokenizer_dir": "/m/t",
                                            "max_tokens_limit": "64"})
    assert 'string_value: "trtllm"' in text and "torch" not in text
    assert 'parameters { key: "checkpoint" value: { string_value: "/e/target" } }' in text
    assert 'key: "max_seq_len"\n  value: { string_value: "2048" }' in text
    assert r'string_value: "say \"hi\" \\ bye"' in text
    assert '{ key: "tokenizer_dir" value: { string_value: "/m/t" } },' in text
    assert '{ key: "max_tokens_limit", value: { string_value: "64" } }\n]' in text
    for kept in ('name: "target"', 'backend: "python"', 'key: "threads" value: { string_value: "1" }',
                 "instance_group [ { count: 1, kind: KIND_CPU } ]", "# a list form",
                 'input_map { key: "engine" value: "engine" }'):
        assert kept in text
    assert text.count('key: "engine"') == 2       # the parameter and the untouched input_map entry
    assert B.fill_parameters(text, {"engine": "trtllm", "max_seq_len": "2048"}) == text   # idempotent


def test_filled_configs_parse_as_triton_model_configs():
    text_format = pytest.importorskip("google.protobuf.text_format")
    pb = pytest.importorskip("tritonclient.grpc.model_config_pb2")
    params = {"engine": "trtllm", "tokenizer_dir": "/m/t", "max_seq_len": "2048"}
    texts = [SAMPLE_PBTXT, *(p.read_text() for p in sorted((ROOT / "model_repository").glob("*/config.pbtxt")))]
    for text in texts:
        config = text_format.Parse(B.fill_parameters(text, params), pb.ModelConfig())
        assert {k: config.parameters[k].string_value for k in params} == params


def test_fill_model_repository(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.pbtxt").write_text(SAMPLE_PBTXT)
    params = {"target": {"engine": "trtllm"}, "draft": {"engine": "trtllm"}}
    assert B.fill_model_repository(tmp_path, params, dry_run=True) == [tmp_path / "target" / "config.pbtxt"]
    assert (tmp_path / "target" / "config.pbtxt").read_text() == SAMPLE_PBTXT
    B.fill_model_repository(tmp_path, params)
    assert 'string_value: "trtllm"' in (tmp_path / "target" / "config.pbtxt").read_text()
    assert not (tmp_path / "draft").exists()


# ---------------------------------------------------------------- torch build

def test_torch_build_demo_pair(tmp_path, capsys):
    import onnx
    from onnx.reference import ReferenceEvaluator
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    repo = tmp_path / "repo"
    (repo / "target").mkdir(parents=True)
    (repo / "target" / "config.pbtxt").write_text(SAMPLE_PBTXT)
    result = B.build_torch(DEMO_T, DEMO_D, tmp_path / "out", model_repository=str(repo))
    assert result.target == (tmp_path / "out").resolve() / "torch" / "target"
    for src, dst in ((DEMO_T, result.target), (DEMO_D, result.draft)):
        a, b = load_file(src / "model.safetensors"), load_file(dst / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (dst / name).is_file()
        onnx.checker.check_model(str(dst / "model.onnx"))
    assert result.onnx == [result.target / "model.onnx", result.draft / "model.onnx"]
    # The draft's ONNX graph computes the model's logits, at a length other than the export's.
    ids = torch.tensor([[5, 17, 300, 2, 99]])
    ref = AutoModelForCausalLM.from_pretrained(DEMO_D, dtype=torch.float32).eval()(input_ids=ids).logits
    got = ReferenceEvaluator(str(result.draft / "model.onnx")).run(None, {"input_ids": ids.numpy()})[0]
    assert got.shape == (1, 5, 4096) and abs(got - ref.detach().numpy()).max() < 1e-3
    pbtxt = (repo / "target" / "config.pbtxt").read_text()
    assert f'string_value: "{result.target}"' in pbtxt and 'key: "max_seq_len"' in pbtxt
    summary = json.loads((result.output / "build.json").read_text())
    assert summary["parameters"]["draft"]["checkpoint"] == str(result.draft)
    capsys.readouterr()
    B.build_torch(DEMO_T, DEMO_D, tmp_path / "out")
    assert capsys.readouterr().out.count("skipped") == 4


def test_torch_build_cast_never_touches_the_source(tmp_path):
    src_hash = hashlib.sha256((DEMO_D / "model.safetensors").read_bytes()).hexdigest()
    # First hard-linked, then cast in place of the link: the source must stay as it was.
    B.build_torch(DEMO_T, DEMO_D, tmp_path, onnx=False)
    result = B.build_torch(DEMO_T, DEMO_D, tmp_path, onnx=False, dtype="float32")
    from safetensors.torch import load_file
    assert {t.dtype for t in load_file(result.draft / "model.safetensors").values()} == {torch.float32}
    assert json.loads((result.draft / "config.json").read_text())["torch_dtype"] == "float32"
    assert hashlib.sha256((DEMO_D / "model.safetensors").read_bytes()).hexdigest() == src_hash


# ---------------------------------------------------------------- TensorRT-LLM engine: request building

def test_forward_and_branch_requests():
    hist = [[1, 2, 3], [7]]
    specs = T.forward_requests(hist, [[4, 5, 6], [8]])
    assert specs == [T.RequestSpec([1, 2, 3, 4, 5, 6], 3, True), T.RequestSpec([7, 8], 1, False)]
    branches = T.extend_branches(None, [10, 11], 0)
    branches = T.extend_branches(branches, [12, 13], 1)
    assert branches == [[10, 12], [11, 13]]
    assert T.branch_requests(hist, [0, 0], [2, 3], branches) == [
        T.RequestSpec([1, 2, 10, 12], 1, False), T.RequestSpec([1, 2, 3, 11, 13], 1, False)]
    with pytest.raises(SaguaroError, match="must follow depth 1"):
        T.extend_branches(branches, [1, 2, 3], 2)
    with pytest.raises(SaguaroError, match="visible=5 outside parent slot 1"):
        T.branch_requests(hist, [1], [5], [[1]])


def test_take_logits_and_refill():
    spec = T.RequestSpec([1, 2, 3, 4, 5, 6], 3, True)
    ctx = torch.arange(6 * 6, dtype=torch.float16).reshape(6, 6)      # padded vocab 6 > 4
    rows, missing = T.take_logits(spec, ctx, None, 4)
    assert missing == 0 and rows.dtype == torch.float32 and torch.equal(rows, ctx[3:, :4].float())
    rows, missing = T.take_logits(spec, ctx[-2:], None, 4)              # block reuse covered position 3
    assert missing == 1 and rows.shape == (2, 4)
    assert T.refill_requests(spec, 1) == [T.RequestSpec([1, 2, 3, 4], 1, False)]
    gen = torch.ones(1, 1, 6)
    rows, missing = T.take_logits(T.RequestSpec([1], 1, False), None, gen, 4)
    assert rows.shape == (1, 4) and missing == 0
    with pytest.raises(SaguaroError, match="gather_context_logits"):
        T.take_logits(spec, None, gen, 4)


def _engine_config(tmp_path: Path, **build) -> Path:
    cfg = {"pretrained_config": {"vocab_size": 8, "mapping": {"tp_size": 1}},
           "build_config": {"max_seq_len": 64, "max_batch_size": 16, "gather_context_logits": True,
                            "gather_generation_logits": True, "plugin_config": {"use_paged_context_fmha": True},
                            **build}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_read_engine_config(tmp_path):
    assert T.read_engine_config(_engine_config(tmp_path)) == T.EngineLimits(8, 64, 16, 1)
    with pytest.raises(SaguaroError, match="without --gather_context_logits"):
        T.read_engine_config(_engine_config(tmp_path, gather_context_logits=False))
    with pytest.raises(SaguaroError, match="use_paged_context_fmha"):
        T.read_engine_config(_engine_config(tmp_path, plugin_config={"use_paged_context_fmha": False}))
    with pytest.raises(SaguaroError, match="no TensorRT-LLM engine"):
        T.read_engine_config(tmp_path / "nowhere")


def test_engine_without_gpu_names_the_fix(tmp_path):
    if torch.cuda.is_available() and importlib.util.find_spec("tensorrt_llm"):
        pytest.skip("this machine has CUDA and tensorrt_llm")
    with pytest.raises(SaguaroError, match="requires a GPU with TensorRT-LLM.*use engine=torch on CPU"):
        T.TrtllmEngine(_engine_config(tmp_path))


V = 8
BLOCK = 4


def reference_logits(prefix: list[int]) -> torch.Tensor:
    """A stand-in model: the logits at a position depend on the whole prefix up to it."""
    g = torch.Generator().manual_seed(hash(tuple(prefix)) % (2 ** 31))
    return torch.randn(V + 2, generator=g)          # padded vocab, as with tensor parallelism


class FakeExecutor:
    """The executor calls TrtllmEngine makes, with block reuse: full blocks of earlier prompts are
    not recomputed, so their context logits are not returned (as TensorRT-LLM does)."""

    def __init__(self, path, model_type, config) -> None:
        self.stored: set[tuple[int, ...]] = set()
        self.results: dict[int, SimpleNamespace] = {}
        self.prompts: list[list[int]] = []

    def enqueue_requests(self, requests) -> list[int]:
        ids = []
        for r in requests:
            ids.append(len(self.prompts))
            self.prompts.append(r.ids)
            n = len(r.ids)
            reused = max((k for k in range(0, n, BLOCK) if tuple(r.ids[:k]) in self.stored), default=0)
            ctx = torch.stack([reference_logits(r.ids[:i + 1]) for i in range(reused, n)])
            self.results[ids[-1]] = SimpleNamespace(
                is_final=True, context_logits=ctx if r.cfg.return_context_logits else None,
                generation_logits=ctx[-1:].unsqueeze(0) if r.cfg.return_generation_logits else None)
            self.stored.update(tuple(r.ids[:k]) for k in range(BLOCK, n + 1, BLOCK))
        return ids

    def await_responses(self, ids, timeout):
        return [[SimpleNamespace(has_error=lambda: False, result=self.results.pop(i))] for i in ids]


def fake_runtime() -> SimpleNamespace:
    return SimpleNamespace(
        KvCacheConfig=lambda **kw: kw, ExecutorConfig=lambda **kw: SimpleNamespace(**kw),
        ModelType=SimpleNamespace(DECODER_ONLY=0), Executor=FakeExecutor,
        OutputConfig=lambda **kw: SimpleNamespace(**kw),
        Request=lambda ids, max_tokens, output_config: SimpleNamespace(ids=list(ids), cfg=output_config))


def test_trtllm_engine_on_a_fake_executor(tmp_path, monkeypatch):
    monkeypatch.setattr(T, "_runtime", fake_runtime)
    eng = T.TrtllmEngine(_engine_config(tmp_path), max_slots=2)
    assert (eng.vocab_size, eng.max_seq_len, eng.max_branches) == (8, 63, 16)
    a, b = eng.allocate(), eng.allocate()
    with pytest.raises(SaguaroError, match="all 2 slots"):
        eng.allocate()
    prompt = [1, 2, 3, 4, 5, 6, 7, 1, 2]

    def expect(seq: list[int], n: int) -> torch.Tensor:
        return torch.stack([reference_logits(seq[:i + 1])[:V] for i in range(len(seq) - n, len(seq))])

    out = eng.forward([a, b], [prompt, [3]])
    assert torch.equal(out[0], expect(prompt, 9)) and torch.equal(out[1], expect([3], 1))
    verify = [5, 6, 7, 1, 2]                           # a K+1 verify
    out = eng.forward([a], [verify])
    assert torch.equal(out[0], expect(prompt + verify, 5))
    eng.truncate(a, 10)                                # 1 of 4 drafts accepted
    assert eng.length(a) == 10
    # Re-submitting tokens already seen: block reuse swallows some new positions, which the
    # engine refills with one-token requests; the logits are the same as computed afresh.
    again = prompt + verify
    out = eng.forward([a], [again[10:]])
    assert torch.equal(out[0], expect(again, len(again) - 10))
    assert eng._executor.prompts[-2:] == [again[:11], again[:12]]     # the refills
    # Branches: parent prefix + branch tokens, logits at the newest token, parent untouched.
    n = eng.length(a)
    logits = eng.branch_step(torch.tensor([a, a]), torch.tensor([n, n - 2]), torch.tensor([4, 5]), 0)
    assert torch.equal(logits, torch.stack([reference_logits(again + [4])[:V], reference_logits(again[:-2] + [5])[:V]]))
    logits = eng.branch_step(torch.tensor([a, a]), torch.tensor([n, n - 2]), torch.tensor([6, 7]), 1)
    assert torch.equal(logits[1], reference_logits(again[:-2] + [5, 7])[:V])
    assert eng.length(a) == n and eng.active_slots == 2
    eng.release(a)
    eng.release(a)
    assert eng.active_slots == 1
    with pytest.raises(SaguaroError, match="exceed max_seq_len=63"):
        eng.forward([b], [[1] * 63])


@pytest.mark.gpu
@pytest.mark.skipif(not (torch.cuda.is_available() and importlib.util.find_spec("tensorrt_llm")),
                    reason="needs a CUDA GPU and tensorrt_llm (nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3)")
def test_trtllm_engine_matches_transformers_on_gpu(tmp_path):
    from transformers import AutoModelForCausalLM
    result = B.build(B.BuildOptions(target=str(DEMO_T), draft=str(DEMO_D), output=str(tmp_path), backend="trtllm",
                                    max_seq_len=512, dtype="float32"))
    eng = T.TrtllmEngine(result.target, max_slots=1)
    ref = AutoModelForCausalLM.from_pretrained(DEMO_T, dtype=torch.float32).eval()
    ids = [5, 17, 300, 2, 99, 100, 101]
    slot = eng.allocate()
    got = torch.cat(eng.forward([slot], [ids[:4]]) + eng.forward([slot], [ids[4:]]))
    want = ref(input_ids=torch.tensor([ids])).logits[0]
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    assert (got - want).abs().max() < 1e-2
    eng.close()


# ---------------------------------------------------------------- docker-compose.yml

def test_compose_file():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    s = compose["services"]
    assert {"build-engines", "triton", "perf", "triton-cpu"} <= set(s)
    gpu = {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
    for name in ("build-engines", "triton"):
        assert s[name]["image"] == "nvcr.io/nvidia/tritonserver:24.10-trtllm-python-py3"
        assert s[name]["deploy"]["resources"]["reservations"]["devices"] == [gpu]
        assert "profiles" not in s[name]          # plain `docker compose up` on a GPU host
    build_cmd = s["build-engines"]["command"][-1]
    assert "build_engines/build.py --backend trtllm" in build_cmd and "--model-repository" in build_cmd
    t = s["triton"]
    assert t["depends_on"] == {"build-engines": {"condition": "service_completed_successfully"}}
    assert t["ports"] == ["8000:8000", "8001:8001", "8002:8002"] == s["triton-cpu"]["ports"]
    assert t["shm_size"]
    assert {".:/workspace:ro", "${ENGINES_DIR:-./engines}:/engines"} <= set(t["volumes"])
    assert "--model-repository=/engines/model_repository" in t["command"]
    for name in ("triton", "triton-cpu"):
        assert "localhost:8000/v2/health/ready" in " ".join(s[name]["healthcheck"]["test"])
    perf = s["perf"]
    assert perf["profiles"] == ["perf"] and perf["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3-sdk"
    assert "clients/perf/sweep.py --url" in perf["command"][-1] and perf["environment"]["PERF_URL"] == "${PERF_URL:-triton:8001}"
    cpu = s["triton-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["image"] == "python:3.11" and "deploy" not in cpu
    assert "scripts/setup.sh" in cpu["command"][-1] and ".venv/bin/python -m saguaro.serve --host 0.0.0.0" in cpu["command"][-1]
    assert (ROOT / "clients" / "perf" / "sweep.py").is_file() and (ROOT / "scripts" / "setup.sh").is_file()
