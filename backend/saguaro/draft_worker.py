"""The draft in its own process (its own core), so pre-drafting truly overlaps verification.

`DraftWorker` is a call(msg) -> reply over a pipe to a DraftServer in a child process; wrap it in
remote.RemoteDraft to get a DraftClient. The child answers each round as soon as the speculations
are known, then builds the next caches while the caller runs the target.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import traceback

from saguaro.config import EngineConfig, SpecConfig
from saguaro.draft import Drafter, DraftRound
from saguaro.engines import create_engine
from saguaro.errors import DraftFailure, SaguaroError
from saguaro.remote import DraftServer


def pin_to_core(core: int | None) -> None:
    if core is not None and hasattr(os, "sched_setaffinity") and core < os.cpu_count():
        os.sched_setaffinity(0, {core})


def _worker_main(conn, cfg: EngineConfig, spec: SpecConfig, core: int | None) -> None:
    pin_to_core(core)
    try:
        server = DraftServer(Drafter(create_engine(cfg, branches=True), spec))
    except Exception as e:  # report, don't leave the parent waiting
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", None))
    while (msg := conn.recv()) is not None:
        try:
            conn.send(("ok", server.handle(msg)))
        except Exception:
            conn.send(("error", traceback.format_exc()))
            continue
        if isinstance(msg, DraftRound):
            server.drafter.build()


class DraftWorker:
    def __init__(self, cfg: EngineConfig, spec: SpecConfig, core: int | None = None, start_timeout_s: float = 120.0):
        self.cfg, self.spec, self.core, self.start_timeout_s = cfg, spec, core, start_timeout_s
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.cfg, self.spec, self.core),
                                daemon=True, name="saguaro-draft")
        self.proc.start()
        if not self.conn.poll(self.start_timeout_s):
            self.proc.kill()
            raise SaguaroError(f"the draft worker did not start within {self.start_timeout_s:.0f} s")
        status, info = self.conn.recv()
        if status != "ok":
            raise SaguaroError(f"the draft model failed to load: {info}")

    def __call__(self, msg):
        try:
            self.conn.send(msg)
            if not self.conn.poll(self.spec.draft_timeout_s):
                raise TimeoutError(f"no answer within {self.spec.draft_timeout_s} s")
            status, reply = self.conn.recv()
        except (EOFError, OSError, TimeoutError) as e:
            self._restart()        # a stuck or dead worker is replaced; its sequences are gone
            raise DraftFailure(f"draft worker failed: {e}") from e
        if status != "ok":
            raise DraftFailure(f"draft worker failed: {reply}")
        return reply

    def _restart(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self._start()

    def close(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
