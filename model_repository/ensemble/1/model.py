"""`ensemble`: NVIDIA's batched requests relayed to `ssd` (text in, text out), each (batch row,
sequence) as a request of its own (saguaro.request_loop.nvidia_rows), their streamed responses merged
back onto the client's stream with batch_index/sequence_index, and a client's cancellation or
disconnect passed on at once (Triton 2.51 ensembles do not forward cancellation to their steps, so
a cancelled stream kept decoding and held its slot).

Every relayed request carries a relay id and the server's secret; a thread here checks the requests
in flight every cancel_poll_ms (and whenever a response passes) and, for a cancelled one, sends
`ssd` a cancel for each of its relay ids, which ends those sequences and frees their KV slots
before the next round. The same thread notices when the `ssd` stub a relay called has died
(Triton 2.51 ends none of a dead stub's requests) and ends those clients' streams with a retryable
error.
"""
import secrets
import threading
import time
import traceback
from dataclasses import dataclass

import numpy as np
import triton_python_backend_utils as pb_utils

from saguaro.private_dir import runtime_dir, server_secret
from saguaro.request_loop import nvidia_outputs, nvidia_rows
from saguaro.triton_models import (RELAYED_OUTPUTS, KeptCalls, StubWatch, cancel_relayed, error_response, inputs_of,
                                   model_params, outputs_of, relay_tag, relayed_error, response)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class ClientStream:
    """The client's one stream for all the rows of its request: sends are serialized and the
    final flag goes with the end of the last row (as tensorrt_llm/1/model.py does for a batch).
    before_final() runs under the stream's lock just before the final send."""

    def __init__(self, sender, rows: int, before_final):
        self.sender, self.left, self.before_final = sender, rows, before_final
        self.lock, self.done = threading.Lock(), False

    def send(self, response) -> None:
        with self.lock:
            if not self.done:
                self.sender.send(response)

    def end_row(self, last_response) -> None:
        """A row ended: its last response (None: it had none left to send)."""
        with self.lock:
            if self.done:
                return
            self.left -= 1
            if self.left:
                if last_response is not None:
                    self.sender.send(last_response)
                return
            self._final(last_response)

    def fail(self, error_response_) -> bool:
        """Ends the stream with an error; False when it had already ended."""
        with self.lock:
            if self.done:
                return False
            self._final(error_response_)
            return True

    def _final(self, response) -> None:
        self.done = True
        self.before_final()
        if response is None:
            self.sender.send(flags=FINAL)
        else:
            self.sender.send(response, flags=FINAL)


@dataclass
class Relayed:
    """A row in flight: the client's request and stream, the relay ids of its request's rows, and
    the `ssd` stub that was running when it was relayed."""
    request: object
    stream: ClientStream
    siblings: list[int]
    ssd_pid: int | None


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        # the server's secret, as a new tensor for each call: a tensor is written to shared memory
        # the first time a call sends it, with the GIL released (PbTensor::SaveToSharedMemory, r24.10)
        self.secret = np.array([server_secret(runtime_dir())], dtype=np.object_)
        self.kept = KeptCalls()
        self.poll_s = params.number("cancel_poll_ms", 100) / 1e3
        self.max_sequences = params.integer("max_num_return_sequences", 8)
        self.ssd = StubWatch("ssd", ready=lambda: pb_utils.is_model_ready("ssd"))
        self.in_flight: dict[int, Relayed] = {}     # relay id -> its row
        self.cancelled: set[int] = set()
        self.lock, self.stopped = threading.Lock(), threading.Event()
        threading.Thread(target=self._watch, name="saguaro-relay-cancel", daemon=True).start()

    def execute(self, requests):
        for request in requests:
            try:
                rows = nvidia_rows(inputs_of(request), self.max_sequences)
            except Exception as e:
                request.get_response_sender().send(error_response(pb_utils, e), flags=FINAL)
                continue
            ids = [secrets.randbits(63) for _ in rows]
            stream = ClientStream(request.get_response_sender(), len(rows), lambda ids=ids: self._forget(ids))
            relayed = Relayed(request, stream, ids, self.ssd.current())
            with self.lock:
                self.in_flight.update((relay_id, relayed) for relay_id in ids)
            wanted = set(request.requested_output_names())
            for row, relay_id in zip(rows, ids):
                threading.Thread(target=self._relay, args=(row, relay_id, relayed, wanted), daemon=True).start()
        return None

    def _relay(self, row, relay_id: int, relayed: Relayed, wanted: set[str]) -> None:
        """One row's request to `ssd`, its responses (the outputs the client asked for) onto the
        client's stream."""
        ended, replies, stream = False, (), relayed.stream
        try:
            inputs = [pb_utils.Tensor(name, value) for name, value in row.inputs.items()]
            inputs += relay_tag(pb_utils, relay_id, self.secret)
            call = pb_utils.InferenceRequest(model_name="ssd", inputs=inputs, requested_output_names=RELAYED_OUTPUTS)
            replies = call.exec(decoupled=True)
            for reply in replies:
                if ended:
                    continue                    # drain `ssd`'s end of the call
                error = relayed_error(pb_utils, reply)
                if error is not None:
                    ended = True
                    self._fail(relayed, error)
                elif reply.output_tensors() and relay_id not in self.cancelled:
                    out = response(pb_utils, nvidia_outputs(outputs_of(reply), row), wanted)
                    # the totals come with `ssd`'s last response of the row
                    if pb_utils.get_output_tensor_by_name(reply, "generated_tokens") is not None:
                        ended = True
                        stream.end_row(out)
                    else:
                        stream.send(out)
                        self._check(relay_id, relayed.request)
            if not ended:
                stream.end_row(None)
        except Exception as e:      # the client may be gone: nothing to tell it
            if not ended:
                try:
                    self._fail(relayed, error_response(pb_utils, e))
                except Exception:
                    pass
        finally:
            self.kept.keep(replies)
            with self.lock:
                self.in_flight.pop(relay_id, None)
                self.cancelled.discard(relay_id)

    def _fail(self, relayed: Relayed, error_response_=None) -> None:
        """An error ends the client's request: its other rows are cancelled in `ssd`. Where the
        `ssd` model was restarting under the request, the error is that (retryable: Triton's own
        is "Stub process ... is not healthy" or "Model 'ssd' is not ready"), and the new `ssd`
        holds nothing to cancel."""
        restart = self.ssd.restarted(relayed.ssd_pid)
        if restart is not None:
            relayed.stream.fail(error_response(pb_utils, restart))
        elif relayed.stream.fail(error_response_):
            for relay_id in relayed.siblings:
                self._cancel(relay_id)

    def _forget(self, ids: list[int]) -> None:
        """The request's relay ids leave `in_flight` before its final response, under the lock
        _check holds: is_cancelled() on a request that has its final response crashes
        tritonserver 2.51 (SIGSEGV in TRITONBACKEND_ResponseFactoryIsCancelled)."""
        with self.lock:
            for relay_id in ids:
                self.in_flight.pop(relay_id, None)

    def _watch(self) -> None:
        while not self.stopped.wait(self.poll_s):
            with self.lock:
                pending = list(self.in_flight.items())
            for _, relayed in pending:
                if relayed.ssd_pid is None and self.ssd.seen:   # relayed while no `ssd` stub ran
                    relayed.ssd_pid = self.ssd.current()
            dead = {pid for pid in {r.ssd_pid for _, r in pending} if self.ssd.died(pid)}
            for relay_id, relayed in pending:
                try:                            # (a client gone: nothing to tell it; the watch goes on)
                    if relayed.ssd_pid in dead:
                        self._fail(relayed)     # (restarted: the stub died)
                    elif relay_id not in self.cancelled:
                        self._check(relay_id, relayed.request)
                except Exception:
                    traceback.print_exc()

    def _check(self, relay_id: int, request) -> None:
        with self.lock:                 # see _forget
            if relay_id not in self.in_flight or relay_id in self.cancelled or not request.is_cancelled():
                return
            self.cancelled.add(relay_id)
        self._cancel(relay_id)

    def _cancel(self, relay_id: int) -> None:
        cancel_relayed(pb_utils, relay_id, self.secret, self.kept)

    def finalize(self):
        """Waits (a little) for the relays in flight: `ssd`, unloading beside us, ends them, and
        Triton does not let this model go while its BLS calls are open."""
        self.stopped.set()
        deadline = time.monotonic() + 2.5
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.02)
