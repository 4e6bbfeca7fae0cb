"""scripts/gpu_check.sh and its python part, on the CPU: the GPU run itself happens where a GPU is."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import torch

from saguaro.config import DEMO_DRAFT, DEMO_TARGET

ROOT = Path(__file__).resolve().parents[1]


def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_shell_script_parses():
    assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / "gpu_check.sh")]).returncode == 0


def test_torch_only_fallbacks_read_what_the_libraries_read():
    g = gpu_check()
    from safetensors.torch import load_file
    want = load_file(DEMO_DRAFT / "model.safetensors")
    got = g.read_safetensors(DEMO_DRAFT / "model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    name, encode = g.prompt_encoder(DEMO_TARGET)
    ids = encode("def quicksort(xs):\n    return xs")
    assert name == "tokenizers" and ids and all(0 <= i < 4096 for i in ids)


def test_python_part_on_cpu(tmp_path):
    out = tmp_path / "gpu_check.json"
    rc = gpu_check().main(["--out", str(out), "--device", "cpu", "--prompts", "2", "--max-new-tokens", "12",
                           "--draft-dtype", "float32"])
    report = json.loads(out.read_text())
    assert rc == 0 and report["ok"], report
    assert set(report["modes"]) == {"ar", "sd", "ssd"}
    assert all(report["modes"][m]["tokens"] == 24 and report["modes"][m]["tokens_per_s"] > 0 for m in report["modes"])
    assert report["modes"]["ssd"]["greedy_equals_ar"] and report["modes"]["sd"]["mismatched_prompts"] == []
    assert 0 <= report["modes"]["ssd"]["cache_hit_rate"] <= 1


def test_a_failed_run_still_writes_its_file(tmp_path):
    out = tmp_path / "gpu_check.json"
    assert gpu_check().main(["--out", str(out), "--device", "cuda:99" if not torch.cuda.is_available() else "nope"]) == 1
    report = json.loads(out.read_text())
    assert report["ok"] is False and report["error"]




def test_fallbacks_when_only_torch_is_there(monkeypatch):
    g = gpu_check()
    for name in ("safetensors", "safetensors.torch", "tokenizers"):
        monkeypatch.setitem(sys.modules, name, None)          # import fails, as on a torch-only machine
    assert g.provide_safetensors() == "read_safetensors"
    assert sys.modules["safetensors.torch"].load_file is g.read_safetensors
    name, encode = g.prompt_encoder(DEMO_TARGET)
    ids = encode("def quicksort(xs):\n    return xs")
    assert name == "longest-match" and len(ids) >= 4 and all(0 <= i < 4096 for i in ids)
