"""Tokenizes prompts: text_input BYTES [1] (UTF-8) -> input_ids INT32 [-1], input_length INT32 [1].

Thin wrapper over saguaro.text. An empty or non-UTF-8 prompt gets an INVALID_ARG error response
naming `text_input`; other requests in the same batch are unaffected.
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from saguaro.errors import SaguaroError
from saguaro.text import BYTES_PER_TOKEN, decode_text_input, encode_prompt, load_tokenizer
from saguaro.triton_models import error_response, model_params, resolve_repo_path, sibling_params


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(resolve_repo_path(model_params(args).text("tokenizer_dir"), args))
        # prompts longer than `ssd` could take are refused before they are tokenized
        self.max_bytes = sibling_params(args, "ssd").integer("max_input_len") * BYTES_PER_TOKEN

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                text = pb_utils.get_input_tensor_by_name(request, "text_input")
                if text is None or text.as_numpy().size != 1:
                    raise SaguaroError("text_input: missing; send the prompt as one text_input string (BYTES)")
                raw = text.as_numpy().reshape(-1)[0]
                ids = np.array(encode_prompt(self.tokenizer, decode_text_input(raw, max_bytes=self.max_bytes)),
                               dtype=np.int32)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("input_ids", ids),
                    pb_utils.Tensor("input_length", np.array([ids.size], dtype=np.int32))]))
            except Exception as e:
                responses.append(error_response(pb_utils, e))
        return responses
