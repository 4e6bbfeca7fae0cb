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
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from clients.common import DEFAULT_PROMPTS_FILE, cli, load_prompts  # noqa: E402


def build_input_data(prompts: list[str], max_tokens: int, decoding_mode: str, temperature: float | None = None,
                     stream: bool = True, num_draft_tokens: int | None = None) -> dict[str, Any]:
    entries = []
    for prompt in prompts:
        entry: dict[str, Any] = {"text_input": [prompt], "max_tokens": [max_tokens], "stream": [stream],
                                 "decoding_mode": [decoding_mode]}
        if temperature is not None:
            entry["temperature"] = [temperature]
        if num_draft_tokens is not None:
            entry["num_draft_tokens"] = [num_draft_tokens]
        entries.append(entry)
    return {"data": entries}


def write_input_data(path: Path, prompts: list[str], max_tokens: int, decoding_mode: str,
                     temperature: float | None = None, num_draft_tokens: int | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = build_input_data(prompts, max_tokens, decoding_mode, temperature, num_draft_tokens=num_draft_tokens)
    path.write_text(json.dumps(data, indent=1))
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
    write_input_data(a.out, prompts, a.max_tokens, a.decoding_mode, a.temperature, a.num_draft_tokens)
    print(f"wrote {len(prompts)} requests to {a.out}")


if __name__ == "__main__":
    sys.exit(cli(main))
