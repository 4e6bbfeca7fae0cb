"""Draft engine instance: saguaro.remote.DraftServer over BLS (logic: saguaro/draft.py).
Answers a round, then builds the next speculation caches while `ssd` runs the target."""
import triton_python_backend_utils as pb_utils

from saguaro.config import SpecConfig
from saguaro.draft import Drafter, DraftRound
from saguaro.draft_worker import pin_to_core
from saguaro.engines import create_engine
from saguaro.remote import DraftServer, decode, encode
from saguaro.triton_glue import cpu_core, engine_config, error_response, model_params, response

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        params = model_params(args)
        pin_to_core(cpu_core(params))
        optional = lambda key: float(params[key]) if params.get(key, "").strip() else None
        spec = SpecConfig(fanout=params.get("fanout", "geometric"), backup=params.get("backup", "auto"),
                          accept_rate=optional("accept_rate"), power=optional("power"))
        self.server = DraftServer(Drafter(create_engine(engine_config(params, args), branches=True), spec))

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            try:
                msg = decode(pb_utils.get_input_tensor_by_name(request, "request").as_numpy())
                sender.send(response(pb_utils, {"response": encode(self.server.handle(msg))}), flags=FINAL)
            except Exception as e:
                sender.send(error_response(pb_utils, e), flags=FINAL)
                continue
            if isinstance(msg, DraftRound):
                self.server.drafter.build()      # the caller is already verifying
        return None
