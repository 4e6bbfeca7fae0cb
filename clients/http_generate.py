"""Generates over Triton's HTTP generate extension with nothing but the standard library.

    python clients/http_generate.py --prompt "def quicksort(xs):" --max-tokens 64           # one JSON reply
    python clients/http_generate.py --prompt "def quicksort(xs):" --max-tokens 64 --stream  # SSE pieces

POST /v2/models/<model>/generate        {"text_input": ..., "max_tokens": ..., ...} -> one JSON object
POST /v2/models/<model>/generate_stream same body, answered as server-sent events "data: {...}"
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python clients/http_generate.py` run anywhere

from clients.common import (  # noqa: E402
    TOTALS, ClientError, GenerateRequest, Generation, add_common_args, check_ready, cli, format_totals,
    prompts_from_args, request_from_args,
)


def _post(url: str, body: dict[str, Any], timeout_s: float) -> Any:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        return urllib.request.urlopen(req, timeout=timeout_s)
    except urllib.error.HTTPError as e:
        # Triton puts the reason in a JSON body {"error": "..."}.
        raise ClientError(f"request failed ({e.code}): {e.read().decode(errors='replace')}") from None
    except (urllib.error.URLError, OSError) as e:
        raise ClientError(f"cannot reach {url}: {e}") from None


def _events(resp: Any) -> Iterator[dict[str, Any]]:
    """Parses server-sent events: one `data: {json}` line per response, blank lines between."""
    for raw in resp:
        line = raw.decode("utf-8").strip()
        if line.startswith("data:"):
            event = json.loads(line[len("data:"):])
            if "error" in event:
                raise ClientError(f"request failed: {event['error']}")
            yield event


def generate(url: str, req: GenerateRequest, model: str = "ensemble", timeout_s: float = 600.0) -> Generation:
    """Non-streaming: the whole text and the totals in one reply."""
    base = url if url.startswith("http") else f"http://{url}"
    start = time.perf_counter()
    with _post(f"{base}/v2/models/{model}/generate", replace(req, stream=False).fields(), timeout_s) as resp:
        reply = json.load(resp)
    text = reply.get("text_output", "")
    return Generation(text=text, pieces=[text], totals={k: int(reply[k]) for k in TOTALS if k in reply},
                      latency_s=time.perf_counter() - start)


def generate_stream(url: str, req: GenerateRequest, model: str = "ensemble",
                    on_piece: Callable[[str], None] | None = None, timeout_s: float = 600.0) -> Generation:
    """Streaming (SSE): one event per piece; the totals arrive on the last event."""
    base = url if url.startswith("http") else f"http://{url}"
    gen = Generation()
    start = time.perf_counter()
    with _post(f"{base}/v2/models/{model}/generate_stream", replace(req, stream=True).fields(), timeout_s) as resp:
        for event in _events(resp):
            piece = event.get("text_output", "")
            if piece:
                gen.pieces.append(piece)
                gen.piece_times.append(time.perf_counter() - start)
                if on_piece:
                    on_piece(piece)
            gen.totals.update({k: int(event[k]) for k in TOTALS if k in event})
    gen.latency_s = time.perf_counter() - start
    gen.text = "".join(gen.pieces)
    return gen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_url="localhost:8000")
    p.add_argument("--stream", action="store_true", help="use generate_stream (SSE) and print pieces as they arrive")
    a = p.parse_args()
    check_ready(a.url, a.model, "http")
    for prompt in prompts_from_args(a):
        req = request_from_args(a, prompt, stream=a.stream)
        if a.stream:
            gen = generate_stream(a.url, req, a.model, on_piece=lambda piece: print(piece, end="", flush=True))
        else:
            gen = generate(a.url, req, a.model)
            print(gen.text, end="")
        print(f"\n--- {format_totals(gen.totals)} latency={gen.latency_s:.2f}s", flush=True)


if __name__ == "__main__":
    sys.exit(cli(main))
