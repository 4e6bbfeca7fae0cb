"""Target engine instance: a saguaro.remote.EngineServer, reached by `ssd` on this model's Unix
socket (default) or through BLS (logic: saguaro/engines)."""
import triton_python_backend_utils as pb_utils

from saguaro.engines import create_engine, pin_to_core
from saguaro.remote import EngineServer, decode, encode
from saguaro.triton_glue import cpu_core, engine_config, error_response, model_params, response, serve_socket


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        pin_to_core(cpu_core(params))
        self.server = EngineServer(create_engine(engine_config(params, args)))
        self.listener = serve_socket(args["model_name"], self.server.handle)

    def execute(self, requests):
        out = []
        for request in requests:
            try:
                msg = decode(pb_utils.get_input_tensor_by_name(request, "request").as_numpy())
                out.extend(response(pb_utils, {"response": encode(a)}) for a in self.server.handle(msg))
            except Exception as e:
                out.append(error_response(pb_utils, e))
        return out

    def finalize(self):
        self.listener.close()
