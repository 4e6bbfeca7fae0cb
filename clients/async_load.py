"""Runs N concurrent streaming requests with asyncio and reports latency, TTFT and inter-token latency.

    python clients/async_load.py --prompts prompts/dev.jsonl --concurrency 4 --requests 16 --max-tokens 64

Closed loop, like perf_analyzer's concurrency mode: N workers each send a request, wait for its
last response, then send the next, until --requests are done. Each request uses its own gRPC
stream (tritonclient.grpc.aio).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Any, AsyncIterator

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # lets `python clients/async_load.py` run anywhere

import numpy as np  # noqa: E402
import tritonclient.grpc.aio as aioclient  # noqa: E402

from clients.common import (  # noqa: E402
    ClientError, GenerateRequest, Generation, add_common_args, build_inputs, check_ready, cli, is_final,
    prompts_from_args, read_text, read_totals, request_from_args,
)


async def stream_generate(client: aioclient.InferenceServerClient, req: GenerateRequest, model: str = "ensemble",
                          shapes: dict[str, list[int]] | None = None) -> Generation:
    """One request on its own bidirectional stream, collected until the final response."""
    done = asyncio.Event()

    async def requests() -> AsyncIterator[dict[str, Any]]:
        yield {"model_name": model, "inputs": build_inputs(req, shapes),
               "parameters": {"triton_enable_empty_final_response": True}}
        await done.wait()  # closing our side early could end the stream before the last response

    gen = Generation()
    start = time.perf_counter()
    async for result, error in client.stream_infer(requests()):
        if error is not None:
            done.set()
            raise ClientError(f"request failed: {error}")
        piece = read_text(result)
        if piece:
            gen.pieces.append(piece)
            gen.piece_times.append(time.perf_counter() - start)
        gen.totals.update(read_totals(result))
        if is_final(result):
            done.set()
    gen.latency_s = time.perf_counter() - start
    gen.text = "".join(gen.pieces)
    return gen


async def run_load(url: str, reqs: list[GenerateRequest], concurrency: int, model: str = "ensemble",
                   shapes: dict[str, list[int]] | None = None, verbose: bool = True) -> tuple[list[Generation], float]:
    """Runs `reqs` with `concurrency` workers; returns the generations (in request order) and wall time."""
    results: list[Generation | None] = [None] * len(reqs)
    next_index = iter(range(len(reqs)))
    client = aioclient.InferenceServerClient(url)

    async def worker() -> None:
        for i in next_index:  # shared iterator: each index is taken by exactly one worker
            gen = results[i] = await stream_generate(client, reqs[i], model, shapes)
            if verbose:
                print(f"request {i:3d}: tokens={gen.totals.get('generated_tokens', '?'):>4} "
                      f"latency={gen.latency_s * 1000:7.0f} ms  ttft={_ms(gen.ttft_s)}  itl={_ms(gen.itl_s)}",
                      flush=True)

    start = time.perf_counter()
    try:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    finally:
        await client.close()
    return [g for g in results if g is not None], time.perf_counter() - start


def _ms(seconds: float | None) -> str:
    return f"{seconds * 1000:6.1f} ms" if seconds is not None else "   n/a"


def summarize(gens: list[Generation], wall_s: float) -> dict[str, float]:
    """p50/p99 of latency, TTFT and ITL (ms), and throughput over the whole run."""
    out: dict[str, float] = {"requests": len(gens), "wall_s": wall_s, "requests_per_s": len(gens) / wall_s}
    tokens = sum(g.totals.get("generated_tokens", 0) for g in gens)
    if tokens:
        out["tokens_per_s"] = tokens / wall_s
    for name, values in (("latency", [g.latency_s for g in gens]), ("ttft", [g.ttft_s for g in gens]),
                         ("itl", [g.itl_s for g in gens])):
        vals = [v * 1000 for v in values if v is not None]
        if vals:
            out[f"{name}_p50_ms"] = float(np.percentile(vals, 50))
            out[f"{name}_p99_ms"] = float(np.percentile(vals, 99))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p, default_url="localhost:8001")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--requests", type=int, default=None, help="total requests (default: 2 x concurrency)")
    a = p.parse_args()
    shapes = check_ready(a.url, a.model, "grpc")
    prompts = prompts_from_args(a)
    n = a.requests or 2 * a.concurrency
    reqs = [request_from_args(a, prompts[i % len(prompts)]) for i in range(n)]
    gens, wall_s = asyncio.run(run_load(a.url, reqs, a.concurrency, a.model, shapes))
    s = summarize(gens, wall_s)
    print(f"\n{len(gens)} requests, concurrency {a.concurrency}, {wall_s:.2f} s: "
          f"{s['requests_per_s']:.2f} req/s" + (f", {s['tokens_per_s']:.1f} tokens/s" if "tokens_per_s" in s else ""))
    for name in ("latency", "ttft", "itl"):
        if f"{name}_p50_ms" in s:
            print(f"  {name:8s} p50 {s[f'{name}_p50_ms']:8.1f} ms   p99 {s[f'{name}_p99_ms']:8.1f} ms")


if __name__ == "__main__":
    sys.exit(cli(main))
