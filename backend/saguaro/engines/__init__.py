"""Engines behind one interface (base.Engine): the PyTorch engine everywhere, TensorRT-LLM on GPUs."""
from __future__ import annotations

import os
import threading

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


_placed = threading.local()         # the cores this thread was last placed on (place_thread)


def place_thread(cores: frozenset[int]) -> None:
    """Run the calling thread on these cores from now on (a system call only when they change).
    Engines that share a thread, like the benchmark's side-by-side modes, each place it before
    their forwards. Threads it starts later start on the same cores."""
    if getattr(_placed, "cores", None) != cores:
        os.sched_setaffinity(0, cores)
        _placed.cores = cores


def pin_to_core(core: int | None) -> None:
    """Keep this process on one CPU core (target and draft on different ones); None: anywhere."""
    if core is not None and hasattr(os, "sched_setaffinity") and core < os.cpu_count():
        os.sched_setaffinity(0, {core})
