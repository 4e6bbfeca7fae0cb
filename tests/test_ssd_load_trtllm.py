"""The `ssd` model initializes on a model repository filled by build_engines for engine=trtllm, whose
target and draft `checkpoint` parameters point at TensorRT-LLM engine folders (config.json without
architectures, no tokenizer): fake engine folders from tests/trtllm_fakes.py, and a stand-in for
triton_python_backend_utils (the stub's module, which only exists inside Triton)."""
from __future__ import annotations

import importlib.util
import json
import re
import shutil
import sys
from pathlib import Path
from unittest import mock

import pytest

import trtllm_fakes as F
from saguaro.config import DEMO_DRAFT, DEMO_TARGET
from saguaro.errors import SaguaroError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from build_engines import build as B  # noqa: E402


def filled_repository(tmp_path: Path, engines: dict[str, Path]) -> Path:
    """The repository as `docker compose up`'s build step leaves it for engine=trtllm."""
    repo = tmp_path / "model_repository"
    shutil.copytree(ROOT / "model_repository", repo)
    opts = B.BuildOptions(target=str(DEMO_TARGET), draft=str(DEMO_DRAFT), backend="trtllm", max_batch_size=4)
    params = B.repository_parameters(opts, engines["target"], engines["draft"], DEMO_TARGET.resolve(), 512, 1024,
                                     B.place_engines(1, 2))
    B.fill_model_repository(repo, params, gpus={"target": 0, "draft": 1})
    return repo


def ssd_args(repo: Path) -> dict[str, str]:
    text = (repo / "ssd" / "config.pbtxt").read_text()
    params = dict(re.findall(r'key:\s*"([^"]+)"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text))
    config = {"name": "ssd", "parameters": {k: {"string_value": v} for k, v in params.items()}}
    return {"model_config": json.dumps(config), "model_repository": str(repo / "ssd"), "model_version": "1",
            "model_instance_kind": "CPU", "model_instance_name": "ssd_0_0", "model_instance_device_id": "0"}


def load_ssd_model():
    spec = importlib.util.spec_from_file_location("ssd_model_under_test", ROOT / "model_repository" / "ssd" / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def pb_utils(monkeypatch):
    fake = mock.MagicMock(name="triton_python_backend_utils")
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake)
    return fake


def test_ssd_loads_on_trtllm_engine_folders(tmp_path, pb_utils):
    engines = {role: F.engine_dir(tmp_path / "engines" / role / "engine", src)
               for role, src in (("target", DEMO_TARGET), ("draft", DEMO_DRAFT))}
    repo = filled_repository(tmp_path, engines)
    target_config = (repo / "target" / "config.pbtxt").read_text()
    assert f'string_value: "{engines["target"]}"' in target_config and 'string_value: "trtllm"' in target_config
    model = load_ssd_model().TritonPythonModel()
    model.initialize(ssd_args(repo))
    try:
        assert model.tokenizer.encode("def f():").ids
    finally:
        model.finalize()


def test_ssd_load_names_the_fix_for_an_engine_without_its_source(tmp_path, pb_utils):
    engines = {role: F.engine_dir(tmp_path / "engines" / role / "engine", src)
               for role, src in (("target", DEMO_TARGET), ("draft", DEMO_DRAFT))}
    (engines["draft"] / "saguaro_source.json").unlink()
    repo = filled_repository(tmp_path, engines)
    model = load_ssd_model().TritonPythonModel()
    with pytest.raises(SaguaroError, match="draft checkpoint .* TensorRT-LLM engine without saguaro_source.json"):
        model.initialize(ssd_args(repo))


def test_engine_models_get_their_placement_from_the_filled_configs(tmp_path, pb_utils, monkeypatch):
    """What `target` and `draft` read from their filled configs reaches the executor: each engine
    on its own GPU, KV fraction 0.9, ranks' device ids."""
    from saguaro.engines import trtllm_engine as T
    from saguaro.triton_models import engine_config, sibling_params
    monkeypatch.setattr(T, "_runtime", F.runtime)
    engines = {role: F.engine_dir(tmp_path / "engines" / role / "engine", src)
               for role, src in (("target", DEMO_TARGET), ("draft", DEMO_DRAFT))}
    repo = filled_repository(tmp_path, engines)
    for role, gpu in (("target", 0), ("draft", 1)):
        text = (repo / role / "config.pbtxt").read_text()
        assert f"instance_group [ {{ kind: KIND_GPU count: 1 gpus: [ {gpu} ] }} ]" in text
        cfg = engine_config(sibling_params({"model_repository": str(repo / role)}, role), {"model_repository": str(repo / role), "model_instance_kind": "GPU",
                                     "model_instance_device_id": str(gpu)})
        assert (cfg.engine, cfg.device_ids, cfg.kv_cache_free_gpu_memory_fraction) == ("trtllm", (gpu,), 0.9)
        executor = T.TrtllmEngine.from_config(cfg, branches=role == "draft")._executor.config
        assert executor.parallel_config.device_ids == [gpu]
        assert executor.kv_cache_config.free_gpu_memory_fraction == 0.9
