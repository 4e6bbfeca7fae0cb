"""Starting and stopping the pip-installed tritonserver: errors name the fix, nothing is left running."""
from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from saguaro.errors import SaguaroError
from saguaro.tritonserver_process import DEFAULT_MODEL_REPOSITORY, TritonServer, FREE_PORTS, ephemeral_low, free_port

BROKEN = '''
import triton_python_backend_utils as pb_utils
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("broken on purpose")
    def execute(self, requests):
        return None
'''
CONFIG = '''
name: "broken"
backend: "python"
max_batch_size: 0
input [{ name: "x" data_type: TYPE_INT32 dims: [1] }]
output [{ name: "y" data_type: TYPE_INT32 dims: [1] }]
instance_group [{ kind: KIND_CPU count: 1 }]
'''


def test_port_in_use_names_the_flag(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        with pytest.raises(SaguaroError, match=f"--grpc-port: port {busy} .* already in use"):
            TritonServer(tmp_path, http_port=0, grpc_port=busy, metrics_port=0).start()


def test_free_ports_lie_below_the_ephemeral_range_where_outgoing_connections_take_theirs(tmp_path, monkeypatch):
    low = ephemeral_low()
    ports = {free_port() for _ in range(20)}
    assert all(low - FREE_PORTS <= p < low for p in ports) and len(ports) > 10
    for p in ports:         # each bindable (nothing holds it)
        with socket.socket() as s:
            s.bind(("127.0.0.1", p))
    (tmp_path / "range").write_text("2000\t60999\n")
    assert ephemeral_low(str(tmp_path / "range")) == 2000
    assert ephemeral_low(str(tmp_path / "absent")) == 49152
    # a range that starts too low leaves no room below it: the kernel's pick (port 0) then
    monkeypatch.setattr("saguaro.tritonserver_process.ephemeral_low", lambda: 2000)
    assert free_port() >= low


def test_model_load_failure_shows_the_models_error_and_leaves_nothing_running(tmp_path: Path):
    (tmp_path / "broken" / "1").mkdir(parents=True)
    (tmp_path / "broken" / "config.pbtxt").write_text(CONFIG)
    (tmp_path / "broken" / "1" / "model.py").write_text(BROKEN)
    server = TritonServer(tmp_path, http_port=0, grpc_port=0, metrics_port=0)
    with pytest.raises(SaguaroError, match="(?s)failed to load.*broken on purpose"):
        server.start(timeout_s=60)
    assert server.proc is None


def test_stop_ends_the_stub_processes():
    server = TritonServer(DEFAULT_MODEL_REPOSITORY, http_port=0, grpc_port=0, metrics_port=0, models=["preprocessing"])
    with server:
        assert server.model_ready("preprocessing") and not server.model_ready("postprocessing")
        group = _group(server.proc.pid)
        assert len(group) >= 2, "expected the server and a Python-backend stub in one process group"
    assert not any(os.path.exists(f"/proc/{p}") and _pgid(p) == group[0] for p in group)


def _group(pgid: int) -> list[int]:
    return [pgid] + [int(p) for p in os.listdir("/proc") if p.isdigit() and int(p) != pgid and _pgid(p) == pgid]


def _pgid(pid: str | int) -> int:
    try:
        return int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[2])
    except (OSError, IndexError, ValueError):
        return -1
