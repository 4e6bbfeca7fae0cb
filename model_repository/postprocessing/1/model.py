"""Detokenizes streamed output: output_ids INT32 [-1], prefix_len INT32 [1] -> text_output BYTES [1].

Contract with the upstream model (`ssd`), which Triton ensembles require because this model keeps no
per-request state between the streamed responses of one request:

- `output_ids` is a window of the request's generated ids: first `prefix_len` ids whose text the client
  has already received (context), then the ids whose text is sent now.
- `text_output` is `decode(output_ids)` minus `decode(output_ids[:prefix_len])`, as UTF-8
  (saguaro.text.window_text; special tokens skipped, as tokenizer.decode does by default).
- The upstream builds the windows with one `saguaro.text.StreamWindow` per request:
      sent = window.push(new_ids)            # after every round
      if sent: send output_ids=sent[0], prefix_len=[sent[1]]
      sent = window.finish()                 # when the request ends
  StreamWindow sends ids only once their text is complete (never half a multi-byte character) and
  sends held-back ids again, with later ones, in the next window; so the text_output pieces of a
  request concatenate to exactly tokenizer.decode(all generated ids).
- Without `prefix_len` (or prefix_len 0) the whole window is decoded: a non-streaming response sends
  all generated ids once. An empty `output_ids` gives "" (a response carrying only totals).
"""
import numpy as np
import triton_python_backend_utils as pb_utils

from saguaro.text import load_tokenizer, window_text
from saguaro.triton_models import error_response, model_params, resolve_repo_path


class TritonPythonModel:
    def initialize(self, args):
        self.tokenizer = load_tokenizer(resolve_repo_path(model_params(args).text("tokenizer_dir"), args))

    def execute(self, requests):
        responses = []
        for request in requests:
            try:
                ids = pb_utils.get_input_tensor_by_name(request, "output_ids").as_numpy().reshape(-1).tolist()
                prefix = pb_utils.get_input_tensor_by_name(request, "prefix_len")
                prefix_len = 0 if prefix is None else int(prefix.as_numpy().reshape(-1)[0])
                text = window_text(self.tokenizer, ids, prefix_len)
                responses.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_))]))
            except Exception as e:
                responses.append(error_response(pb_utils, e))
        return responses
