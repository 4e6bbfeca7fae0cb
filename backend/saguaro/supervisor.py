"""Keeps a running tritonserver's models alive.

Triton 2.51's Python backend neither restarts a stub process that died nor reports it: the model
stays "ready" and every request to it fails ("Stub process ... is not healthy"), or, for our engine
models reached over their sockets, nothing notices at all. `StubSupervisor` watches the server's
stub processes and, when one is gone, unloads its model (readiness turns false, so health checks
and load balancers see it) and loads it again (a new stub, a fresh engine). The orchestrator
re-connects by itself (saguaro.ipc.WireClient). Needs explicit model control (TritonServer does
that). docs/design.md, "Supervision".
"""
from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Callable


def stub_processes(server_pid: int) -> dict[int, str | None]:
    """The server's Python-backend stubs: pid -> model name, None for a stub that died on its own:
    Triton 2.51 does not reap it, so it stays a zombie (the stubs Triton stops itself are reaped)."""
    stubs: dict[int, str | None] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()
            if int(fields[1]) != server_pid:
                continue
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if fields[0] == "Z":
            stubs[int(entry.name)] = None
        elif len(argv) > 1 and argv[0].endswith(b"triton_python_backend_stub"):
            stubs[int(entry.name)] = Path(os.fsdecode(argv[1])).parent.parent.name   # <repo>/<model>/<version>/model.py
    return stubs


def stub_alive(pid: int) -> bool:
    """Whether a stub process is running: neither gone nor a zombie (stub_processes)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


# The models each model calls through BLS. A model that was answering calls of a stub that died takes
# no more requests in Triton 2.51 (measured: after the `ensemble` stub died under a stream, requests
# straight to `ssd` timed out until `ssd` was reloaded), so the supervisor reloads it with its caller.
BLS_CALLEES = {"ensemble": ("ssd",), "ensemble_sync": ("ssd",)}


def restarted_message(model: str) -> str:
    """A request's error when the stub of `model` died under it."""
    return f"the {model!r} model restarted under this request (its process died); retry the request"


class StubDeaths:
    """How many times each model's stub died, as supervisors find it. saguaro.serve shares one
    between every tritonserver it starts and its HTTP fronts: Triton 2.51 never answers a request
    again whose model's stub died, and a front ends such a request with restarted_message."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def died(self, model: str) -> None:
        self.counts[model] = self.counts.get(model, 0) + 1

    def watch(self, model: str) -> Callable[[], bool]:
        """A check that turns true once a stub of `model` dies after now."""
        start = self.counts.get(model, 0)
        return lambda: self.counts.get(model, 0) != start


class StubSupervisor:
    """A thread that checks the stubs every poll_s and reloads the model of each one that died."""

    def __init__(self, http_url: str, server_pid: int, poll_s: float = 0.5,
                 log: Callable[[str], None] = lambda line: None, deaths: StubDeaths | None = None,
                 admin: dict[str, str] | None = None):
        self.http_url, self.server_pid, self.poll_s, self.log = http_url, server_pid, poll_s, log
        self.admin = admin or {}          # the header Triton's repository API wants (TritonServer.admin)
        self.deaths = deaths if deaths is not None else StubDeaths()
        self.known: dict[int, str] = {}   # live stub pid -> model
        self.retry: set[str] = set()      # reloads that failed, tried again at the next check
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="saguaro-supervisor", daemon=True)

    def start(self) -> "StubSupervisor":
        self.check()                     # learn the stubs of the models loaded now
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        if self.thread.is_alive():
            self.thread.join(5)

    def _run(self) -> None:
        while not self.stopped.wait(self.poll_s):
            try:
                self.check()
            except Exception as e:       # keep watching whatever one check ran into
                self.log(f"supervisor: check failed: {type(e).__name__}: {e}")

    def check(self) -> list[str]:
        """Reloads the models whose stubs died since the last check (and are still meant to be
        loaded: not unloaded on purpose); returns their names."""
        stubs = stub_processes(self.server_pid)
        # Died: a zombie. A stub that Triton ends itself (unload, reload) is reaped and vanishes.
        dead = {model for pid, model in self.known.items() if pid in stubs and stubs[pid] is None}
        self.known = {pid: model for pid, model in stubs.items() if model is not None}
        for model in dead:
            self.deaths.died(model)
        retry, self.retry = self.retry, set()
        if not dead and not retry:
            return []
        callers = {callee: model for model in sorted(dead) for callee in BLS_CALLEES.get(model, ())}
        todo = sorted(((dead | set(callers)) & self._loaded_models()) | retry)
        for model in todo:
            if self.stopped.is_set():
                break
            why = ("died" if model in dead else f"answered calls of {callers[model]!r}, whose stub died"
                   if model in callers else "was not reloaded at the last check")
            self.log(f"supervisor: the stub process of model {model!r} {why}; reloading it")
            t0 = time.monotonic()
            try:
                self._post(f"/v2/repository/models/{model}/unload")
                self._post(f"/v2/repository/models/{model}/load")
                self.log(f"supervisor: model {model!r} is back after {time.monotonic() - t0:.1f} s")
            except (urllib.error.URLError, OSError) as e:
                self.log(f"supervisor: reloading {model!r} failed ({e}); retrying at the next check")
                self.retry.add(model)
        self.known.update({pid: m for pid, m in stub_processes(self.server_pid).items() if m is not None})
        return todo

    def _loaded_models(self) -> set[str]:
        """Models the server holds as loaded (READY), from the repository index."""
        index = json.loads(post(self.http_url, "/v2/repository/index", timeout_s=10, headers=self.admin))
        return {m["name"] for m in index if m.get("state") == "READY"}

    def _post(self, path: str) -> None:
        post(self.http_url, path, timeout_s=300, headers=self.admin)


def post(http_url: str, path: str, body: bytes = b"{}", timeout_s: float = 10.0,
         headers: dict[str, str] | None = None) -> bytes:
    """POST to Triton's HTTP API (repository load/unload/index, with the server's admin header;
    generate); the response body. Raises urllib.error.HTTPError for an error status, URLError/OSError
    when unreachable."""
    req = urllib.request.Request(f"http://{http_url}{path}", data=body, method="POST", headers=headers or {})
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return r.read()
