"""The draft in its own process (its own core), so pre-drafting truly overlaps verification.

The worker answers each DraftRound as soon as the speculations are known, then builds the next
caches while the caller runs the target. q tensors cross the pipe as numpy arrays: torch's own
pickling would move them through shared-memory files, which costs more than the copy.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback

import torch

from saguaro.config import EngineConfig, SpecConfig
from saguaro.draft import Drafter, DraftReply, DraftRound
from saguaro.engines import create_engine
from saguaro.errors import DraftFailure, SaguaroError


def pin_to_core(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity") and core < os.cpu_count():
        os.sched_setaffinity(0, {core})


def _worker_main(conn, cfg: EngineConfig, spec: SpecConfig, core: int | None) -> None:
    pin_to_core(core)
    try:
        engine = create_engine(cfg, branches=True)
        drafter = Drafter(engine, spec)
    except Exception as e:  # report, don't hang the parent
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", (engine.vocab_size, engine.max_draft_len, engine.max_branches)))
    while True:
        rnd = conn.recv()
        if rnd is None:
            return
        if rnd == "reset":
            drafter.release_all()
            conn.send("ok")
            continue
        try:
            reply = drafter.step(rnd)
        except Exception:
            conn.send(("error", traceback.format_exc()))
            continue
        for spec_ in reply.specs.values():
            if spec_.q is not None:
                spec_.q = spec_.q.numpy()
        conn.send(reply)
        drafter.build()


class DraftWorker:
    """DraftClient over a worker process."""

    def __init__(self, cfg: EngineConfig, spec: SpecConfig, core: int | None = None, start_timeout_s: float = 120.0):
        self.cfg, self.spec, self.core, self.timeout_s = cfg, spec, core, spec.draft_timeout_s
        self._start(start_timeout_s)

    def _start(self, timeout_s: float) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.cfg, self.spec, self.core),
                                daemon=True, name="saguaro-draft")
        self.proc.start()
        if not self.conn.poll(timeout_s):
            self.proc.kill()
            raise SaguaroError(f"the draft worker did not start within {timeout_s:.0f} s")
        status, info = self.conn.recv()
        if status != "ready":
            raise SaguaroError(f"the draft model failed to load: {info}")
        self.vocab_size, self.max_draft_len, self.max_branches = info

    def step(self, rnd: DraftRound) -> DraftReply:
        try:
            self.conn.send(rnd)
            if not self.conn.poll(self.timeout_s):
                raise DraftFailure(f"draft worker gave no answer within {self.timeout_s} s")
            reply = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            raise DraftFailure(f"draft worker died: {e}") from e
        if isinstance(reply, tuple):
            raise DraftFailure(f"draft worker failed: {reply[1]}")
        for spec_ in reply.specs.values():
            if spec_.q is not None:
                spec_.q = torch.from_numpy(spec_.q)
        return reply

    def reset(self) -> None:
        """Forget every sequence. A worker that is stuck or dead is replaced."""
        try:
            self.conn.send("reset")
            if self.conn.poll(self.timeout_s) and self.conn.recv() == "ok":
                return
        except (EOFError, OSError):
            pass
        self.proc.kill()
        self._start(120.0)

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
