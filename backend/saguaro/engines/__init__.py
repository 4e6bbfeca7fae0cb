"""Engines behind one interface (base.Engine): the PyTorch engine everywhere, TensorRT-LLM on GPUs."""
from __future__ import annotations

from saguaro.config import EngineConfig
from saguaro.engines.base import Engine


def create_engine(cfg: EngineConfig, branches: bool = False) -> Engine:
    """branches=True for draft engines: reserve scratch KV for speculation-cache branches."""
    cfg.validate()
    if cfg.engine == "trtllm":
        from saguaro.engines.trtllm_engine import TrtllmEngine
        return TrtllmEngine.from_config(cfg, branches=branches)
    from saguaro.engines.torch_engine import TorchEngine
    return TorchEngine(cfg, branches=branches)
