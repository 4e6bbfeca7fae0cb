"""Two guards in triton_models against Triton 2.51's Python-backend stub (python_backend r24.10),
which frees Python objects without the GIL in two places: responses carry only the outputs the
request asked for, and finished BLS calls are let go by Python, not by the stub's C++ thread."""
from __future__ import annotations

import gc
import weakref

import numpy as np

from saguaro import triton_models
from saguaro.triton_models import KeptCalls, response


class RecordingPbUtils:
    """The two pb_utils types response() builds, recording what it built."""

    def __init__(self):
        self.built: list[str] = []
        outer = self

        class Tensor:
            def __init__(self, name, value):
                outer.built.append(name)

        class InferenceResponse:
            def __init__(self, tensors):
                self.tensors = tensors

        self.Tensor, self.InferenceResponse = Tensor, InferenceResponse


def test_a_response_builds_only_the_outputs_the_request_asked_for():
    pb = RecordingPbUtils()
    outputs = {"text_output": np.array([b"x"], dtype=object), "rounds": np.array([3], dtype=np.int32)}
    assert len(response(pb, outputs, {"text_output", "batch_index"}).tensors) == 1
    assert pb.built == ["text_output"]
    assert len(response(pb, outputs).tensors) == 2            # asked for none: all


class Call:
    """Stands for a finished BLS call's response iterator."""


def test_finished_calls_are_held_a_while_then_let_go_by_python(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(triton_models.time, "monotonic", lambda: clock[0])
    kept = KeptCalls()
    first = Call()
    gone = weakref.ref(first)
    kept.keep(first)
    del first
    clock[0] += KeptCalls.KEEP_S / 2
    kept.keep(Call())
    gc.collect()
    assert gone() is not None                   # still ours: the stub's own reference goes first
    clock[0] += KeptCalls.KEEP_S * 0.75         # the first is now older than KEEP_S, the second not
    kept.keep(Call())
    gc.collect()
    assert gone() is None and len(kept.calls) == 2
