"""SSD orchestrator: requests in, decoding rounds in saguaro.serving.ServingLoop, responses out.
Decoding logic: saguaro/decoder.py; request rules: saguaro/serving.py."""
import sys
import time

import triton_python_backend_utils as pb_utils

from saguaro.config import SpecConfig
from saguaro.decoder import Decoder
from saguaro.errors import SaguaroError
from saguaro.pair import validate_pair
from saguaro.remote import RemoteDraft, RemoteEngine
from saguaro.serving import Channel, ServeLimits, ServingLoop, parse_request
from saguaro.text import load_tokenizer
from saguaro.triton_glue import (Metrics, Outbox, bls_call, error_response, inputs_of, model_params, resolve_repo_path,
                                 response, sibling_params, socket_call)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonChannel(Channel):
    CANCEL_POLL_S = 0.05   # is_cancelled() is a round trip to the server: not every round

    def __init__(self, request, tokenizer, triton_request, outbox, stream_interval_s):
        super().__init__(request, tokenizer, stream_interval_s)
        self.triton_request, self.sender, self.outbox = triton_request, triton_request.get_response_sender(), outbox
        self.polled = time.monotonic()

    def send(self, outputs, final):
        self.outbox.send(self.sender, lambda: response(pb_utils, outputs), FINAL if final else 0)

    def error(self, exc):
        self.outbox.send(self.sender, lambda: error_response(pb_utils, exc), FINAL)

    def cancelled(self):
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
        p = model_params(args)
        target, draft = sibling_params(args, "target"), sibling_params(args, "draft")
        max_draft_len = min(int(target.get("max_draft_len", 8)), int(draft.get("max_draft_len", 8)))
        # Startup errors name the fix: a mismatched pair never gets to serve.
        validate_pair(resolve_repo_path(target["checkpoint"], args), resolve_repo_path(draft["checkpoint"], args),
                      num_draft_tokens=int(p["num_draft_tokens"]), max_draft_len=max_draft_len)
        self.tokenizer = load_tokenizer(resolve_repo_path(p["tokenizer_dir"], args))
        self.limits = ServeLimits(max_input_len=int(p["max_input_len"]), max_tokens=int(p["max_tokens"]),
                                  max_budget=int(draft.get("max_branches", 64)))
        self.allow_faults = p.get("allow_fault_injection", "false").lower() == "true"
        self.stream_interval_s = float(p.get("stream_interval_ms", "0")) / 1e3
        spec = SpecConfig(k=int(p["num_draft_tokens"]), budget=int(p["fanout_budget"]),
                          saguaro_c=float(p["saguaro_c"]), draft_timeout_s=float(p["draft_timeout_s"]))
        self.metrics = Metrics(pb_utils)
        self.outbox = Outbox()

        def make_decoder():   # on the loop thread, at the first request: the engine models are up by then
            if p.get("transport", "socket") == "bls":
                target_call = bls_call(pb_utils, "target", decoupled=False)
                draft_call = bls_call(pb_utils, "draft", decoupled=True, timeout_s=spec.draft_timeout_s)
            else:
                target_call, draft_call = socket_call("target", 600.0), socket_call("draft", spec.draft_timeout_s)
            return Decoder(RemoteEngine(target_call), RemoteDraft(draft_call), spec)

        self.loop = ServingLoop(make_decoder, self.metrics.update)

    def execute(self, requests):
        for r in requests:
            try:
                req = parse_request(inputs_of(r), self.tokenizer, self.limits)
                if req.inject_draft_fault and not self.allow_faults:
                    raise SaguaroError("inject_draft_fault: a test switch, off on this server (allow_fault_injection)")
            except Exception as e:
                r.get_response_sender().send(error_response(pb_utils, e), flags=FINAL)
                continue
            self.loop.submit(req, TritonChannel(req, self.tokenizer, r, self.outbox, self.stream_interval_s))
        return None

    def finalize(self):
        self.loop.stop()
