"""build_engines/build.py, saguaro.pair, docker-compose.yml; all on CPU (the TensorRT-LLM engine adapter:
test_trtllm_contract.py)."""
from __future__ import annotations

import hashlib
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from build_engines import build as B  # noqa: E402
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
                      "--speculative_decoding_mode": {"draft_tokens_external"}, "--max_draft_len": int,
                      "--output_timing_cache": str}
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
                    "--max_input_len": "1023", "--max_seq_len": "1024", "--gather_generation_logits": True,
                    "--output_timing_cache": str(base / role / "model.cache")}
        if role == "target":
            # trtllm-build rejects --gather_context_logits with max_draft_len > 0 (commands/build.py)
            expected |= {"--speculative_decoding_mode": "draft_tokens_external", "--max_draft_len": "6"}
        else:
            expected |= {"--gather_context_logits": True}
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
    ("vocab_size", r"vocab_size: the draft has 4000 ids but the tokenizer has ids up to 4095"),
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
        _edit_json(draft / "config.json", lambda c: c.update(vocab_size=4000))   # a padded 5000 is valid (shared vocabulary)
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
    for name in ("target", "draft"):
        text = B.fill_instance_group((ROOT / "model_repository" / name / "config.pbtxt").read_text(), 1)
        (group,) = text_format.Parse(text, pb.ModelConfig()).instance_group
        assert (group.kind, list(group.gpus), group.count) == (pb.ModelInstanceGroup.KIND_GPU, [1], 1)


def test_fill_model_repository(tmp_path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.pbtxt").write_text(SAMPLE_PBTXT)
    params = {"target": {"engine": "trtllm"}, "draft": {"engine": "trtllm"}}
    assert B.fill_model_repository(tmp_path, params, dry_run=True) == [tmp_path / "target" / "config.pbtxt"]
    assert (tmp_path / "target" / "config.pbtxt").read_text() == SAMPLE_PBTXT
    B.fill_model_repository(tmp_path, params)
    assert 'string_value: "trtllm"' in (tmp_path / "target" / "config.pbtxt").read_text()
    assert not (tmp_path / "draft").exists()


# ---------------------------------------------------------------- trtllm steps, placement, engine folders

def test_trtllm_steps_run_from_a_writable_folder(tmp_path):
    """trtllm-build writes its timing cache (model.cache) to the working directory by default
    (tensorrt_llm/commands/build.py --output_timing_cache): every command runs in the output tree
    and the cache is named there."""
    pair = validate_pair(DEMO_T, DEMO_D)
    out = tmp_path / "trtllm"
    steps = B.plan_trtllm(B.BuildOptions(target=str(DEMO_T), draft=str(DEMO_D), backend="trtllm"), pair, out, 512)
    commands = [s for s in steps if s.argv]
    assert [s.argv[0] for s in commands] == [sys.executable, "trtllm-build"] * 2
    for role, step in zip(("target", "target", "draft", "draft"), commands):
        assert step.cwd == out / role
    for role, step in (("target", commands[1]), ("draft", commands[3])):
        b = flags(step.argv[1:], TRTLLM_BUILD_FLAGS)
        assert b["--output_timing_cache"] == str(out / role / "model.cache")
        assert Path(b["--output_timing_cache"]).parent == step.cwd
    sources = [s for s in steps if s.action and s.output.name == "saguaro_source.json"]
    assert [s.output for s in sources] == [out / "target" / "engine" / "saguaro_source.json",
                                          out / "draft" / "engine" / "saguaro_source.json"]
    B.run_steps(sources, dry_run=False, force=False)
    assert json.loads(sources[1].output.read_text()) == {"checkpoint": str(DEMO_D.resolve())}


def test_run_steps_uses_the_step_cwd(tmp_path):
    step = B.Step(title="pwd", output=tmp_path / "o", settings={}, cwd=tmp_path / "work",
                  argv=[sys.executable, "-c", "import os; open('here', 'w').write(os.getcwd())"])
    B.run_steps([step], dry_run=False, force=False)
    assert (tmp_path / "work" / "here").read_text() == str(tmp_path / "work")


@pytest.mark.parametrize("tp,gpus,target,draft,fraction", [
    (1, 1, (0,), (0,), 0.4), (1, 2, (0,), (1,), 0.9), (2, 2, (0, 1), (0,), 0.4), (4, 8, (0, 1, 2, 3), (4,), 0.9)])
def test_placement(tp, gpus, target, draft, fraction):
    p = B.place_engines(tp, gpus)
    assert (p.target_devices, p.draft_devices, p.target_kv_fraction, p.draft_kv_fraction) == (target, draft, fraction, fraction)


def test_placement_errors_and_parameters(tmp_path, capsys):
    with pytest.raises(SaguaroError, match="--tp-size 4 needs 4 GPUs but this host has 2"):
        B.place_engines(4, 2)
    with pytest.raises(SaguaroError, match="--gpus 0: must be >= 1"):
        B.build(B.BuildOptions(target=str(DEMO_T), draft=str(DEMO_D), backend="trtllm", gpus=0, dry_run=True))
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "model_repository", repo)
    cmds = dry_run_commands(capsys, ["--target", str(DEMO_T), "--draft", str(DEMO_D), "--output", str(tmp_path / "o"),
                                     "--backend", "trtllm", "--tp-size", "2", "--gpus", "3",
                                     "--trtllm-examples", str(tmp_path)])
    assert cmds
    result = B.build(B.BuildOptions(target=str(DEMO_T), draft=str(DEMO_D), output=str(tmp_path / "o"), backend="trtllm",
                                    tp_size=2, gpus=3, dry_run=True, model_repository=str(repo)))
    t, d = result.parameters["target"], result.parameters["draft"]
    assert (t["gpu_device_ids"], d["gpu_device_ids"]) == ("0,1", "2")
    assert t["kv_cache_free_gpu_memory_fraction"] == d["kv_cache_free_gpu_memory_fraction"] == "0.9"
    assert t["cpu_core"] == d["cpu_core"] == "", "GPU engines are not pinned to a core"
    assert result.gpus == {"target": 0, "draft": 2}
    B.fill_model_repository(repo, result.parameters, gpus=result.gpus)
    text = (repo / "draft" / "config.pbtxt").read_text()
    assert "instance_group [ { kind: KIND_GPU count: 1 gpus: [ 2 ] } ]" in text and "KIND_CPU" not in text
    assert 'key: "cpu_core" value: { string_value: "" }' in text


def test_pair_validates_engine_folders(tmp_path):
    import trtllm_fakes as F
    target, draft = F.engine_dir(tmp_path / "t", DEMO_T), F.engine_dir(tmp_path / "d", DEMO_D)
    pair = validate_pair(target, draft, num_draft_tokens=4, max_draft_len=8)
    assert (pair.target.path, pair.draft.path) == (str(DEMO_T.resolve()), str(DEMO_D.resolve()))
    (draft / "saguaro_source.json").unlink()
    with pytest.raises(SaguaroError, match="TensorRT-LLM engine without saguaro_source.json.*rebuild it with "
                                           "build_engines/build.py"):
        validate_pair(target, draft)
    F.engine_dir(tmp_path / "d", DEMO_D)
    cfg = json.loads((draft / "config.json").read_text())
    cfg["pretrained_config"]["vocab_size"] = 32000
    (draft / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(SaguaroError, match="draft engine .* has vocab_size 32000 but its source checkpoint"):
        validate_pair(target, draft)


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


# ---------------------------------------------------------------- docker-compose.yml

def test_compose_file_matches_the_compose_schema():
    """docker-compose.yml against the Compose Specification's JSON schema (tests/data/compose_spec.README.md)."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "tests" / "data" / "compose_spec.json").read_text())
    validator = jsonschema.Draft201909Validator(schema)
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert [e.message for e in validator.iter_errors(compose)] == []
    compose["services"]["triton"]["restart_when"] = "never"        # the schema does reject what is not Compose
    assert list(validator.iter_errors(compose))


def test_compose_build_runs_in_a_writable_folder():
    s = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["build-engines"]
    # short syntax SOURCE:TARGET[:MODE], SOURCE possibly ${VAR:-default}
    mounts = [re.fullmatch(r"(\$\{[^}]*\}|[^:]+):([^:]+)(?::(.*))?", v).groups() for v in s["volumes"]]
    writable = [target for _, target, mode in mounts if mode != "ro"]
    assert "/workspace" not in writable
    assert any(s["working_dir"] == m or s["working_dir"].startswith(m + "/") for m in writable), \
        f"working_dir {s['working_dir']} is not on a writable mount {writable}"
    assert "--output /engines" in s["command"][-1]


def test_compose_build_command_parses_as_build_py_arguments(tmp_path):
    """The shell line compose runs, expanded by bash with compose's defaults, is a valid build.py call."""
    s = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["build-engines"]
    script = s["command"][-1].replace("$$", "$")
    call = script[script.index("python3 /workspace/build_engines/build.py"):]
    env = {k: re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(v)) for k, v in s["environment"].items()}
    for gpus, expect in (("", None), ("2", 2)):
        argv = subprocess.run(["bash", "-c", call.replace("python3 /workspace/build_engines/build.py",
                                                          "printf '%s\\n'", 1)],
                              env={**env, "GPUS": gpus, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                              check=True).stdout.splitlines()
        opts = B.parse_args(argv)
        assert (opts.backend, opts.output, opts.model_repository) == ("trtllm", "/engines", "/engines/model_repository")
        assert (opts.target, opts.tp_size, opts.gpus, opts.max_seq_len) == ("/models/demo-code-target", 1, expect, None)


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
    assert t["ports"] == ["8000:8000", "8001:8001", "8002:8002", "9000:9000"] == s["triton-cpu"]["ports"]
    assert t["shm_size"]
    assert {".:/workspace:ro", "${ENGINES_DIR:-./engines}:/engines"} <= set(t["volumes"])
    # the image's tritonserver under saguaro.serve (which reloads dead models and restarts the server)
    serve_line = t["command"][-1].splitlines()[-1]
    assert serve_line.startswith("exec python3 -m saguaro.serve ") and "import aiohttp" in t["command"][-1]
    from saguaro.serve import parse_args
    args = parse_args(shlex.split(serve_line)[4:])
    assert (str(args.model_repository), str(args.tritonserver), args.host) == (
        "/engines/model_repository", "tritonserver", "0.0.0.0")
    assert (args.http_port, args.grpc_port, args.metrics_port, args.openai_port) == (8000, 8001, 8002, 9000)
    for name in ("triton", "triton-cpu"):
        check = " ".join(s[name]["healthcheck"]["test"])
        assert "localhost:8000/v2/models/{m}/ready" in check, "unhealthy when a model is not ready"
        assert all(f"'{m}'" in check for m in ("ensemble", "ssd", "target", "draft"))
        assert s[name]["restart"] == "unless-stopped"
    perf = s["perf"]
    assert perf["profiles"] == ["perf"] and perf["image"] == "nvcr.io/nvidia/tritonserver:24.10-py3-sdk"
    assert "clients/perf/sweep.py --url" in perf["command"][-1] and perf["environment"]["PERF_URL"] == "${PERF_URL:-triton:8001}"
    cpu = s["triton-cpu"]
    assert cpu["profiles"] == ["cpu"] and cpu["image"] == "python:3.11" and "deploy" not in cpu
    assert "scripts/setup.sh" in cpu["command"][-1] and ".venv/bin/python -m saguaro.serve --host 0.0.0.0" in cpu["command"][-1]
    assert (ROOT / "clients" / "perf" / "sweep.py").is_file() and (ROOT / "scripts" / "setup.sh").is_file()
