"""The draft in its own process (its own core), so pre-drafting truly overlaps verification.

`DraftWorker` is a call(msg) -> answers over a pipe to a DraftServer in a child process; wrap it
in remote.RemoteDraft to get a DraftClient. The child sends each answer as soon as it has it: a
round's speculations at once, the next caches after building them while the caller runs the target.
"""
from __future__ import annotations

import multiprocessing as mp
from typing import Iterator

from saguaro.config import EngineConfig, SpecConfig
from saguaro.draft import Drafter
from saguaro.engines import create_engine, pin_to_core
from saguaro.errors import SaguaroError
from saguaro.remote import DraftServer, WireClient, serve_wire


def _worker_main(conn, cfg: EngineConfig, spec: SpecConfig, core: int | None) -> None:
    pin_to_core(core)
    try:
        server = DraftServer(Drafter(create_engine(cfg, branches=True), spec))
    except Exception as e:  # report, don't leave the parent waiting
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ok", None))
    serve_wire(conn, server.handle)


class DraftWorker:
    """call(msg) -> answers of a DraftServer in a child process (a stuck or dead child is replaced)."""

    def __init__(self, cfg: EngineConfig, spec: SpecConfig, core: int | None = None, start_timeout_s: float = 120.0):
        self.cfg, self.spec, self.core, self.start_timeout_s = cfg, spec, core, start_timeout_s
        self._start()

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_worker_main, args=(child, self.cfg, self.spec, self.core),
                                daemon=True, name="saguaro-draft")
        self.proc.start()
        if not conn.poll(self.start_timeout_s):
            self.proc.kill()
            raise SaguaroError(f"the draft worker did not start within {self.start_timeout_s:.0f} s")
        status, info = conn.recv()
        if status != "ok":
            raise SaguaroError(f"the draft model failed to load: {info}")
        self.client = WireClient(conn, self.spec.draft_timeout_s, on_broken=self._restart)

    def __call__(self, msg) -> Iterator:
        return self.client(msg)

    def _restart(self) -> None:
        self.proc.kill()
        self.proc.join(5)
        self._start()

    def close(self) -> None:
        try:
            self.client.conn.send(None)
        except OSError:
            pass
        self.client.close()
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
