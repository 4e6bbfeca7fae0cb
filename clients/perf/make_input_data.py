"""Writes perf_analyzer `--input-data` JSON for the `ensemble` from a prompts file.

    python clients/perf/make_input_data.py --prompts prompts/dev.jsonl --max-tokens 128 \
        --decoding-mode ssd --out runs/input_ssd.json
    python clients/perf/make_input_data.py --concurrency 4 --out runs/input_ssd_c4.json
    python clients/perf/make_input_data.py --nvidia --max-tokens 128 --out runs/input_nvidia.json
    clients/perf/perf_analyzer.sh -m ensemble -i grpc --async --streaming --input-data runs/input_ssd.json

Format (perf_analyzer docs, "Real Input Data"): {"data": [{input name: [values...]}, ...]}, one
entry per request. perf_analyzer does not deal them out round-robin over all its requests: at
`--concurrency-range C` with C worker threads (`--max-threads C`; its default is 16), thread i
sends entries i, i + C, i + 2C, ... (triton-inference-server/client, src/c++/perf_analyzer/
infer_context.cc, InferContext::UpdateJsonData: `step_id = data_step_id_ % GetTotalStepsNonSequence()`,
then `data_step_id_ += GetNumActiveThreads()`, starting at its id), and with `--request-count`
each thread sends its share of the count (concurrency_manager.cc, ReconfigThreads). With one entry
per prompt, at C = 8 and 8 prompts every thread repeats one prompt, and a run lasts as long as
its slowest prompt's requests, the other threads idle by then. `--concurrency C` lays the
prompts out so that every thread decodes every prompt in turn, each starting at its own
(`thread_order`); with a request count of prompts x C each decodes each once.

Values are for one batch row: the ensemble has NVIDIA's max_batch_size > 0 with dims [1], so
perf_analyzer (batch size 1) sends each as [1, 1].
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
from clients.common import DEFAULT_PROMPTS_FILE, ClientError, GenerateRequest, cli, load_prompts  # noqa: E402

# What NVIDIA's inflight_batcher_llm/client/end_to_end_grpc_client.py sends beside the prompt,
# max_tokens and stream (NVIDIA/TensorRT-LLM triton_backend at 2a9abd9536aa62ad3e4b9314be9286b1b1be523b:
# beam_width 1 and temperature 1.0 by default), with the prompt left out of the output and the
# per-request perf metrics asked for, as a load test wants.
NVIDIA_FIELDS = {"beam_width": 1, "temperature": 1.0, "exclude_input_in_output": True, "num_return_sequences": 1,
                 "return_perf_metrics": True}


def thread_order(n_prompts: int, concurrency: int) -> list[int]:
    """Prompt index per entry such that perf_analyzer's thread i of C, which sends entries i, i + C,
    i + 2C, ... (module docstring), decodes prompts i, i + 1, i + 2, ... (mod n): every prompt in
    turn, the C threads on different prompts where there are C of them. One entry per prompt at C = 1."""
    c = max(1, concurrency)
    return [(j // c + j % c) % n_prompts for j in range(n_prompts * c)]


def build_input_data(prompts: list[str], request: GenerateRequest, extra: dict[str, Any] | None = None,
                     concurrency: int = 1) -> dict[str, Any]:
    """Entries in `thread_order` for perf_analyzer at `concurrency`, each with `request`'s other
    fields (those set, as GenerateRequest.fields) and `extra` (fields the request does not set)."""
    return {"data": [{name: [value] for name, value in
                      {**(extra or {}), **replace(request, prompt=prompts[i]).fields()}.items()}
                     for i in thread_order(len(prompts), concurrency)]}


def write_input_data(path: Path, prompts: list[str], request: GenerateRequest,
                     extra: dict[str, Any] | None = None, concurrency: int = 1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_input_data(prompts, request, extra, concurrency), indent=1))
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
    p.add_argument("--concurrency", type=int, default=1,
                   help="perf_analyzer's --concurrency-range (with --max-threads the same): every thread decodes every prompt in turn")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    prompts = load_prompts(a.prompts)[: a.num_prompts]
    mode = a.decoding_mode if a.nvidia else a.decoding_mode or "ssd"
    request = GenerateRequest("", max_tokens=a.max_tokens, temperature=a.temperature,
                              num_draft_tokens=a.num_draft_tokens, decoding_mode=mode)
    if a.concurrency < 1:
        raise ClientError(f"--concurrency {a.concurrency}: give perf_analyzer's concurrency, 1 or more")
    data = write_input_data(a.out, prompts, request, NVIDIA_FIELDS if a.nvidia else None, a.concurrency)
    print(f"wrote {len(prompts) * a.concurrency} entries ({len(prompts)} prompts) to {data}; "
          f"--request-count {len(prompts) * a.concurrency} has every thread decode every prompt once")


if __name__ == "__main__":
    sys.exit(cli(main))
