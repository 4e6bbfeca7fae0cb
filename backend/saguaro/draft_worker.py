"""The draft in its own process (its own core), so pre-drafting truly overlaps verification.

`DraftWorker` is a call(msg) -> answers over a pipe to a DraftServer in a child process; wrap it
in remote.RemoteDraft to get a DraftClient. The child sends each answer as soon as it has it: a
round's speculations at once, the next caches after building them while the caller runs the target.
Messages are saguaro.messages bytes both ways. A dead or stuck child fails the round at once (its
sequences continue on the target alone) and is replaced in the background.
"""
from __future__ import annotations

import multiprocessing as mp
import threading
from typing import Iterator

from saguaro.config import EngineConfig, SpecConfig
from saguaro.draft import Drafter
from saguaro.engines import create_engine, pin_to_core
from saguaro.errors import SaguaroError
from saguaro.ipc import WireClient, serve_wire
from saguaro.messages import Done, Failed, decode, encode
from saguaro.remote import DraftServer


def _worker_main(conn, cfg: EngineConfig, spec: SpecConfig, core: int | None) -> None:
    pin_to_core(core)
    try:
        server = DraftServer(Drafter(create_engine(cfg, branches=True), spec))
    except Exception as e:  # report, don't leave the parent waiting
        conn.send_bytes(encode(Failed(f"{type(e).__name__}: {e}")))
        return
    conn.send_bytes(encode(Done()))
    serve_wire(conn, server.handle)


class DraftWorker:
    """call(msg) -> answers of a DraftServer in a child process (a stuck or dead child is replaced)."""

    def __init__(self, cfg: EngineConfig, spec: SpecConfig, core: int | None = None, start_timeout_s: float = 120.0):
        self.cfg, self.spec, self.core, self.start_timeout_s = cfg, spec, core, start_timeout_s
        self.proc = None
        self.lock = threading.Lock()
        self.client = WireClient(self._spawn, spec.draft_timeout_s, peer="draft worker")
        if not self.client.wait_connected(start_timeout_s):
            error = self.client.last_error
            self.close()
            raise SaguaroError(f"the draft worker did not start within {start_timeout_s:.0f} s: {error}")

    def _spawn(self):
        """A fresh child (the old one killed): the parent's end of its pipe once it has loaded."""
        with self.lock:
            if self.proc is not None:
                self.proc.kill()
                self.proc.join(5)
            ctx = mp.get_context("spawn")
            conn, child = ctx.Pipe()
            self.proc = ctx.Process(target=_worker_main, args=(child, self.cfg, self.spec, self.core),
                                    daemon=True, name="saguaro-draft")
            self.proc.start()
            child.close()
        if not conn.poll(self.start_timeout_s):
            raise SaguaroError(f"the draft worker did not answer within {self.start_timeout_s:.0f} s")
        status = decode(conn.recv_bytes())
        if isinstance(status, Failed):
            raise SaguaroError(f"the draft model failed to load: {status.error}")
        return conn

    def __call__(self, msg) -> Iterator:
        return self.client(msg)

    def ready(self) -> bool:
        return self.client.ready()

    def close(self) -> None:
        self.client.close()
        with self.lock:
            if self.proc is not None:
                self.proc.join(2)
                if self.proc.is_alive():
                    self.proc.kill()
                    self.proc.join(5)

