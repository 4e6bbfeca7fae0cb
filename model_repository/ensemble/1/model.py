"""`ensemble`: each request relayed to `ssd` (text in, text out) over BLS, its streamed responses
relayed back, and a client's cancellation or disconnect passed on at once (Triton 2.51 ensembles do
not forward cancellation to their steps, so a cancelled stream kept decoding and held its slot).

The relayed request carries a relay id and the server's secret; a thread here checks the requests
in flight every cancel_poll_ms (and whenever a response passes) and, for a cancelled one, sends
`ssd` a cancel for that id, which ends the sequence and frees its KV slots before the next round.
"""
import secrets
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from saguaro.private_dir import runtime_dir, server_secret
from saguaro.triton_glue import error_response, model_params

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
OUTPUTS = ["text_output", "generated_tokens", "rounds", "accepted_tokens", "drafted_tokens", "cache_hits", "ar_rounds", "sd_rounds", "ssd_rounds", "relay_error"]


class TritonPythonModel:
    def initialize(self, args):
        self.auth = pb_utils.Tensor("auth", np.array([server_secret(runtime_dir())], dtype=np.object_))
        self.poll_s = float(model_params(args).get("cancel_poll_ms", "100")) / 1e3
        self.in_flight: dict[int, object] = {}      # relay id -> the client's request
        self.cancelled: set[int] = set()
        self.lock, self.stopped = threading.Lock(), threading.Event()
        threading.Thread(target=self._watch, name="saguaro-relay-cancel", daemon=True).start()

    def execute(self, requests):
        for request in requests:
            relay_id = secrets.randbits(63)
            with self.lock:
                self.in_flight[relay_id] = request
            threading.Thread(target=self._relay, args=(request, relay_id), daemon=True).start()
        return None

    def _relay(self, request, relay_id: int) -> None:
        sender = request.get_response_sender()
        done = False
        try:
            inputs = request.inputs() + [pb_utils.Tensor("relay_id", np.array([relay_id], dtype=np.uint64)), self.auth]
            call = pb_utils.InferenceRequest(model_name="ssd", inputs=inputs, requested_output_names=OUTPUTS)
            for reply in call.exec(decoupled=True):
                if done:
                    continue                    # drain `ssd`'s end of the call
                if reply.has_error():
                    done = self._finish(relay_id, sender, pb_utils.InferenceResponse(error=reply.error()))
                    continue
                error = pb_utils.get_output_tensor_by_name(reply, "relay_error")
                if error is not None:           # an error after streamed responses comes as data
                    code, message = (x.decode() for x in error.as_numpy().reshape(-1))
                    done = self._finish(relay_id, sender, pb_utils.InferenceResponse(
                        error=pb_utils.TritonError(message, getattr(pb_utils.TritonError, code))))
                elif reply.output_tensors() and relay_id not in self.cancelled:
                    # the totals come with `ssd`'s final response: forward it as final too (clients
                    # such as perf_analyzer read the totals off the last response)
                    out = pb_utils.InferenceResponse(reply.output_tensors())
                    if pb_utils.get_output_tensor_by_name(reply, "generated_tokens") is not None:
                        done = self._finish(relay_id, sender, out)
                    else:
                        sender.send(out)
                        self._check(relay_id, request)
            if not done:
                done = self._finish(relay_id, sender, None)
        except Exception as e:      # the client may be gone: nothing to tell it
            if not done:
                try:
                    self._finish(relay_id, sender, error_response(pb_utils, e))
                except Exception:
                    pass
        finally:
            with self.lock:
                self.in_flight.pop(relay_id, None)
                self.cancelled.discard(relay_id)

    def _finish(self, relay_id: int, sender, response) -> bool:
        """The client's final response. Its request leaves `in_flight` first, under the lock
        _check holds: is_cancelled() on a request that has its final response crashes
        tritonserver 2.51 (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled)."""
        with self.lock:
            self.in_flight.pop(relay_id, None)
        if response is None:
            sender.send(flags=FINAL)
        else:
            sender.send(response, flags=FINAL)
        return True

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_s):
            with self.lock:
                pending = [(i, r) for i, r in self.in_flight.items() if i not in self.cancelled]
            for relay_id, request in pending:
                self._check(relay_id, request)

    def _check(self, relay_id: int, request) -> None:
        with self.lock:                 # see _finish
            if relay_id not in self.in_flight or relay_id in self.cancelled or not request.is_cancelled():
                return
            self.cancelled.add(relay_id)
        cancel = pb_utils.InferenceRequest(
            model_name="ssd", requested_output_names=[],
            inputs=[pb_utils.Tensor("cancel_relay_id", np.array([relay_id], dtype=np.uint64)), self.auth])
        for _ in cancel.exec(decoupled=True):
            pass

    def finalize(self):
        """Waits (a little) for the relays in flight: `ssd`, unloading beside us, ends them, and
        Triton does not let this model go while its BLS calls are open."""
        self.stopped.set()
        deadline = time.monotonic() + 2.5
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
