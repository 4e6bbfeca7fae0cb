"""Tokenizes prompts: text_input BYTES [1] (UTF-8) -> input_ids INT32 [-1], input_length INT32 [1].

Thin wrapper over saguaro.text. An empty or non-UTF-8 prompt gets an INVALID_ARG error response
naming `text_input`; other requests in the same batch are unaffected.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from saguaro.text import decode_text_input, encode_prompt, load_tokenizer
from saguaro.triton_glue import error_response, model_params, resolve_repo_path


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(resolve_repo_path(model_params(args)["tokenizer_dir"], args))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                raw = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy().reshape(-1)[0]
                ids = np.array(encode_prompt(self.tokenizer, decode_text_input(raw)), dtype=np.int32)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("input_ids", ids),
                    pb_utils.Tensor("input_length", np.array([ids.size], dtype=np.int32))]))
            except Exception as e:
                responses.append(error_response(pb_utils, e))
        return responses
