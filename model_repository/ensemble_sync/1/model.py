"""Unary front door: a batched NVIDIA-shaped request in, each (row, sequence) relayed to `ssd` at
once (saguaro.request_loop.nvidia_rows), their single (non-streamed) responses out as one, row by row.

While it waits, every POLL_S: a client that cancelled (or timed out) has its rows cancelled in `ssd`,
which frees their slots before its next round (each row is relayed with a relay id, as `ensemble`
does); and a request whose `ssd` stub died gets a retryable error (Triton 2.51 ends none of a dead
stub's requests: the calls would never return, and neither would this model)."""
import secrets
import threading

import numpy as np
import triton_python_backend_utils as pb_utils

from saguaro.errors import SaguaroError
from saguaro.private_dir import runtime_dir, server_secret
from saguaro.request_loop import nvidia_outputs, nvidia_rows, stacked
from saguaro.triton_models import (RELAYED_OUTPUTS, KeptCalls, StubWatch, cancel_relayed, error_response, inputs_of,
                                   model_params, outputs_of, relay_tag, relayed_error, response)

POLL_S = 0.1                        # how often a waiting request checks its client and `ssd`'s stub


class Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        self.max_sequences = model_params(args).integer("max_num_return_sequences", 8)
        self.kept = KeptCalls()
        self.ssd = StubWatch("ssd", ready=lambda: pb_utils.is_model_ready("ssd"))
        self.secret = np.array([server_secret(runtime_dir())], dtype=np.object_)

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            rows = nvidia_rows(inputs_of(request), self.max_sequences)
            answers = self._rows(request, rows)
            errors = [a for a in answers if a is not None and not isinstance(a, dict)]
            return errors[0] if errors else response(pb_utils, stacked(answers), set(request.requested_output_names()))
        except Cancelled:
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED))
        except Exception as e:
            return error_response(pb_utils, e)

    def _rows(self, request, rows) -> list:
        """Each row's answer (_row), the rows relayed at once. Cancelled when the client cancels
        first; Unavailable when the `ssd` stub they went to dies first, or an error comes back while
        `ssd` restarts (threads left waiting on calls that never end stay blocked)."""
        pid = self.ssd.current()
        ids = [secrets.randbits(63) for _ in rows]
        answers: list = [None] * len(rows)
        done = threading.Semaphore(0)

        def run(i):
            try:
                answers[i] = self._row(rows[i], ids[i])
            except BaseException as e:
                answers[i] = e
            finally:
                done.release()
        def cancel_running():
            for relay_id, answer in zip(ids, answers):
                if answer is None:
                    cancel_relayed(pb_utils, relay_id, self.secret, self.kept)
        for i in range(len(rows)):
            threading.Thread(target=run, args=(i,), name="saguaro-relay", daemon=True).start()
        for _ in rows:
            while not done.acquire(timeout=POLL_S):
                if pid is None and self.ssd.seen:                   # relayed while no `ssd` stub ran
                    pid = self.ssd.current()
                if self.ssd.died(pid):
                    raise self.ssd.error(pid)
                if request.is_cancelled():
                    cancel_running()
                    raise Cancelled
            if any(a is not None and not isinstance(a, dict) for a in answers):
                # a row failed, and with it the request: its other rows end in `ssd` now rather
                # than decode to their end for nobody
                cancel_running()
                break
        restart = self.ssd.restarted(pid) if any(not isinstance(a, dict) for a in answers) else None
        if restart is not None:     # (Triton's own errors: "Stub process ... is not healthy", "... not ready")
            raise restart
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers      # (None for a row cancelled after another failed)

    def _row(self, row, relay_id: int):
        """The row's outputs in NVIDIA's shapes, or `ssd`'s error response."""
        stream = row.inputs.get("stream")
        if stream is not None and stream.any():
            raise SaguaroError("stream: ensemble_sync answers once; send stream false, or stream from `ensemble`")
        inputs = [pb_utils.Tensor(name, value) for name, value in row.inputs.items()]
        inputs += relay_tag(pb_utils, relay_id, self.secret)
        call = pb_utils.InferenceRequest(model_name="ssd", inputs=inputs, requested_output_names=RELAYED_OUTPUTS)
        replies = call.exec(decoupled=True)
        # read to the end (a call left unfinished is never cleaned up: the stub keeps it), and kept
        answers = [r for r in replies if r.has_error() or r.output_tensors()]
        self.kept.keep(replies)
        error = relayed_error(pb_utils, answers[0])
        return error if error is not None else nvidia_outputs(outputs_of(answers[0]), row)
