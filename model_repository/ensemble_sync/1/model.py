"""Unary front door: one request in, the `ssd` model's single (non-streamed) response out."""
import triton_python_backend_utils as pb_utils

from saguaro.triton_glue import error_response

OUTPUTS = ["text_output", "generated_tokens", "rounds", "accepted_tokens", "drafted_tokens", "cache_hits", "ar_rounds", "sd_rounds", "ssd_rounds"]


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for request in requests:
            try:
                call = pb_utils.InferenceRequest(model_name="ssd", inputs=request.inputs(), requested_output_names=OUTPUTS)
                reply = next(r for r in call.exec(decoupled=True) if r.has_error() or r.output_tensors())
                out.append(pb_utils.InferenceResponse(error=reply.error()) if reply.has_error()
                           else pb_utils.InferenceResponse(reply.output_tensors()))
            except Exception as e:
                out.append(error_response(pb_utils, e))
        return out
