"""A toy stand-in for the real `ensemble`, served by the pip-installed tritonserver.

The toy is one decoupled Python model with the ensemble's exact inputs and outputs: it streams the
pieces " w0", " w1", ... (one per token, 2 ms apart), sends the speculative totals on its final
response and publishes `saguaro_*` counters, so the clients, perf_analyzer and the sweep can be
exercised without the real models. Used to produce tests/data/ samples and for local checks.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path
from typing import Iterator

from saguaro.tritonserver_process import TritonServer

CONFIG = """
name: "ensemble"
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [
  { name: "text_input" data_type: TYPE_STRING dims: [1] },
  { name: "max_tokens" data_type: TYPE_INT32 dims: [1] },
  { name: "stream" data_type: TYPE_BOOL dims: [1] optional: true },
  { name: "temperature" data_type: TYPE_FP32 dims: [1] optional: true },
  { name: "top_k" data_type: TYPE_INT32 dims: [1] optional: true },
  { name: "top_p" data_type: TYPE_FP32 dims: [1] optional: true },
  { name: "seed" data_type: TYPE_UINT64 dims: [1] optional: true },
  { name: "end_id" data_type: TYPE_INT32 dims: [1] optional: true },
  { name: "num_draft_tokens" data_type: TYPE_INT32 dims: [1] optional: true },
  { name: "decoding_mode" data_type: TYPE_STRING dims: [1] optional: true }
]
output [
  { name: "text_output" data_type: TYPE_STRING dims: [-1] },
  { name: "generated_tokens" data_type: TYPE_INT32 dims: [1] },
  { name: "rounds" data_type: TYPE_INT32 dims: [1] },
  { name: "accepted_tokens" data_type: TYPE_INT32 dims: [1] },
  { name: "drafted_tokens" data_type: TYPE_INT32 dims: [1] },
  { name: "cache_hits" data_type: TYPE_INT32 dims: [1] }
]
instance_group [{ kind: KIND_CPU count: 1 }]
"""

MODEL = '''
import time
import numpy as np
import triton_python_backend_utils as pb_utils

# Per-token cost by mode, so the sweep has something to compare: ssd < sd < ar.
STEP_S = {"ssd": 0.002, "sd": 0.003, "ar": 0.004}


def _get(request, name, default):
    t = pb_utils.get_input_tensor_by_name(request, name)
    return default if t is None else t.as_numpy().reshape(-1)[0]


class TritonPythonModel:
    def initialize(self, args):
        def counter(name):
            fam = pb_utils.MetricFamily(name=name, description=name, kind=pb_utils.MetricFamily.COUNTER)
            return fam, fam.Metric(labels={"model": "ensemble"})
        self.families = {}
        for key in ("cache_hits", "cache_misses", "accepted_tokens", "drafted_tokens", "rounds"):
            self.families[key] = counter(f"saguaro_{key}_total")

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            n = int(_get(request, "max_tokens", 16))
            stream = bool(_get(request, "stream", False))
            mode = _get(request, "decoding_mode", b"ssd").decode()
            if mode not in STEP_S:
                sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"decoding_mode: unknown {mode!r}")),
                            flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            pieces = [f" w{i}" for i in range(n)]
            for piece in pieces:
                time.sleep(STEP_S[mode])
                if stream:
                    text = pb_utils.Tensor("text_output", np.array([piece.encode()], dtype=object))
                    sender.send(pb_utils.InferenceResponse([text]))
            rounds, drafted = (n + 1) // 2, ((n + 1) // 2) * 3 if mode != "ar" else 0
            totals = {"generated_tokens": n, "rounds": rounds, "accepted_tokens": n - rounds if mode != "ar" else 0,
                      "drafted_tokens": drafted, "cache_hits": rounds - 1 if mode == "ssd" else 0}
            for key, value in totals.items():
                if key in self.families:
                    self.families[key][1].increment(value)
            if mode == "ssd":
                self.families["cache_misses"][1].increment(1)
            last = "" if stream else "".join(pieces)
            tensors = [pb_utils.Tensor("text_output", np.array([last.encode()], dtype=object))]
            tensors += [pb_utils.Tensor(k, np.array([v], dtype=np.int32)) for k, v in totals.items()]
            sender.send(pb_utils.InferenceResponse(tensors), flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
'''


@contextlib.contextmanager
def toy_server() -> Iterator[TritonServer]:
    """Serves the toy `ensemble` on free 127.0.0.1 ports with the project's launcher; stops it on exit."""
    with tempfile.TemporaryDirectory(prefix="toy_repo_") as repo:
        (Path(repo) / "ensemble" / "1").mkdir(parents=True)
        (Path(repo) / "ensemble" / "config.pbtxt").write_text(CONFIG)
        (Path(repo) / "ensemble" / "1" / "model.py").write_text(MODEL)
        with TritonServer(repo, http_port=0, grpc_port=0, metrics_port=0) as server:
            yield server
