"""Unary front door: a batched NVIDIA-shaped request in, each (row, sequence) relayed to `ssd` at
once (saguaro.request_loop.nvidia_rows), their single (non-streamed) responses out as one, row by row.
A request whose `ssd` stub dies under it gets a retryable error (Triton 2.51 ends none of a dead
stub's requests: the calls would never return, and neither would this model)."""
import threading

import triton_python_backend_utils as pb_utils

from saguaro.errors import SaguaroError
from saguaro.request_loop import nvidia_outputs, nvidia_rows, stacked
from saguaro.triton_models import (RELAYED_OUTPUTS, KeptCalls, StubWatch, error_response, inputs_of, model_params,
                                   outputs_of, response)

POLL_S = 0.1                        # how often a request waiting on `ssd` checks that its stub lives


class TritonPythonModel:
    def initialize(self, args):
        self.max_sequences = int(model_params(args).get("max_num_return_sequences", "8"))
        self.kept = KeptCalls()
        self.ssd = StubWatch("ssd", ready=lambda: pb_utils.is_model_ready("ssd"))

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        try:
            rows = nvidia_rows(inputs_of(request), self.max_sequences)
            answers = self._rows(rows)
            errors = [a for a in answers if not isinstance(a, dict)]
            return errors[0] if errors else response(pb_utils, stacked(answers), set(request.requested_output_names()))
        except Exception as e:
            return error_response(pb_utils, e)

    def _rows(self, rows) -> list:
        """Each row's answer (_row), the rows relayed at once; Unavailable when the `ssd` stub they
        went to dies first (their threads are left waiting on calls that never end), or an error
        comes back while `ssd` restarts."""
        pid = self.ssd.current()
        answers: list = [None] * len(rows)
        done = threading.Semaphore(0)

        def run(i, row):
            try:
                answers[i] = self._row(row)
            except BaseException as e:
                answers[i] = e
            finally:
                done.release()
        for i, row in enumerate(rows):
            threading.Thread(target=run, args=(i, row), name="saguaro-relay", daemon=True).start()
        for _ in rows:
            while not done.acquire(timeout=POLL_S):
                if self.ssd.died(pid):
                    raise self.ssd.error()
        if any(not isinstance(a, dict) for a in answers) and self.ssd.down(pid):
            raise self.ssd.error()      # (Triton's own: "Stub process ... is not healthy", "... not ready")
        for answer in answers:
            if isinstance(answer, BaseException):
                raise answer
        return answers

    def _row(self, row):
        """The row's outputs in NVIDIA's shapes, or `ssd`'s error response."""
        stream = row.inputs.get("stream")
        if stream is not None and stream.any():
            raise SaguaroError("stream: ensemble_sync answers once; send stream false, or stream from `ensemble`")
        inputs = [pb_utils.Tensor(name, value) for name, value in row.inputs.items()]
        call = pb_utils.InferenceRequest(model_name="ssd", inputs=inputs, requested_output_names=RELAYED_OUTPUTS)
        replies = call.exec(decoupled=True)
        # read to the end (a call left unfinished is never cleaned up: the stub keeps it), and kept
        answers = [r for r in replies if r.has_error() or r.output_tensors()]
        self.kept.keep(replies)
        reply = answers[0]
        if reply.has_error():
            return pb_utils.InferenceResponse(error=reply.error())
        return nvidia_outputs(outputs_of(reply), row)
