"""Writes perf_analyzer `--input-data` JSON for the `ensemble` from a prompts file.

    python clients/perf/make_input_data.py --prompts prompts/dev.jsonl --max-tokens 128 \
        --decoding-mode ssd --out runs/input_ssd.json
    python clients/perf/make_input_data.py --nvidia --max-tokens 128 --out runs/input_nvidia.json
    clients/perf/perf_analyzer.sh -m ensemble -i grpc --async --streaming --input-data runs/input_ssd.json

Format (perf_analyzer docs, "Real Input Data"): {"data": [{input name: [values...]}, ...]}, one
entry per request, used round-robin. Values are for one batch row: the ensemble has NVIDIA's
max_batch_size > 0 with dims [1], so perf_analyzer (batch size 1) sends each as [1, 1].
`--nvidia` writes the tensors NVIDIA's end_to_end_grpc_client.py sends (beam_width, temperature,
exclude_input_in_output, num_return_sequences, return_perf_metrics) and none of ours.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from clients.common import DEFAULT_PROMPTS_FILE, GenerateRequest, cli, load_prompts  # noqa: E402

# What NVIDIA's inflight_batcher_llm/client/end_to_end_grpc_client.py sends beside the prompt,
# max_tokens and stream (NVIDIA/TensorRT-LLM triton_backend at 2a9abd9536aa62ad3e4b9314be9286b1b1be523b:
# beam_width 1 and temperature 1.0 by default), with the prompt left out of the output and the
# per-request perf metrics asked for, as a load test wants.
NVIDIA_FIELDS = {"beam_width": 1, "temperature": 1.0, "exclude_input_in_output": True, "num_return_sequences": 1,
                 "return_perf_metrics": True}


def build_input_data(prompts: list[str], request: GenerateRequest, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """One entry per prompt, each with `request`'s other fields (those set, as GenerateRequest.fields)
    and `extra` (fields the request does not set)."""
    return {"data": [{name: [value] for name, value in {**(extra or {}), **replace(request, prompt=prompt).fields()}.items()}
                     for prompt in prompts]}


def write_input_data(path: Path, prompts: list[str], request: GenerateRequest,
                     extra: dict[str, Any] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_input_data(prompts, request, extra), indent=1))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_FILE, help="jsonl with a `prompt` field")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--decoding-mode", default=None, choices=["ssd", "sd", "ar"],
                   help="ssd unless --nvidia (then the server's default, ssd)")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--num-draft-tokens", type=int, default=None, help="K (default: the server's)")
    p.add_argument("--nvidia", action="store_true", help="the tensors of NVIDIA's end_to_end_grpc_client.py")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    prompts = load_prompts(a.prompts)[: a.num_prompts]
    mode = a.decoding_mode if a.nvidia else a.decoding_mode or "ssd"
    request = GenerateRequest("", max_tokens=a.max_tokens, temperature=a.temperature,
                              num_draft_tokens=a.num_draft_tokens, decoding_mode=mode)
    write_input_data(a.out, prompts, request, NVIDIA_FIELDS if a.nvidia else None)
    print(f"wrote {len(prompts)} requests to {a.out}")


if __name__ == "__main__":
    sys.exit(cli(main))
