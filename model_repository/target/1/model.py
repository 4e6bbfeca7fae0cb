"""Target engine instance: a saguaro.remote.EngineServer, reached by `ssd` on this model's
authenticated Unix socket (default) or through BLS with the server's secret (logic: saguaro/engines)."""
import triton_python_backend_utils as pb_utils

from saguaro.engines import create_engine, pin_to_core
from saguaro.private_dir import runtime_dir, server_secret
from saguaro.remote import EngineServer
from saguaro.triton_models import (bls_message, cpu_core, engine_config, error_response, message_response, model_params,
                                 serve_socket, sibling_params)


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        pin_to_core(cpu_core(params))
        self.secret = server_secret(runtime_dir())
        draft_core = cpu_core(sibling_params(args, "draft"))     # its forwards on `threads` keep off it
        self.server = EngineServer(create_engine(engine_config(params, args, draft_core)))
        self.listener = serve_socket(args["model_name"], self.server.handle)

    def execute(self, requests):
        out = []
        for request in requests:
            try:
                msg = bls_message(pb_utils, request, self.secret)
                out.extend(message_response(pb_utils, a) for a in self.server.handle(msg))
            except Exception as e:
                out.append(error_response(pb_utils, e))
        return out

    def finalize(self):
        self.listener.close()
