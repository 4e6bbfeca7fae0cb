"""Streams a generation over gRPC and prints tokens as they arrive, then the speculative totals.

    python clients/grpc_stream.py --prompt "def quicksort(xs):" --max-tokens 64
    python clients/grpc_stream.py --prompts prompts/dev.jsonl --num-prompts 2 --decoding-mode sd
"""

from __future__ import annotations

import argparse
import queue
import sys
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python clients/grpc_stream.py` run anywhere

import tritonclient.grpc as grpcclient  # noqa: E402

from clients.common import (  # noqa: E402
    ClientError, GenerateRequest, Generation, add_common_args, build_inputs, check_ready, cli, format_totals,
    is_final, prompts_from_args, read_text, read_totals, request_from_args,
)


def stream_generate(client: grpcclient.InferenceServerClient, req: GenerateRequest, model: str = "ensemble",
                    shapes: dict[str, list[int]] | None = None, on_piece: Callable[[str], None] | None = None,
                    timeout_s: float = 600.0) -> Generation:
    """Sends one request on a gRPC stream and collects its responses until the final one."""
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    gen = Generation()
    start = time.perf_counter()
    try:
        # The empty final response marks the end of a decoupled stream even when the last
        # response carrying data could not know it was the last.
        client.async_stream_infer(model, build_inputs(req, shapes), enable_empty_final_response=True)
        while True:
            try:
                result, error = responses.get(timeout=timeout_s)
            except queue.Empty:
                raise ClientError(f"no response within {timeout_s:.0f} s") from None
            if error is not None:
                raise ClientError(f"request failed: {error}")
            piece = read_text(result)
            if piece:
                gen.pieces.append(piece)
                gen.piece_times.append(time.perf_counter() - start)
                if on_piece:
                    on_piece(piece)
            gen.totals.update(read_totals(result))
            if is_final(result):
                break
    finally:
        client.stop_stream()
    gen.latency_s = time.perf_counter() - start
    gen.text = "".join(gen.pieces)
    return gen


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_url="localhost:8001")
    a = p.parse_args()
    shapes = check_ready(a.url, a.model, "grpc")
    client = grpcclient.InferenceServerClient(a.url)
    try:
        for prompt in prompts_from_args(a):
            gen = stream_generate(client, request_from_args(a, prompt), a.model, shapes,
                                  on_piece=lambda piece: print(piece, end="", flush=True))
            ttft = f"{gen.ttft_s * 1000:.0f} ms" if gen.ttft_s is not None else "n/a"
            print(f"\n--- {format_totals(gen.totals)} latency={gen.latency_s:.2f}s ttft={ttft}", flush=True)
    finally:
        client.close()


if __name__ == "__main__":
    sys.exit(cli(main))
