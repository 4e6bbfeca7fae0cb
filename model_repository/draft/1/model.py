"""Draft engine instance: a saguaro.remote.DraftServer, reached by `ssd` on this model's
authenticated Unix socket (default) or through BLS with the server's secret (logic:
saguaro/draft.py). A round's answers stream back: the speculations at once, then the next caches
once built, while `ssd` runs the target."""
import triton_python_backend_utils as pb_utils

from saguaro.draft import Drafter
from saguaro.engines import create_engine, pin_to_core
from saguaro.private_dir import runtime_dir, server_secret
from saguaro.remote import DraftServer
from saguaro.triton_models import (bls_message, cpu_core, engine_config, error_response, message_response, model_params,
                                 serve_socket, spec_config)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        pin_to_core(cpu_core(params))
        self.secret = server_secret(runtime_dir())
        cfg = engine_config(params, args)
        spec = spec_config(params).validate_drafting()     # (K and B are `ssd`'s, checked there)
        self.server = DraftServer(Drafter(create_engine(cfg, branches=True), spec))
        self.listener = serve_socket(args["model_name"], self.server.handle)

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                msg = bls_message(pb_utils, request, self.secret)
                for answer in self.server.handle(msg):
                    sender.send(message_response(pb_utils, answer))
                sender.send(flags=FINAL)
            except Exception as e:
                sender.send(error_response(pb_utils, e), flags=FINAL)
        return None

    def finalize(self):
        self.listener.close()
