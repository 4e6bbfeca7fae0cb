"""OpenAI-compatible endpoints for the `ensemble`, started by `python -m saguaro.serve --openai-port P`.

GET /v1/models, GET /v1/models/{id}, POST /v1/completions and POST /v1/chat/completions, streamed
(server-sent events: `data: {...}` chunks, then `data: [DONE]`) or not, with `usage`. Errors come in
OpenAI's format, {"error": {"message", "type", "param", "code"}}: 400 for bad input (the message
names the field), 404 for an unknown model, 503 when the server is busy or restarting (retry).

Why not Triton's own OpenAI frontend (triton-inference-server/server, python/openai): it runs the
server in-process through the `tritonserver` Python bindings (openai_frontend/main.py creates
tritonserver.Server(...).start(); engine/triton_engine.py calls model.async_infer). Those bindings
come only as wheels inside NVIDIA's containers (/opt/tritonserver/python); the nvidia-pytriton
wheel we run ships the tritonserver binary and libtritonserver but no bindings, and PyPI's
`tritonserver` is a 0.0.1.dev0 placeholder whose install fails on purpose, pointing at those
containers. It would also start a server of its own rather than talk to the one saguaro.serve
supervises.

How this front reaches the ensemble: Triton's HTTP generate_stream on loopback, not gRPC, because
- Triton turns the JSON fields into the ensemble's typed input tensors from the model's config (data
  types, and the batch dimension when max_batch_size > 0), so this front does not depend on the
  ensemble's shapes;
- a request refused before its first response comes back with an HTTP status from its error code
  (INVALID_ARG 400, UNAVAILABLE 503), where a gRPC stream carries only the message;
- every choice is streamed from the ensemble, a non-streamed completion too (its pieces joined):
  Triton's HTTP frontend notices a closed connection only when it writes to it (server issue
  #7077), so when our client goes away its upstream request is cancelled at the next piece (at most
  stream_interval_ms later) and frees its KV slots, where a unary /generate would run to its end.

Request semantics, as Triton's frontend for TensorRT-LLM has them (engine/utils/triton.py,
_create_trtllm_inference_request): a field the client leaves out is not sent, so the ensemble's
default applies (greedy when temperature is unset), except max_tokens (DEFAULT_MAX_TOKENS when
unset, as there) and top_p: a temperature above 0 without top_p or top_k comes with top_p 1.0,
OpenAI's default, since NVIDIA's ensemble samples only when one of them is set. `stop` is cut on the text here, so the text ends before the stop string
(OpenAI's meaning); it also goes to the ensemble as stop_words, which ends the request early. `n`
runs n independent requests; with a `seed`, a prompt's choice j samples with seed + j (without one, from a
random base). vLLM's `ignore_eos` is min_tokens = max_tokens. Extensions in the request:
num_draft_tokens, decoding_mode, fanout_budget, top_k, repetition_penalty, min_tokens; in the
response, `speculation` (the ensemble's totals: rounds, accepted and drafted tokens, cache hits,
rounds by type) in each choice (streamed: in its last chunk) and, summed, beside `usage`. A field
this front cannot honour (logprobs, echo, tools, ...) gets a 400 naming it; a field the running
ensemble has no input for, too.

Chat prompts: the model's chat template (tokenizer_config.json's chat_template, or
chat_template.jinja beside it), rendered as transformers renders it; a model without one (the demo
pair) gets PLAIN_CHAT_TEMPLATE: "Role: content" blocks separated by a blank line, then "Assistant:".
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import ClientError, web
from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from saguaro.config import FLOAT32_MAX
from saguaro.errors import SaguaroError
from saguaro.http_front import BackgroundApp, ModelRestarted, check_json, unless_died
from saguaro.supervisor import StubDeaths, restarted_message
from saguaro.text import load_tokenizer

MODEL = "ensemble"
DEFAULT_MAX_TOKENS = 16          # Triton's OpenAI frontend's --default-max-tokens (and OpenAI's for completions)
MAX_N = 16                       # choices per request (each is a request to the ensemble)
MAX_CHOICES = 64                 # prompts x n per request: what one batched ensemble request may hold (8 x 8)
MAX_STOPS = 4                    # OpenAI's limit
ROLES = ("system", "developer", "user", "assistant", "tool")
SPECULATION = ("rounds", "accepted_tokens", "drafted_tokens", "cache_hits", "ar_rounds", "sd_rounds", "ssd_rounds")
PLAIN_CHAT_TEMPLATE = ("{% for m in messages %}{{ m.role | capitalize }}: {{ m.content }}\n\n{% endfor %}"
                       "{% if add_generation_prompt %}Assistant:{% endif %}")
SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache"}

# OpenAI field -> (check, the ensemble inputs that take it: the first one the ensemble has)
NUMBER, INTEGER, STRING = (int, float), (int,), (str,)
FIELDS: dict[str, tuple[tuple, tuple[float, float] | None, tuple[str, ...]]] = {
    "temperature": (NUMBER, (0, 2), ("temperature",)),
    "top_p": (NUMBER, (0, 1), ("top_p",)),
    "presence_penalty": (NUMBER, (-2, 2), ("presence_penalty",)),
    "frequency_penalty": (NUMBER, (-2, 2), ("frequency_penalty",)),
    "repetition_penalty": (NUMBER, None, ("repetition_penalty",)),
    "top_k": (INTEGER, None, ("top_k",)),
    "min_tokens": (INTEGER, None, ("min_tokens",)),
    "num_draft_tokens": (INTEGER, None, ("num_draft_tokens",)),
    "fanout_budget": (INTEGER, None, ("fanout_budget",)),
    "decoding_mode": (STRING, None, ("decoding_mode",)),
}
SEED_INPUTS = ("seed", "random_seed")
# The ensemble's inputs are INT32 and FP32: a value beyond them would wrap or become inf there.
INT32_MAX = 2 ** 31 - 1
# Fields this front cannot honour, with the values that ask for nothing (the defaults).
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (None, False, 0), "top_logprobs": (None, 0), "echo": (None, False), "best_of": (None, 1),
    "logit_bias": (None, {}), "suffix": (None, ""), "tools": (None, []), "tool_choice": (None, "none", "auto"),
    "functions": (None, []), "function_call": (None, "none", "auto"), "response_format": (None, {"type": "text"}),
    "modalities": (None, ["text"]), "audio": (None,), "prediction": (None,),
}
HARMLESS = {"model", "stream", "stream_options", "n", "seed", "stop", "max_tokens", "max_completion_tokens",
            "ignore_eos", "prompt", "messages", "user", "metadata", "store", "service_tier", "parallel_tool_calls"}
ENSEMBLE_TO_OPENAI = {"text_input": None, "stop_words": "stop", "random_seed": "seed", "max_tokens": "max_tokens"}


class ApiError(Exception):
    """An error in OpenAI's format; the message names the field and the fix."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def error(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"message": self.message, "type": kind, "param": self.param, "code": self.code}

    def response(self) -> web.Response:
        return web.json_response({"error": self.error()}, status=self.status)


def busy(message: str) -> ApiError:
    return ApiError(503, message, code="service_unavailable")


# -- the request ------------------------------------------------------------------------------------

@dataclass
class Spec:
    """One OpenAI request, checked: what to send the ensemble for each choice."""
    prompts: list[str]
    n: int
    stream: bool
    include_usage: bool
    max_tokens: int
    stops: list[str]
    seed: int | None
    fields: dict[str, Any]            # OpenAI field -> value, for the ensemble inputs in FIELDS

    def upstream(self, inputs: frozenset[str]) -> list[tuple[int, str, dict]]:
        """(choice index, prompt, generate_stream body) for every choice: prompt i's choices are
        i*n .. i*n+n-1, as OpenAI numbers them."""
        base = ensemble_fields(self.fields, inputs)
        if self.stops:
            base["stop_words"] = self.stops
        if "exclude_input_in_output" in inputs:       # NVIDIA's default includes the prompt (non-streamed)
            base["exclude_input_in_output"] = True
        seed_input = next((name for name in SEED_INPUTS if name in inputs), None)
        if self.seed is not None and seed_input is None:
            raise ApiError(400, "seed: this server's ensemble takes no seed; leave it out", "seed")
        seed = self.seed if self.seed is not None else random.getrandbits(63) if self.n > 1 else None
        jobs = []
        for i, prompt in enumerate(self.prompts):
            for j in range(self.n):
                body = {"text_input": prompt, "max_tokens": self.max_tokens, "stream": True, **base}
                if seed is not None and seed_input is not None:
                    body[seed_input] = (seed + j) % 2 ** 64
                jobs.append((i * self.n + j, prompt, body))
        return jobs


def ensemble_fields(fields: dict[str, Any], inputs: frozenset[str]) -> dict[str, Any]:
    """The ensemble inputs for the request's fields; a 400 naming a field the ensemble cannot take."""
    out = {}
    for name, value in fields.items():
        target = next((t for t in FIELDS[name][2] if t in inputs), None)
        if target is None:
            raise ApiError(400, f"{name}: this server's ensemble has no input for it; leave it out", name)
        out[target] = float(value) if FIELDS[name][0] is NUMBER else value
    return out


def check_field(body: dict, name: str) -> Any:
    """body[name] after its type and range check (FIELDS), or None when absent."""
    kinds, bounds, _ = FIELDS[name]
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ApiError(400, f"{name}={value!r}: must be {'a string' if kinds is STRING else 'an integer' if kinds is INTEGER else 'a number'}", name)
    if kinds is INTEGER and not -INT32_MAX - 1 <= value <= INT32_MAX:
        raise ApiError(400, f"{name}={value!r}: must be an integer in [{-INT32_MAX - 1}, {INT32_MAX}]", name)
    if kinds is NUMBER and not -FLOAT32_MAX <= value <= FLOAT32_MAX:     # (a float, or an int of any size)
        raise ApiError(400, f"{name}={value!r}: must be a number float32 holds (at most {FLOAT32_MAX:.4g} in size)", name)
    if bounds is not None and not bounds[0] <= value <= bounds[1]:
        raise ApiError(400, f"{name}={value!r}: must be in [{bounds[0]}, {bounds[1]}]", name)
    return value


def check_integer(body: dict, name: str, low: int, high: int = INT32_MAX) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ApiError(400, f"{name}={value!r}: must be an integer of at least {low} and at most {high}", name)
    return value


def check_bool(body: dict, name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"{name}={value!r}: must be true or false", name)
    return bool(value)


def check_known(body: dict) -> None:
    """A 400 for a field this front would have to ignore."""
    for name, value in body.items():
        if name in UNSUPPORTED:
            if value not in UNSUPPORTED[name]:
                raise ApiError(400, f"{name}: not supported by this server; leave it out", name)
        elif name not in HARMLESS and name not in FIELDS:
            raise ApiError(400, f"{name}: not a field this server knows; leave it out", name)


def check_stops(value: Any) -> list[str]:
    if value is None:
        return []
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or len(stops) > MAX_STOPS or not all(isinstance(s, str) for s in stops):
        raise ApiError(400, f"stop: send a string or a list of at most {MAX_STOPS} strings", "stop")
    return [check_text(s, "stop") for s in stops if s]


def check_text(value: str, field: str) -> str:
    """A string that UTF-8 holds: JSON may carry a lone surrogate (\\ud800), which Triton refused
    with a 500 ("The surrogate pair in string is invalid")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ApiError(400, f"{field}: not valid Unicode text (a lone surrogate at character {e.start}); "
                            f"send UTF-8 text", field.split("[")[0]) from None
    return value


def check_request(body: dict, prompts: list[str], model: str) -> Spec:
    """The checked request (completions and chat alike); ApiError naming the field otherwise."""
    check_known(body)
    if body.get("model") != model:
        if body.get("model") is None:
            raise ApiError(400, f"model: missing; send \"model\": \"{model}\"", "model")
        raise ApiError(404, f"model {body['model']!r} does not exist; this server serves {model!r} (GET /v1/models)",
                       "model", "model_not_found")
    max_tokens = check_integer(body, "max_completion_tokens", 1) or check_integer(body, "max_tokens", 1) or DEFAULT_MAX_TOKENS
    fields = {name: value for name in FIELDS if (value := check_field(body, name)) is not None}
    if fields.get("temperature") and "top_p" not in fields and "top_k" not in fields:
        fields["top_p"] = 1.0       # OpenAI samples at any temperature > 0; NVIDIA's ensemble only with top_k or top_p
    if check_bool(body, "ignore_eos"):
        fields["min_tokens"] = max_tokens
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: send an object such as {\"include_usage\": true}", "stream_options")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, f"seed={seed!r}: must be an integer", "seed")
    n = check_integer(body, "n", 1, MAX_N) or 1
    if len(prompts) * n > MAX_CHOICES:
        raise ApiError(400, f"prompt: {len(prompts)} prompts x n={n} choices is more than {MAX_CHOICES} sequences "
                            f"in one request; send fewer prompts or a smaller n", "prompt")
    return Spec(prompts=prompts, n=n, stream=check_bool(body, "stream"),
                include_usage=check_bool(options, "include_usage"), max_tokens=max_tokens,
                stops=check_stops(body.get("stop")), seed=None if seed is None else seed % 2 ** 64, fields=fields)


def completion_prompts(body: dict) -> list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [check_text(prompt, "prompt")]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return [check_text(p, f"prompt[{i}]") for i, p in enumerate(prompt)]
    raise ApiError(400, "prompt: send a string or a list of strings (token-id prompts are not supported)", "prompt")


def chat_messages(body: dict) -> list[dict]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: send a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise ApiError(400, f"messages[{i}].role: must be one of {', '.join(ROLES)}", "messages")
        out.append({**m, "content": message_text(m.get("content"), i)})
    return out


def message_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return check_text(content or "", f"messages[{i}].content")
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return check_text("".join(p["text"] for p in content), f"messages[{i}].content")
    raise ApiError(400, f"messages[{i}].content: send text (a string or a list of text parts); "
                        f"images and audio are not supported", "messages")


class ChatTemplate:
    """messages -> prompt text, rendered as transformers renders chat templates (a sandboxed jinja2
    environment with trim_blocks and lstrip_blocks, add_generation_prompt, the special tokens and
    raise_exception), from the model folder's template or PLAIN_CHAT_TEMPLATE."""

    def __init__(self, tokenizer_dir: Path):
        config = _json_file(tokenizer_dir / "tokenizer_config.json")
        source = template_source(config, tokenizer_dir)
        self.plain = source is None
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise_template_error
        self.template = env.from_string(PLAIN_CHAT_TEMPLATE if source is None else source)
        self.tokens = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "pad_token", "unk_token")}

    def render(self, messages: list[dict]) -> str:
        try:
            return self.template.render(messages=messages, add_generation_prompt=True, **self.tokens)
        except TemplateError as e:
            raise ApiError(400, f"messages: the model's chat template refused them ({e})", "messages") from None


def template_source(config: dict, tokenizer_dir: Path) -> str | None:
    """The chat template of a model folder: tokenizer_config.json's chat_template (a string, or a
    list of named templates: "default"), else chat_template.jinja; None when it has none."""
    template = config.get("chat_template")
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, str) and template:
        return template
    path = tokenizer_dir / "chat_template.jinja"
    return path.read_text(encoding="utf-8") if path.is_file() else None


def _json_file(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except ValueError as e:
        raise SaguaroError(f"{path}: not valid JSON ({e}); fix or remove it") from None


def _token_text(token: Any) -> str:
    return token.get("content", "") if isinstance(token, dict) else token or ""


def _raise_template_error(message: str) -> None:
    raise TemplateError(message)


def repository_tokenizer_dir(model_repository: Path) -> Path:
    """The tokenizer folder of a model repository: its `ssd` model's tokenizer_dir parameter
    (${model_repository} and relative paths mean the repository folder, as the models read it)."""
    config = Path(model_repository) / "ssd" / "config.pbtxt"
    text = config.read_text(encoding="utf-8") if config.is_file() else ""
    found = re.search(r'key:\s*"tokenizer_dir"\s*value:\s*\{\s*string_value:\s*"([^"]*)"', text)
    if found is None:
        raise SaguaroError(f"--model-repository: {config} has no tokenizer_dir parameter; the OpenAI endpoints "
                           f"need the model's tokenizer (or pass --openai-port 0)")
    repo = Path(model_repository).resolve()
    path = Path(found.group(1).replace("${model_repository}", str(repo)))
    return (path if path.is_absolute() else repo / path).resolve()


# -- the answer -------------------------------------------------------------------------------------

class StopCut:
    """Cuts streamed text at the first of the stop strings (the text ends before it). A tail that
    could begin a stop string is held back until the next piece decides it."""

    def __init__(self, stops: Iterable[str]):
        self.stops = [s for s in stops if s]
        self.held, self.stopped = "", False

    def push(self, piece: str) -> str:
        """The text to show now."""
        if self.stopped:
            return ""
        text = self.held + piece
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held, self.stopped = "", True
            return text[:min(hits)]
        keep = max((k for s in self.stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def finish(self) -> str:
        tail, self.held = self.held, ""
        return tail


@dataclass
class Outcome:
    """How one choice ended."""
    index: int
    finish_reason: str
    completion_tokens: int
    speculation: dict[str, int]


@dataclass
class Reply:
    """The OpenAI objects of one request: completions or chat, whole or in chunks."""
    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def _object(self, obj: str, choices: list[dict], **extra: Any) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def _chunk(self, choice: dict) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [choice])

    def opening(self, index: int) -> dict | None:
        """A chat stream's first chunk of a choice (its role); completions have none."""
        if not self.chat:
            return None
        return self._chunk({"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                            "finish_reason": None})

    def piece(self, index: int, text: str) -> dict:
        body = {"delta": {"content": text}} if self.chat else {"text": text}
        return self._chunk({"index": index, **body, "logprobs": None, "finish_reason": None})

    def last(self, outcome: Outcome) -> dict:
        body = {"delta": {}} if self.chat else {"text": ""}
        return self._chunk({"index": outcome.index, **body, "logprobs": None, "finish_reason": outcome.finish_reason,
                            "speculation": outcome.speculation})

    def usage_chunk(self, usage: dict) -> dict:
        return self._object("chat.completion.chunk" if self.chat else "text_completion", [], usage=usage)

    def whole(self, outcomes: list[Outcome], texts: dict[int, list[str]], usage: dict) -> dict:
        choices = []
        for o in sorted(outcomes, key=lambda o: o.index):
            text = "".join(texts[o.index])
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            choices.append({"index": o.index, **body, "logprobs": None, "finish_reason": o.finish_reason,
                            "speculation": o.speculation})
        return self._object("chat.completion" if self.chat else "text_completion", choices, usage=usage,
                            speculation=summed(o.speculation for o in outcomes))


def summed(parts: Iterable[dict[str, int]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0) + v
    if total.get("drafted_tokens"):
        total["acceptance_rate"] = round(total["accepted_tokens"] / total["drafted_tokens"], 4)
    return total


def scalar(value: Any) -> Any:
    """A generate response's value: a scalar, or the first element of a (nested) list."""
    while isinstance(value, list):
        value = value[0] if value else None
    return value


def upstream_error(status: int | None, message: str) -> ApiError:
    """The ensemble's error as an OpenAI error. Triton's status stands (400 bad input, 503 retry),
    but an error that says to retry is 503 whatever the status;
    a model Triton does not know (404) is our ensemble not loaded yet: 503. An error inside a stream
    (status 200 already sent) is 503 when it says to retry (every retryable error of ours does), 500
    otherwise. The field the message starts with becomes `param`, named as OpenAI names it."""
    if status == 404:
        return busy(f"the model is not ready (loading or restarting); retry ({message})")
    named = re.match(r"(\w+)(?:\s*\([^)]*\))?\s*[=:]", message)     # "num_draft_tokens (K)=0: ..." too
    param = named and ENSEMBLE_TO_OPENAI.get(named.group(1), named.group(1) if named.group(1) in FIELDS else None)
    if status is None or status == 200:
        status = 503 if "retry" in message.lower() else 500
    elif status == 400 and "retry" in message.lower():   # Triton 2.51's generate_stream answered a model's
        status = 503                                     # UNAVAILABLE with 400 (a relay's "not ready; retry")
    return ApiError(status, message, param, "service_unavailable" if status == 503 else None)


async def sse_data(content, died: Callable[[], bool]) -> AsyncIterator[bytes]:
    """The `data:` payloads of a server-sent event stream (ModelRestarted once died())."""
    buffer = b""
    while chunk := await unless_died(content.readany(), died):
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            if line.startswith(b"data:"):
                yield line[5:].strip()


async def all_of(coros: Iterable[Awaitable]) -> list:
    """Results of the coroutines run together; the first error cancels the rest."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        return await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()


# -- the server -------------------------------------------------------------------------------------

Emit = Callable[[int, str], Awaitable[None]]


class OpenAIFront(BackgroundApp):
    """The OpenAI endpoints on host:port, for the model `model` of the Triton at upstream ("host:port",
    its HTTP endpoint); prompts are counted and chat templates read from tokenizer_dir."""

    thread_name = "saguaro-openai-front"
    cancel_on_disconnect = True      # a client that goes away closes its upstream requests
    auto_decompress = True

    def __init__(self, host: str, port: int, upstream: str, tokenizer_dir: Path, model: str = MODEL,
                 stub_deaths: StubDeaths | None = None):
        super().__init__(host, port, upstream, stub_deaths=stub_deaths)
        self.model, self.tokenizer = model, load_tokenizer(tokenizer_dir)
        self.chat_template = ChatTemplate(Path(tokenizer_dir))
        self.created = int(time.time())
        self._inputs: frozenset[str] | None = None

    def routes(self, app: web.Application) -> None:
        app.middlewares.append(self._errors)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/v1/models/{model}", self._one_model)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_post("/v1/chat/completions", self._chat)

    @web.middleware
    async def _errors(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as e:
            return e.response()
        except web.HTTPException as e:      # unknown path (404), method (405), body too large (413)
            return ApiError(e.status, f"{request.method} {request.path}: {e.reason}").response()

    # -- endpoints

    def _card(self) -> dict:
        return {"id": self.model, "object": "model", "created": self.created, "owned_by": "saguaro"}

    async def _models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [self._card()]})

    async def _one_model(self, request: web.Request) -> web.Response:
        if request.match_info["model"] != self.model:
            raise ApiError(404, f"model {request.match_info['model']!r} does not exist; this server serves "
                                f"{self.model!r}", "model", "model_not_found")
        return web.json_response(self._card())

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        return await self._answer(request, check_request(body, completion_prompts(body), self.model), chat=False)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        prompt = self.chat_template.render(chat_messages(body))
        return await self._answer(request, check_request(body, [prompt], self.model), chat=True)

    async def _body(self, request: web.Request) -> dict:
        raw = await request.read()
        problem = check_json(raw, None) or (None if raw else "request body: empty; send a JSON object")
        if problem:
            raise ApiError(400, problem)
        body = json.loads(raw)
        if not isinstance(body, dict):
            raise ApiError(400, "request body: send a JSON object")
        return body

    # -- answering

    async def _answer(self, request: web.Request, spec: Spec, chat: bool) -> web.StreamResponse:
        jobs = spec.upstream(await self._ensemble_inputs())
        reply = Reply(chat, self.model)
        if spec.stream:
            return await self._stream(request, spec, reply, jobs)
        texts: dict[int, list[str]] = {index: [] for index, _, _ in jobs}

        async def collect(index: int, piece: str) -> None:
            texts[index].append(piece)

        outcomes = await all_of(self._choice(index, body, spec.stops, collect) for index, _, body in jobs)
        return web.json_response(reply.whole(outcomes, texts, self._usage(spec, outcomes)))

    async def _stream(self, request: web.Request, spec: Spec, reply: Reply, jobs: list) -> web.StreamResponse:
        """Chunks of every choice as they come; an error before the first chunk is a plain error
        response, one after it an `error` event."""
        queue: asyncio.Queue = asyncio.Queue()

        async def run(index: int, body: dict) -> None:
            try:
                await queue.put(await self._choice(index, body, spec.stops, lambda i, p: queue.put((i, p))))
            except ApiError as e:
                await queue.put(e)

        tasks = [asyncio.ensure_future(run(index, body)) for index, _, body in jobs]
        response = web.StreamResponse(headers=SSE_HEADERS)
        try:
            item = await queue.get()
            if isinstance(item, ApiError):
                return item.response()
            await response.prepare(request)
            await send_events(response, [reply.opening(index) for index, _, _ in jobs])
            await self._relay(response, spec, reply, queue, item, len(jobs))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:        # the client went away; its requests end below
            pass
        finally:
            for t in tasks:
                t.cancel()
        return response

    async def _relay(self, response: web.StreamResponse, spec: Spec, reply: Reply, queue: asyncio.Queue,
                     item: Any, choices: int) -> None:
        outcomes: list[Outcome] = []
        while True:
            if isinstance(item, ApiError):
                await send_events(response, [{"error": item.error()}])
                return
            if isinstance(item, Outcome):
                outcomes.append(item)
                await send_events(response, [reply.last(item)])
                if len(outcomes) == choices:
                    if spec.include_usage:
                        await send_events(response, [reply.usage_chunk(self._usage(spec, outcomes))])
                    return
            else:
                await send_events(response, [reply.piece(*item)])
            item = await queue.get()

    async def _choice(self, index: int, body: dict, stops: list[str], emit: Emit) -> Outcome:
        """One choice: its text pieces go to emit(index, piece) (cut at a stop string); returns how it ended."""
        cut, received, totals = StopCut(stops), [], {}
        async with aclosing(self._generate(body)) as events:
            async for event in events:
                received.append(scalar(event.get("text_output")) or "")
                if "generated_tokens" in event:
                    totals = {k: int(scalar(event[k])) for k in ("generated_tokens", *SPECULATION) if k in event}
                piece = cut.push(received[-1])
                if piece:
                    await emit(index, piece)
                if cut.stopped:
                    break                       # leaving the stream closes it: Triton cancels the request
        tail = cut.finish()
        if tail:
            await emit(index, tail)
        generated = totals.pop("generated_tokens", None)
        if generated is None:               # cut here before the ensemble's own end
            generated = len(self.tokenizer.encode("".join(received)).ids)
        finish = "stop" if cut.stopped or generated < body["max_tokens"] else "length"
        return Outcome(index, finish, generated, totals)

    async def _generate(self, body: dict) -> AsyncIterator[dict]:
        """The ensemble's responses to one streamed request (generate_stream's events)."""
        url = f"http://{self.upstream}/v2/models/{self.model}/generate_stream"
        died = self.stub_deaths.watch(self.model)
        try:
            async with await unless_died(self.session.post(url, json=body), died) as r:
                if r.status != 200:
                    raise upstream_error(r.status, error_message(await r.text()))
                async for data in sse_data(r.content, died):
                    event = json.loads(data)
                    if "error" in event:
                        raise upstream_error(None, str(event["error"]))
                    yield event
        except ModelRestarted:
            raise busy(restarted_message(self.model)) from None
        except (OSError, ClientError):
            self._inputs = None             # a restarted server may serve another ensemble
            raise busy("the server is restarting; retry") from None

    async def _ensemble_inputs(self) -> frozenset[str]:
        """The names of the ensemble's inputs (its config, read once per upstream server)."""
        if self._inputs is None:
            try:
                async with self.session.get(f"http://{self.upstream}/v2/models/{self.model}/config") as r:
                    if r.status != 200:
                        raise busy(f"the model {self.model!r} is not ready (loading or restarting); retry")
                    self._inputs = frozenset(i["name"] for i in (await r.json()).get("input", []))
            except (OSError, ClientError):
                raise busy("the server is restarting; retry") from None
        return self._inputs

    def _usage(self, spec: Spec, outcomes: list[Outcome]) -> dict:
        """OpenAI's usage: each prompt counted once (as the ensemble tokenizes it), every choice's tokens."""
        prompt = sum(len(self.tokenizer.encode(p).ids) for p in spec.prompts)
        completion = sum(o.completion_tokens for o in outcomes)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def error_message(text: str) -> str:
    """Triton's error message from a JSON body or the first event of a stream."""
    for candidate in (text, *(line[5:] for line in text.splitlines() if line.startswith("data:"))):
        try:
            value = json.loads(candidate)
        except ValueError:
            continue
        if isinstance(value, dict) and "error" in value:
            return str(value["error"])
    return text.strip() or "the server answered without a message"


async def send_events(response: web.StreamResponse, events: list[dict | None]) -> None:
    for event in events:
        if event is not None:
            await response.write(b"data: " + json.dumps(event).encode() + b"\n\n")
