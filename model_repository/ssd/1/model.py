"""SSD orchestrator: requests in, decoding rounds in saguaro.request_loop.ServingLoop, responses out.
Decoding logic: saguaro/decoder.py; request rules: saguaro/request_loop.py."""
import sys
import threading
import time

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from saguaro.decoder import Decoder
from saguaro.errors import PeerUnavailable, SaguaroError
from saguaro.messages import ResetDraft
from saguaro.pair import validate_pair
from saguaro.private_dir import runtime_dir, server_secret
from saguaro.remote import RemoteDraft, RemoteEngine
from saguaro.request_loop import Channel, ServingLoop, parse_request
from saguaro.text import load_tokenizer
from saguaro.triton_models import (Metrics, Outbox, bls_call, carries_secret, error_code, error_message, error_response, inputs_of,
                                 model_params, resolve_repo_path, response, serve_limits, sibling_params, socket_call,
                                 spec_config)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonChannel(Channel):
    CANCEL_POLL_S = 0.05   # is_cancelled() is a round trip to the server: not every round

    def __init__(self, request, tokenizer, triton_request, outbox, stream_interval_s, relay_id=None, relay_cancels=None):
        super().__init__(request, tokenizer, stream_interval_s)
        self.triton_request, self.sender, self.outbox = triton_request, triton_request.get_response_sender(), outbox
        self.polled = time.monotonic()
        self.wanted = set(triton_request.requested_output_names())
        self.relay_id, self.relay_cancels = relay_id, relay_cancels   # cancels `ensemble` passed on

    def send(self, outputs, final):
        self.outbox.send(self.sender, lambda: response(pb_utils, outputs, self.wanted), FINAL if final else 0)

    def error(self, exc):
        if self.relay_id is None:
            self.outbox.send(self.sender, lambda: error_response(pb_utils, exc), FINAL)
        else:   # a BLS caller (`ensemble`) loses error responses that follow streamed ones (Triton 2.51): data
            error = np.array([error_code(exc).encode(), error_message(exc).encode()], dtype=np.object_)
            self.outbox.send(self.sender, lambda: response(pb_utils, {"relay_error": error}), FINAL)

    def cancelled(self):
        if self.relay_id is not None and self.relay_id in self.relay_cancels:
            self.relay_cancels.pop(self.relay_id, None)
            self.outbox.send(self.sender, None, FINAL)
            return True
        now = time.monotonic()
        if now - self.polled < self.CANCEL_POLL_S:
            return False
        self.polled = now
        if self.triton_request.is_cancelled():
            self.outbox.send(self.sender, None, FINAL)
            return True
        return False


class TritonPythonModel:
    def initialize(self, args):
        # The round loop runs on its own thread beside the stub's: hand the GIL over within 0.1 ms,
        # not Python's default 5 ms, or every BLS call can wait that long to be sent or read.
        sys.setswitchinterval(1e-4)
        # The engines run in their own processes; this one's tensor work is verification, a few
        # vocabulary rows a round. On one thread: a pool of two would spin on both cores after
        # each of its ops, into the target's forward that follows.
        torch.set_num_threads(1)
        p = model_params(args)
        target, draft = sibling_params(args, "target"), sibling_params(args, "draft")
        max_draft_len = min(target.integer("max_draft_len", 8), draft.integer("max_draft_len", 8))
        spec = spec_config(p).validate(max_draft_len, draft.integer("max_branches", 64))
        # Startup errors name the fix: a mismatched pair never gets to serve.
        validate_pair(resolve_repo_path(target.text("checkpoint"), args), resolve_repo_path(draft.text("checkpoint"), args),
                      num_draft_tokens=spec.k, max_draft_len=max_draft_len)
        self.tokenizer = load_tokenizer(resolve_repo_path(p.text("tokenizer_dir"), args))
        self.limits = serve_limits(p, draft)
        self.allow_faults = p.flag("allow_fault_injection")
        self.stream_interval_s = p.number("stream_interval_ms", 20) / 1e3
        self.metrics = Metrics(pb_utils)
        self.outbox = Outbox()
        self.shutdown_grace_s = p.number("shutdown_grace_s", 1)
        self.secret = server_secret(runtime_dir())
        self.relay_cancels: dict[int, float] = {}   # relay ids `ensemble` cancelled -> when; taken by their channels
        # How rounds reach the engine models: their authenticated Unix sockets (default; a lost
        # connection is re-made in the background) or BLS with the server's secret.
        if p.choice("transport", ("socket", "bls"), "socket") == "bls":
            self.target_call = bls_call(pb_utils, "target", decoupled=False, timeout_s=p.number("target_timeout_s", 60))
            self.draft_call = bls_call(pb_utils, "draft", decoupled=True, timeout_s=spec.draft_timeout_s)
        else:
            self.target_call = socket_call("target", p.number("target_timeout_s", 60))
            self.draft_call = socket_call("draft", spec.draft_timeout_s, hello=ResetDraft())

        draft_info = []

        def make_decoder():
            """On the loop thread, when no request is in flight: at the first request, and after
            the target was lost. Waits a little for the engines' sockets (they may be loading). A
            draft that is down (being restarted) only makes rounds plain target steps until it is
            back; the target must answer."""
            for call in (self.target_call, self.draft_call):
                getattr(call, "wait_connected", lambda _: True)(5.0)
            target = RemoteEngine(self.target_call)
            try:
                draft = RemoteDraft(self.draft_call)
                draft.reset()                  # what an earlier orchestrator left is stale
                draft_info[:] = [draft.info]
            except PeerUnavailable:
                if not draft_info:
                    raise
                draft = RemoteDraft(self.draft_call, info=draft_info[0])
            return Decoder(target, draft, spec)

        self.loop = ServingLoop(make_decoder, self.metrics.update, max_queue=p.integer("max_queued_requests", 64))

    def execute(self, requests):
        for r in requests:
            try:
                inputs = inputs_of(r)
                relay_id, cancel_id, drain = self._internal(inputs)
                if drain:                       # the server is about to stop
                    threading.Thread(target=self._drain, args=(r.get_response_sender(),), daemon=True).start()
                    continue
                if cancel_id is not None:       # `ensemble`'s client cancelled the request it relays
                    now = time.monotonic()      # (kept a minute: the request may have just finished)
                    for old in [i for i, t in self.relay_cancels.items() if now - t > 60]:
                        self.relay_cancels.pop(old, None)
                    self.relay_cancels[cancel_id] = now
                    r.get_response_sender().send(flags=FINAL)
                    continue
                req = parse_request(inputs, self.tokenizer, self.limits)
                if req.inject_draft_fault and not self.allow_faults:
                    raise SaguaroError("inject_draft_fault: a test switch, off on this server (allow_fault_injection)")
            except Exception as e:
                r.get_response_sender().send(error_response(pb_utils, e), flags=FINAL)
                continue
            self.loop.submit(req, TritonChannel(req, self.tokenizer, r, self.outbox, self.stream_interval_s,
                                                relay_id, self.relay_cancels))
        return None

    def _internal(self, inputs):
        """(relay_id, cancel_relay_id, drain): inputs only the server's own parts, which hold the
        secret, may send."""
        ids = [int(inputs[k].reshape(-1)[0]) if k in inputs else None for k in ("relay_id", "cancel_relay_id")]
        drain = bool(inputs["drain"].reshape(-1)[0]) if "drain" in inputs else False
        if (ids != [None, None] or drain) and not carries_secret(inputs.get("auth"), self.secret):
            raise SaguaroError("relay_id, cancel_relay_id, drain: only the server's own parts may send these")
        return ids[0], ids[1], drain

    def _drain(self, sender):
        """Stop admitting and end what is in flight while the server can still deliver responses
        (once tritonserver 2.51 has had SIGTERM, responses of decoupled requests are lost)."""
        self.loop.drain(grace_s=self.shutdown_grace_s)
        self.outbox.send(sender, lambda: pb_utils.InferenceResponse([]), FINAL)

    def finalize(self):
        self.loop.stop(grace_s=self.shutdown_grace_s)
        self.outbox.close()
        for call in (self.target_call, self.draft_call):
            getattr(call, "close", lambda: None)()
