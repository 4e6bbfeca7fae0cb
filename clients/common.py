"""Shared pieces of the client examples: arguments, request tensors, readiness check, results.

The `ensemble` takes NVIDIA's TensorRT-LLM ensemble tensors, shaped [batch, 1] (its metadata says
so; check_ready reads the shapes): `text_input` (BYTES), `max_tokens` (INT32), `stream` (BOOL) and
optionally `temperature`, `top_k`, `top_p`, `seed`, `end_id`, `exclude_input_in_output`, ... plus
our `num_draft_tokens`, `decoding_mode` ("ssd", "sd", "ar"); it returns `text_output` (one piece
per streamed response) and, on the final response, the request's totals `generated_tokens`,
`rounds`, `accepted_tokens`, `drafted_tokens`, `cache_hits`. The examples print the completion
alone: unstreamed, they send exclude_input_in_output (NVIDIA's default puts the prompt first).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

DEFAULT_PROMPT = "def fibonacci(n):\n"
DEFAULT_PROMPTS_FILE = Path(__file__).resolve().parents[1] / "prompts" / "dev.jsonl"
START_HINT = "start it with `python -m saguaro.serve`"
TOTALS = ("generated_tokens", "rounds", "accepted_tokens", "drafted_tokens", "cache_hits")
# Triton datatype and numpy dtype of every input the ensemble accepts.
INPUT_TYPES: dict[str, tuple[str, Any]] = {
    "text_input": ("BYTES", np.object_),
    "max_tokens": ("INT32", np.int32),
    "stream": ("BOOL", np.bool_),
    "temperature": ("FP32", np.float32),
    "top_k": ("INT32", np.int32),
    "top_p": ("FP32", np.float32),
    "seed": ("UINT64", np.uint64),
    "end_id": ("INT32", np.int32),
    "exclude_input_in_output": ("BOOL", np.bool_),
    "num_draft_tokens": ("INT32", np.int32),
    "decoding_mode": ("BYTES", np.object_),
}


class ClientError(RuntimeError):
    """A failure the user can act on (server down, model not ready, request rejected)."""


@dataclass
class GenerateRequest:
    prompt: str
    max_tokens: int = 64
    stream: bool = True
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    end_id: int | None = None
    num_draft_tokens: int | None = None
    decoding_mode: str | None = None  # None: the server's default ("ssd")

    def fields(self) -> dict[str, Any]:
        """Input name -> value for every input that is set (the JSON body of HTTP generate).

        The server follows TensorRT-LLM: it samples only when top_k or top_p is set (temperature
        alone is greedy), so a temperature comes with top_p 1 (the whole distribution) unless
        top_k or top_p is given; an unstreamed request asks for the completion without the prompt."""
        top_p = 1.0 if self.temperature and self.top_k is None and self.top_p is None else self.top_p
        values = {"text_input": self.prompt, "max_tokens": self.max_tokens, "stream": self.stream,
                  "temperature": self.temperature, "top_k": self.top_k, "top_p": top_p, "seed": self.seed,
                  "end_id": self.end_id, "exclude_input_in_output": None if self.stream else True,
                  "num_draft_tokens": self.num_draft_tokens, "decoding_mode": self.decoding_mode}
        return {k: v for k, v in values.items() if v is not None}


@dataclass
class Generation:
    """One request's result. Times are seconds since the request was sent."""

    text: str = ""
    pieces: list[str] = field(default_factory=list)
    piece_times: list[float] = field(default_factory=list)
    totals: dict[str, int] = field(default_factory=dict)
    latency_s: float = 0.0

    @property
    def ttft_s(self) -> float | None:
        return self.piece_times[0] if self.piece_times else None

    @property
    def itl_s(self) -> float | None:
        """Mean inter-token latency after the first piece. A piece may hold several tokens (a
        speculative round emits k+1 at once), so divide by tokens, not by pieces."""
        tokens = self.totals.get("generated_tokens", len(self.pieces))
        if len(self.piece_times) < 2 or tokens < 2:
            return None
        return (self.piece_times[-1] - self.piece_times[0]) / (tokens - 1)


# ---- arguments -------------------------------------------------------------------------------

def add_common_args(p: argparse.ArgumentParser, default_url: str) -> None:
    p.add_argument("--url", default=default_url, help=f"Triton address host:port (default {default_url})")
    p.add_argument("--model", default="ensemble")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="prompt text")
    src.add_argument("--prompts", type=Path, help="jsonl file with a `prompt` field per line")
    p.add_argument("--num-prompts", type=int, default=None, help="use only the first N prompts of --prompts")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=None,
                   help="0 or unset: greedy; otherwise sampled (with top_p 1 unless --top-k/--top-p)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--num-draft-tokens", type=int, default=None, help="K, draft tokens per round")
    p.add_argument("--decoding-mode", choices=["ssd", "sd", "ar"], default=None,
                   help="ssd (server default), sd (plain speculative) or ar (target only)")


def load_prompts(path: Path) -> list[str]:
    if not path.is_file():
        raise ClientError(f"prompts file {path} not found (expected jsonl with a `prompt` field per line)")
    prompts = [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ClientError(f"{path}: no prompts (expected one JSON object with a `prompt` field per line)")
    return prompts


def prompts_from_args(a: argparse.Namespace) -> list[str]:
    if a.prompts is not None:
        return load_prompts(a.prompts)[: a.num_prompts]
    return [a.prompt if a.prompt is not None else DEFAULT_PROMPT]


def request_from_args(a: argparse.Namespace, prompt: str, stream: bool = True) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, max_tokens=a.max_tokens, stream=stream, temperature=a.temperature,
                           top_k=a.top_k, top_p=a.top_p, seed=a.seed, num_draft_tokens=a.num_draft_tokens,
                           decoding_mode=a.decoding_mode)


def cli(main: Callable[[], None]) -> int:
    """Runs an example's main(), turning ClientError into a one-line message and exit code 1."""
    try:
        main()
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


# ---- readiness -------------------------------------------------------------------------------

def shapes_from_metadata(inputs: list[dict[str, Any]]) -> dict[str, list[int]]:
    # A -1 dim (batch or variable length) becomes 1: every input carries one value per request.
    return {i["name"]: [1 if int(d) == -1 else int(d) for d in i["shape"]] for i in inputs}


def check_ready(url: str, model: str = "ensemble", protocol: str = "grpc") -> dict[str, list[int]]:
    """Fails with a clear message unless the server answers and `model` is ready.
    Returns each input's request shape, read from the model's metadata."""
    if protocol == "http":
        base = url if url.startswith("http") else f"http://{url}"
        try:
            urllib.request.urlopen(f"{base}/v2/health/live", timeout=5).close()
        except (urllib.error.URLError, OSError) as e:
            raise ClientError(f"cannot reach Triton at {url}: {START_HINT} ({e})") from None
        try:
            urllib.request.urlopen(f"{base}/v2/models/{model}/ready", timeout=5).close()
            with urllib.request.urlopen(f"{base}/v2/models/{model}", timeout=5) as r:
                return shapes_from_metadata(json.load(r)["inputs"])
        except (urllib.error.URLError, OSError):
            raise ClientError(f"model '{model}' is not ready at {url}: see the server log for its load error") from None

    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    client = grpcclient.InferenceServerClient(url)
    try:
        try:
            client.is_server_live(client_timeout=5)
        except InferenceServerException as e:
            raise ClientError(f"cannot reach Triton at {url}: {START_HINT} ({e.message()})") from None
        if not client.is_model_ready(model):
            raise ClientError(f"model '{model}' is not ready at {url}: see the server log for its load error")
        return shapes_from_metadata(client.get_model_metadata(model, as_json=True)["inputs"])
    finally:
        client.close()


def metrics_url_for(url: str, port: int = 8002) -> str:
    """The default metrics endpoint on the same host as a gRPC/HTTP address."""
    host = url.split("://")[-1].rsplit(":", 1)[0]
    return f"http://{host}:{port}/metrics"


# ---- tensors and results ---------------------------------------------------------------------

def build_inputs(req: GenerateRequest, shapes: dict[str, list[int]] | None = None) -> list[Any]:
    """The request as tritonclient gRPC InferInputs (also what tritonclient.grpc.aio takes).
    `shapes` comes from check_ready(); the only place tensor shapes are decided."""
    import tritonclient.grpc as grpcclient

    inputs = []
    for name, value in req.fields().items():
        datatype, dtype = INPUT_TYPES[name]
        shape = (shapes or {}).get(name, [1])
        data = np.array([value.encode() if isinstance(value, str) else value], dtype=dtype).reshape(shape)
        t = grpcclient.InferInput(name, shape, datatype)
        t.set_data_from_numpy(data)
        inputs.append(t)
    return inputs


def read_text(result: Any) -> str:
    out = result.as_numpy("text_output")
    if out is None:
        return ""
    return "".join(b.decode("utf-8") if isinstance(b, bytes) else str(b) for b in out.reshape(-1))


def read_totals(result: Any) -> dict[str, int]:
    totals = {}
    for name in TOTALS:
        out = result.as_numpy(name)
        if out is not None and out.size:
            totals[name] = int(out.reshape(-1)[0])
    return totals


def is_final(result: Any) -> bool:
    """True on a decoupled stream's last response (needs enable_empty_final_response)."""
    params = result.get_response().parameters
    return "triton_final_response" in params and params["triton_final_response"].bool_param


def format_totals(totals: dict[str, int]) -> str:
    parts = [f"{k}={v}" for k, v in totals.items()]
    rounds, acc, drafted = totals.get("rounds"), totals.get("accepted_tokens"), totals.get("drafted_tokens")
    if rounds and totals.get("generated_tokens") is not None:
        parts.append(f"tokens/round={totals['generated_tokens'] / rounds:.2f}")
    if drafted and acc is not None:
        parts.append(f"acceptance={acc / drafted:.2f}")
    if rounds and totals.get("cache_hits") is not None:
        parts.append(f"hits/round={totals['cache_hits'] / rounds:.2f}")
    return " ".join(parts)
