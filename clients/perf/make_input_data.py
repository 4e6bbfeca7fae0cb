"""Writes perf_analyzer `--input-data` JSON for the `ensemble` from a prompts file.

    python clients/perf/make_input_data.py --prompts prompts/dev.jsonl --max-tokens 128 \
        --decoding-mode ssd --out runs/input_ssd.json
    clients/perf/perf_analyzer.sh -m ensemble -i grpc --async --streaming --input-data runs/input_ssd.json

Format (perf_analyzer docs, "Real Input Data"): {"data": [{input name: [values...]}, ...]}, one
entry per request, used round-robin. Values are for one batch-1 request in row-major order; for
the ensemble's [1]-shaped inputs that is a one-element list.
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


def build_input_data(prompts: list[str], request: GenerateRequest) -> dict[str, Any]:
    """One entry per prompt, each with `request`'s other fields (those set, as GenerateRequest.fields)."""
    return {"data": [{name: [value] for name, value in replace(request, prompt=prompt).fields().items()}
                     for prompt in prompts]}


def write_input_data(path: Path, prompts: list[str], request: GenerateRequest) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(build_input_data(prompts, request), indent=1))
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_FILE, help="jsonl with a `prompt` field")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--decoding-mode", default="ssd", choices=["ssd", "sd", "ar"])
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--num-draft-tokens", type=int, default=None, help="K (default: the server's)")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    prompts = load_prompts(a.prompts)[: a.num_prompts]
    request = GenerateRequest("", max_tokens=a.max_tokens, temperature=a.temperature,
                              num_draft_tokens=a.num_draft_tokens, decoding_mode=a.decoding_mode)
    write_input_data(a.out, prompts, request)
    print(f"wrote {len(prompts)} requests to {a.out}")


if __name__ == "__main__":
    sys.exit(cli(main))
