"""Build what the model repository serves from a draft/target pair of Hugging Face checkpoints.

    python build_engines/build.py --target models/demo-code-target --draft models/demo-code-draft \
        --output engines [--backend torch|trtllm] [--model-repository model_repository] [--dry-run]

torch (default, CPU): validated checkpoints in the layout the PyTorch engine loads (config.json,
*.safetensors, tokenizer files), optionally cast, plus an ONNX export of each model.
trtllm (GPU): TensorRT-LLM checkpoints (convert_checkpoint.py of the model family) and engines
(trtllm-build) with the flags engines/trtllm_engine.py relies on.
Both: the pair is validated first, finished steps are skipped unless their settings changed or
--force is given, and the resulting paths and limits are written into the model repository.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from saguaro.config import SpecConfig
from saguaro.errors import SaguaroError
from saguaro.pair import ENGINE_SOURCE, PairInfo, validate_pair

ROOT = Path(__file__).resolve().parents[1]
# The trtllm containers ship the tensorrt_llm wheel but not its examples/: point this at a checkout
# of TensorRT-LLM at the installed version (docker-compose.yml clones v0.14.0 for the 24.10 image).
TRTLLM_EXAMPLES = os.environ.get("TRTLLM_EXAMPLES", "/opt/TensorRT-LLM/examples")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "generation_config.json")
DTYPES = ("auto", "float16", "bfloat16", "float32")
MARKER = ".saguaro_build.json"      # written after a step succeeds; holds the settings it ran with
_START = time.monotonic()


def log(msg: str) -> None:
    print(f"[build {time.monotonic() - _START:7.1f}s] {msg}", flush=True)


@dataclass(frozen=True)
class BuildOptions:
    target: str
    draft: str
    output: str = "engines"
    backend: str = "torch"
    dtype: str = "auto"
    tp_size: int = 1
    max_batch_size: int = 8
    max_input_len: int | None = None        # longest prompt; default max_seq_len // 2
    max_seq_len: int | None = None          # default min(both contexts, 4096)
    max_draft_len: int = 8
    num_draft_tokens: int = SpecConfig.k
    max_branches: int = 64
    draft_tokens_external: bool = False     # target verifies draft tokens itself (greedy fast path)
    gpus: int | None = None                 # GPUs on this host for placement (None: count them)
    trtllm_examples: str = TRTLLM_EXAMPLES
    onnx: bool = True
    model_repository: str | None = None
    dry_run: bool = False
    force: bool = False


@dataclass
class Step:
    title: str
    output: Path                            # a directory, or a single file
    settings: dict                          # what decides whether an earlier result can be reused
    argv: list[str] | None = None           # an external command, or
    action: Callable[[], None] | None = None  # an in-process one
    writes: list[Path] = field(default_factory=list)
    cwd: Path | None = None                 # where an external command runs (must be writable)


@dataclass
class BuildResult:
    backend: str
    output: Path
    target: Path                            # what the target engine loads (checkpoint or engine dir)
    draft: Path
    tokenizer_dir: Path
    onnx: list[Path]
    max_input_len: int
    max_seq_len: int
    parameters: dict[str, dict[str, str]]   # model name -> config.pbtxt parameters
    gpus: dict[str, int]                    # trtllm: model name -> the GPU its Triton instance is placed on
    pair: PairInfo
    steps: list[Step]


# ---------------------------------------------------------------- model repository template filling

def _pbtxt_string(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def fill_parameters(text: str, params: dict[str, str]) -> str:
    """Set the string parameters of a config.pbtxt text: replace the value of each existing
    `{ key: "K" value: { string_value: "V" } }` entry (in a `parameters [...]` list or its own
    `parameters {...}` block, any spacing), append the rest as `parameters {...}` blocks (protobuf
    text format merges repeated entries); everything else in the text is preserved."""
    for key, value in params.items():
        # `value: { string_value` tells parameters apart from ensemble input_map/output_map entries.
        pattern = re.compile(
            r'(key\s*:\s*"' + re.escape(key) +
            r'"\s*,?\s*value\s*:?\s*\{\s*string_value\s*:\s*")((?:[^"\\]|\\.)*)(")')
        escaped = _pbtxt_string(str(value))
        text, n = pattern.subn(lambda m: m.group(1) + escaped + m.group(3), text)
        if n == 0:
            text = (text.rstrip("\n") + "\n" if text.strip() else "") + \
                f'parameters {{\n  key: "{key}"\n  value: {{ string_value: "{escaped}" }}\n}}\n'
    return text


def fill_instance_group(text: str, gpu: int) -> str:
    """One KIND_GPU instance on `gpu` in place of the config's instance_group (Triton creates one
    instance per listed GPU, so a tensor-parallel engine lists only its first rank's GPU and
    reaches the others through gpu_device_ids)."""
    group = f"instance_group [ {{ kind: KIND_GPU count: 1 gpus: [ {gpu} ] }} ]"
    text, n = re.subn(r"instance_group\s*\[(?:[^\[\]]|\[[^\]]*\])*\]", group, text, count=1)
    return text if n else text.rstrip("\n") + "\n" + group + "\n"


def fill_model_repository(repository: str | Path, params: dict[str, dict[str, str]],
                          dry_run: bool = False, gpus: dict[str, int] | None = None) -> list[Path]:
    """Apply fill_parameters to <repository>/<model>/config.pbtxt for every model in params that
    exists there, and fill_instance_group for the models in gpus; returns the files written (or
    that would be)."""
    written = []
    gpus = gpus or {}
    for model, values in params.items():
        path = Path(repository) / model / "config.pbtxt"
        if not path.is_file():
            log(f"model repository: no {path}, parameters for {model!r} not written")
            continue
        written.append(path)
        if dry_run:
            where = f", instance on GPU {gpus[model]}" if model in gpus else ""
            log(f"would write {path}: " + ", ".join(f"{k}={v}" for k, v in values.items()) + where)
            continue
        text = fill_parameters(path.read_text(), values)
        path.write_text(fill_instance_group(text, gpus[model]) if model in gpus else text)
    return written


@dataclass(frozen=True)
class Placement:
    """Which GPUs each engine's ranks use and how much of their free memory its KV cache takes."""
    target_devices: tuple[int, ...]
    draft_devices: tuple[int, ...]
    target_kv_fraction: float
    draft_kv_fraction: float


# NVIDIA's draft-target layout (tensorrtllm_backend docs/multi_instance.md and the
# speculative-decoding guide): each engine on its own GPU(s); when they must share one, each KV
# cache takes 0.4 of the free memory instead of the default 0.9, or the second executor cannot start.
OWN_GPU_KV_FRACTION, SHARED_GPU_KV_FRACTION = 0.9, 0.4


def place_engines(tp_size: int, gpus: int) -> Placement:
    """Target ranks on GPUs 0..tp_size-1; the draft on the next GPU when there is one, else on GPU 0
    beside the target's first rank."""
    if gpus < tp_size:
        raise SaguaroError(f"--tp-size {tp_size} needs {tp_size} GPUs but this host has {gpus}: lower --tp-size, "
                           f"or pass --gpus N if the count is wrong")
    target = tuple(range(tp_size))
    if gpus > tp_size:
        return Placement(target, (tp_size,), OWN_GPU_KV_FRACTION, OWN_GPU_KV_FRACTION)
    return Placement(target, (0,), SHARED_GPU_KV_FRACTION, SHARED_GPU_KV_FRACTION)


def count_gpus() -> int:
    """CUDA devices visible here (the build-engines container sees the serving host's GPUs)."""
    try:
        import torch
        return torch.cuda.device_count()
    except ImportError:
        return 0


def _ids(devices: tuple[int, ...]) -> str:
    return ",".join(map(str, devices))


def repository_parameters(opts: BuildOptions, target: Path, draft: Path, tokenizer_dir: Path,
                          max_input_len: int, max_seq_len: int,
                          placement: Placement | None = None) -> dict[str, dict[str, str]]:
    """The config.pbtxt parameters each model of the repository reads (see model_repository/)."""
    engine = {"engine": opts.backend, "max_seq_len": str(max_seq_len), "max_draft_len": str(opts.max_draft_len),
              "max_slots": str(opts.max_batch_size)}
    gpu: dict[str, dict[str, str]] = {"target": {}, "draft": {}}
    if placement is not None:
        # GPU engines are not pinned to a CPU core: that would pin the executor's own threads too.
        gpu = {"target": {"gpu_device_ids": _ids(placement.target_devices), "cpu_core": "",
                          "kv_cache_free_gpu_memory_fraction": str(placement.target_kv_fraction)},
               "draft": {"gpu_device_ids": _ids(placement.draft_devices), "cpu_core": "",
                         "kv_cache_free_gpu_memory_fraction": str(placement.draft_kv_fraction)}}
    return {
        "target": {**engine, "checkpoint": str(target), **gpu["target"]},
        "draft": {**engine, "checkpoint": str(draft), "max_branches": str(opts.max_branches), **gpu["draft"]},
        "ssd": {"num_draft_tokens": str(opts.num_draft_tokens), "max_input_len": str(max_input_len),
                "tokenizer_dir": str(tokenizer_dir),
                "fanout_budget": str(min(8, opts.max_branches))},   # the template's 8, within the draft's branches
        "preprocessing": {"tokenizer_dir": str(tokenizer_dir)},
        "postprocessing": {"tokenizer_dir": str(tokenizer_dir)},
    }


# ---------------------------------------------------------------- torch backend

def _torch_dtype(name: str):
    import torch
    return {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[name]


def _checkpoint_files(src: Path) -> tuple[list[Path], list[Path]]:
    weights = sorted(src.glob("*.safetensors"))
    if not weights:
        raise SaguaroError(f"no *.safetensors in {src}: save the checkpoint with "
                           f"save_pretrained(safe_serialization=True)")
    extra = [p for p in [src / "model.safetensors.index.json", *(src / n for n in TOKENIZER_FILES)] if p.is_file()]
    return weights, extra


def prepare_checkpoint(src: Path, dst: Path, dtype: str) -> None:
    """config.json + weights + tokenizer files of src in dst; weights cast when dtype is not auto."""
    dst.mkdir(parents=True, exist_ok=True)
    weights, extra = _checkpoint_files(src)
    config = json.loads((src / "config.json").read_text())
    for p in extra:
        shutil.copy2(p, dst / p.name)
    if dtype == "auto":
        for p in weights:
            target = dst / p.name
            target.unlink(missing_ok=True)
            try:        # a hard link costs no space and no time; checkpoints are never edited in place
                os.link(p, target)
            except OSError:
                shutil.copy2(p, target)
    else:
        from safetensors.torch import load_file, save_file
        to = _torch_dtype(dtype)
        for p in weights:
            tensors = {k: v.to(to) if v.is_floating_point() else v for k, v in load_file(p).items()}
            (dst / p.name).unlink(missing_ok=True)  # may be a hard link to the source: never write through it
            save_file(tensors, dst / p.name, metadata={"format": "pt"})
        config["torch_dtype"] = dtype
        if "dtype" in config:       # transformers >= 5 writes `dtype`
            config["dtype"] = dtype
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def export_onnx(model_dir: Path, out: Path, seq_len: int = 8) -> None:
    """input_ids [batch, seq] -> logits [batch, seq, vocab] in float32, dynamic batch and seq axes,
    checked with onnx.checker."""
    try:
        import onnx
        import torch
        from transformers import AutoModelForCausalLM
    except ImportError as e:
        raise SaguaroError(f"ONNX export needs transformers and onnx ({e}): pip install -e '.[test]', "
                           f"or pass --no-onnx") from e
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()

    class Logits(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
            # An explicit mask keeps transformers off its packed-sequence check (aten::diff), which
            # the TorchScript exporter cannot export.
            return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=False).logits

    out.parent.mkdir(parents=True, exist_ok=True)
    ids = torch.zeros(1, seq_len, dtype=torch.long)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # dynamo=False: the torch.export-based exporter needs onnxscript, which is not a dependency.
        torch.onnx.export(Logits(), (ids,), str(out), dynamo=False, opset_version=17,
                          input_names=["input_ids"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}})
    onnx.checker.check_model(str(out))


def plan_torch(opts: BuildOptions, pair: PairInfo, out: Path) -> list[Step]:
    steps = []
    for role, info in (("target", pair.target), ("draft", pair.draft)):
        src, dst = Path(info.path), out / role
        weights, extra = _checkpoint_files(src)
        steps.append(Step(
            title=f"{role}: checkpoint {src} -> {dst} (dtype {opts.dtype})", output=dst,
            settings={"src": str(src.resolve()), "dtype": opts.dtype},
            action=lambda src=src, dst=dst: prepare_checkpoint(src, dst, opts.dtype),
            writes=[dst / "config.json", *(dst / p.name for p in weights + extra)]))
        if opts.onnx:
            onnx_path = dst / "model.onnx"
            steps.append(Step(
                title=f"{role}: ONNX export -> {onnx_path}", output=onnx_path,
                settings={"src": str(src.resolve()), "dtype": opts.dtype},
                action=lambda dst=dst, onnx_path=onnx_path: export_onnx(dst, onnx_path), writes=[onnx_path]))
    return steps


# ---------------------------------------------------------------- trtllm backend

def convert_script(examples: str | Path, family: str) -> Path:
    """convert_checkpoint.py of a model family: examples/models/core/<family>/ in newer TensorRT-LLM
    releases, examples/<family>/ in older ones (0.14, the 24.10 image's)."""
    root = Path(examples)
    newer = root / "models" / "core" / family / "convert_checkpoint.py"
    return newer if newer.is_file() else root / family / "convert_checkpoint.py"


def resolve_dtype(requested: str, model_dtype: str) -> str:
    # convert_checkpoint.py has no "auto" and defaults to float16, which overflows some bf16 models.
    if requested != "auto":
        return requested
    return model_dtype if model_dtype in ("float16", "bfloat16", "float32") else "float16"


def plan_trtllm(opts: BuildOptions, pair: PairInfo, out: Path, max_seq_len: int) -> list[Step]:
    steps = []
    for role, info in (("target", pair.target), ("draft", pair.draft)):
        ckpt, engine = out / role / "checkpoint", out / role / "engine"
        # The draft runs on one GPU (docs/design.md, "The TensorRT-LLM path"); only the target is split.
        tp = opts.tp_size if role == "target" else 1
        convert = [sys.executable, str(convert_script(opts.trtllm_examples, info.family)),
                   "--model_dir", str(Path(info.path).resolve()), "--output_dir", str(ckpt),
                   "--dtype", resolve_dtype(opts.dtype, info.dtype), "--tp_size", str(tp)]
        # trtllm_engine.py resubmits each sequence's whole history per call (KV block reuse skips its
        # full blocks), so any request may be as long as a sequence: max_input_len = max_seq_len - 1.
        # Branches are separate requests, so the draft needs a batch of them per sequence.
        batch = opts.max_batch_size if role == "target" else max(opts.max_batch_size, opts.max_branches)
        # trtllm-build saves its timing cache unconditionally (default: model.cache in the working
        # directory, tensorrt_llm/commands/build.py): name it, and run from a writable folder.
        build = ["trtllm-build", "--checkpoint_dir", str(ckpt), "--output_dir", str(engine),
                 "--gemm_plugin", "auto", "--use_paged_context_fmha", "enable",
                 "--max_batch_size", str(batch), "--max_input_len", str(max_seq_len - 1),
                 "--max_seq_len", str(max_seq_len), "--output_timing_cache", str(out / role / "model.cache"),
                 # generation logits: single-position calls (decode, branch steps, refills) return one row.
                 "--gather_generation_logits"]
        if role == "target" and opts.draft_tokens_external:
            # trtllm-build rejects --gather_context_logits with max_draft_len > 0: this target returns
            # generation logits only and verifies greedy draft tokens itself.
            build += ["--speculative_decoding_mode", "draft_tokens_external", "--max_draft_len", str(opts.max_draft_len)]
        else:
            build += ["--gather_context_logits"]     # multi-token forwards read context logits
        steps.append(Step(title=f"{role}: convert_checkpoint ({info.family}, tp {tp})", output=ckpt,
                          settings={"argv": convert}, argv=convert, writes=[ckpt / "config.json"], cwd=out / role))
        # The engine's settings include the conversion's: a re-converted checkpoint needs a new engine.
        steps.append(Step(title=f"{role}: trtllm-build", output=engine, settings={"argv": build, "from": convert},
                          argv=build, cwd=out / role,
                          writes=[engine / "config.json", *(engine / f"rank{r}.engine" for r in range(tp))]))
        source = engine / ENGINE_SOURCE
        checkpoint = str(Path(info.path).resolve())
        steps.append(Step(title=f"{role}: record the source checkpoint in {source}", output=source,
                          settings={"checkpoint": checkpoint, "from": build},
                          action=lambda source=source, checkpoint=checkpoint: write_source(source, checkpoint),
                          writes=[source]))
    return steps


def write_source(path: Path, checkpoint: str) -> None:
    """The engine's source checkpoint (saguaro.pair reads it: the tokenizer and config live there)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"checkpoint": checkpoint}) + "\n")


def _check_trtllm_tools(steps: list[Step]) -> None:
    if shutil.which("trtllm-build") is None:
        raise SaguaroError("trtllm-build not found: run the build inside nvcr.io/nvidia/tritonserver:24.10-trtllm-"
                           "python-py3 (`docker compose up build-engines`), or use --backend torch on CPU")
    for s in steps:
        if s.argv and s.argv[0] == sys.executable and not Path(s.argv[1]).is_file():
            raise SaguaroError(f"{s.argv[1]} not found: set --trtllm-examples (or TRTLLM_EXAMPLES) to the examples/ "
                               f"folder of a TensorRT-LLM checkout matching the installed tensorrt_llm")


# ---------------------------------------------------------------- running steps

def _marker(step: Step) -> Path:
    out = step.output
    return out.parent / f"{out.name}{MARKER}" if out.suffix else out / MARKER


def _done(step: Step) -> bool:
    marker = _marker(step)
    return marker.is_file() and json.loads(marker.read_text()) == step.settings


def _mark(step: Step) -> None:
    marker = _marker(step)
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(step.settings))


def run_steps(steps: list[Step], dry_run: bool, force: bool) -> None:
    for i, step in enumerate(steps, 1):
        head = f"step {i}/{len(steps)} {step.title}"
        if not force and _done(step):
            log(f"{head}: done earlier with the same settings, skipped (--force rebuilds)")
            continue
        if dry_run:
            log(f"{head}: would " + (f"run: {shlex.join(step.argv)}" if step.argv else "run in-process"))
            if step.argv and step.cwd is not None:
                log(f"  in the working directory {step.cwd}")
            for path in step.writes:
                log(f"  would write {path}")
            continue
        log(f"{head} ...")
        t0 = time.monotonic()
        if step.argv:
            # Output passes straight through: convert_checkpoint and trtllm-build report their own progress.
            if step.cwd is not None:
                step.cwd.mkdir(parents=True, exist_ok=True)
            rc = subprocess.run(step.argv, cwd=step.cwd).returncode
            if rc != 0:
                raise SaguaroError(f"{step.title} failed (exit {rc}): command was {shlex.join(step.argv)}")
        else:
            step.action()
        _mark(step)
        log(f"{head}: finished in {time.monotonic() - t0:.1f}s")


def build(opts: BuildOptions) -> BuildResult:
    """Validate the pair, build (or plan, with dry_run) every step, fill the model repository."""
    if opts.backend not in ("torch", "trtllm"):
        raise SaguaroError(f"backend={opts.backend!r}: use torch (CPU) or trtllm (GPU)")
    if opts.dtype not in DTYPES:
        raise SaguaroError(f"dtype={opts.dtype!r}: use one of {', '.join(DTYPES)}")
    for name in ("tp_size", "max_batch_size", "max_draft_len", "max_branches"):
        if getattr(opts, name) < 1:
            raise SaguaroError(f"{name}={getattr(opts, name)}: must be >= 1")
    if opts.gpus is not None and opts.gpus < 1:
        raise SaguaroError(f"--gpus {opts.gpus}: must be >= 1, or left out to count this host's GPUs")
    log(f"validating pair: target {opts.target}, draft {opts.draft}")
    pair = validate_pair(opts.target, opts.draft, opts.num_draft_tokens, opts.max_draft_len, opts.max_seq_len)
    max_seq_len = opts.max_seq_len or min(pair.max_context, 4096)
    max_input_len = opts.max_input_len or max_seq_len // 2
    room = max_seq_len - opts.max_draft_len - 1
    if not 1 <= max_input_len <= room:
        raise SaguaroError(f"max_input_len={max_input_len}: a prompt plus one round of max_draft_len+1="
                           f"{opts.max_draft_len + 1} tokens must fit in max_seq_len={max_seq_len}; "
                           f"use --max-input-len <= {room} or raise --max-seq-len")
    log(f"pair ok: {pair.target.architecture} + {pair.draft.architecture}, vocab {pair.vocab_size}, "
        f"context {pair.max_context}, max_seq_len {max_seq_len}, max_input_len {max_input_len}")
    out = Path(opts.output).resolve() / opts.backend
    onnx: list[Path] = []
    if opts.backend == "torch":
        steps = plan_torch(opts, pair, out)
        target, draft = out / "target", out / "draft"
        tokenizer_dir = target
        onnx = [s.output for s in steps if s.output.suffix == ".onnx"]
    else:
        steps = plan_trtllm(opts, pair, out, max_seq_len)
        target, draft = out / "target" / "engine", out / "draft" / "engine"
        tokenizer_dir = Path(pair.target.path).resolve()
        if not opts.dry_run:
            _check_trtllm_tools(steps)
    placement = None
    if opts.backend == "trtllm":
        placement = place_engines(opts.tp_size, opts.gpus or count_gpus() or opts.tp_size)
        log(f"placement: target on GPU {_ids(placement.target_devices)}, draft on GPU {_ids(placement.draft_devices)}, "
            f"KV cache fractions {placement.target_kv_fraction}/{placement.draft_kv_fraction}")
    run_steps(steps, opts.dry_run, opts.force)
    params = repository_parameters(opts, target, draft, tokenizer_dir, max_input_len, max_seq_len, placement)
    gpus = {"target": placement.target_devices[0], "draft": placement.draft_devices[0]} if placement else {}
    if opts.model_repository:
        fill_model_repository(opts.model_repository, params, opts.dry_run, gpus)
    result = BuildResult(backend=opts.backend, output=out, target=target, draft=draft, tokenizer_dir=tokenizer_dir,
                         onnx=onnx, max_input_len=max_input_len, max_seq_len=max_seq_len, parameters=params,
                         gpus=gpus, pair=pair, steps=steps)
    summary = out / "build.json"
    if opts.dry_run:
        log(f"would write {summary}")
    else:
        summary.write_text(json.dumps({"options": asdict(opts), "parameters": params, "pair": asdict(pair)}, indent=2))
        log(f"done: {summary}")
    return result


def build_torch(target: str | Path, draft: str | Path, output: str | Path, **options) -> BuildResult:
    """The CPU build in one call (tests and the server's fixtures): build(BuildOptions(backend=torch))."""
    return build(BuildOptions(target=str(target), draft=str(draft), output=str(output), backend="torch", **options))


def parse_args(argv: list[str] | None = None) -> BuildOptions:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--target", required=True, help="target Hugging Face checkpoint folder")
    p.add_argument("--draft", required=True, help="draft Hugging Face checkpoint folder")
    p.add_argument("--output", default="engines", help="output folder; results go to <output>/<backend>/")
    p.add_argument("--backend", choices=("torch", "trtllm"), default="torch")
    p.add_argument("--dtype", choices=DTYPES, default="auto", help="auto keeps each checkpoint's dtype")
    p.add_argument("--tp-size", type=int, default=1, help="tensor parallelism of the target (the draft uses 1)")
    p.add_argument("--max-batch-size", type=int, default=8, help="sequences decoded at once")
    p.add_argument("--max-input-len", type=int, default=None, help="longest prompt (default max_seq_len // 2)")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="prompt + generated tokens (default min(context of both models, 4096))")
    p.add_argument("--max-draft-len", type=int, default=8, help="largest K a request may use")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="default K")
    p.add_argument("--max-branches", type=int, default=64, help="speculation-cache branches per draft call")
    p.add_argument("--draft-tokens-external", action="store_true",
                   help="trtllm: build the target with --speculative_decoding_mode draft_tokens_external (greedy "
                        "verification inside the engine; generation logits only)")
    p.add_argument("--gpus", type=int, default=None,
                   help="trtllm: GPUs to place the engines on (default: count them); 2+ puts the draft on its own GPU")
    p.add_argument("--trtllm-examples", default=TRTLLM_EXAMPLES,
                   help="TensorRT-LLM examples/ folder (env TRTLLM_EXAMPLES)")
    p.add_argument("--no-onnx", dest="onnx", action="store_false", help="torch: skip the ONNX export")
    p.add_argument("--model-repository", default=None, help="fill <dir>/<model>/config.pbtxt parameters")
    p.add_argument("--dry-run", action="store_true", help="print every command and file, execute nothing")
    p.add_argument("--force", action="store_true", help="rebuild steps that are already done")
    return BuildOptions(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    try:
        build(parse_args(argv))
    except SaguaroError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
