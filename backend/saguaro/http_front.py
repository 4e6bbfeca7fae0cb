"""The public HTTP port of `saguaro.serve`: a guard in front of tritonserver's HTTP endpoint.

tritonserver 2.51 answers a malformed JSON body with 500, and crashes on a body nested deep enough
(100 KB of brackets: its JSON parser recurses; fixed upstream after 2.51, not in the binary we can
install) or on a 10 MB generate body. The front reads every request body first and answers what Triton must not see itself,
in Triton's {"error": "..."} shape: a body over max_body_bytes (413), JSON that does not parse or
nests deeper than MAX_DEPTH (400). Everything else passes through unchanged, the response streamed
back as it comes (generate_stream's server-sent events included). Triton listens on a loopback
port only the front uses.

A request to a model whose stub process dies under it is never answered again by Triton 2.51: the
front ends it (503, or an `error` event in a stream already under way) as soon as the supervisor
finds the death (`StubDeaths`, within its poll of 0.5 s), rather than leaving the client waiting.
"""
from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Awaitable, Callable, TypeVar

from aiohttp import ClientSession, ClientTimeout, web

from saguaro.supervisor import StubDeaths, restarted_message

MAX_DEPTH = 64                   # JSON nesting a request may have (Triton's own requests use 4-5)
MAX_BODY_BYTES = 4 << 20         # tritonserver 2.51 dies (SIGSEGV) on a 10 MB generate body; prompts are far smaller
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-authorization",
              "proxy-authenticate", "host", "content-length"}


DEATH_POLL_S = 0.1               # how often a request waiting on Triton looks for its model's death
MODEL_PATH = re.compile(r"/v2/models/([^/]+)/")
# Triton's APIs that change the server (tritonserver_process.RESTRICTED_APIS): refused here too, so a
# client's request never reaches them whatever headers it brings
RESTRICTED_PATH = re.compile(r"/v2/(repository|logging|trace|systemsharedmemory|cudasharedmemory)(/|$)"
                             r"|/v2/models/[^/]+(/versions/[^/]+)?/trace(/|$)")
T = TypeVar("T")


class ModelRestarted(Exception):
    """The stub of the model a request waits on died (restarted_message)."""


async def unless_died(awaitable: Awaitable[T], died: Callable[[], bool]) -> T:
    """What `awaitable` gives, unless died() turns true first (looked at every DEATH_POLL_S while
    it waits): then ModelRestarted, and the awaitable is cancelled."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DEATH_POLL_S)
            if done:
                return task.result()
            if died():
                raise ModelRestarted()
    finally:
        if not task.done():
            task.cancel()


def check_json(body: bytes, header_length: str | None) -> str | None:
    """What is wrong with a request body for Triton's HTTP endpoint, or None. With the binary
    tensor extension only the JSON header (its length in Inference-Header-Content-Length) is JSON."""
    if not body:
        return None
    if header_length is not None:
        if not header_length.isdigit() or int(header_length) > len(body):
            return "Inference-Header-Content-Length: not a length within the body"
        body = body[:int(header_length)]
    try:
        value = json.loads(body)
    except RecursionError:
        return f"request body: JSON nested deeper than {MAX_DEPTH} levels"
    except (ValueError, UnicodeDecodeError) as e:
        return f"request body: malformed JSON ({e})"
    stack = [(value, 1)]
    while stack:                  # iterative: depth is what we are guarding against
        v, depth = stack.pop()
        if depth > MAX_DEPTH:
            return f"request body: JSON nested deeper than {MAX_DEPTH} levels"
        children = v.values() if isinstance(v, dict) else v if isinstance(v, list) else ()
        stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return None


class BackgroundApp:
    """An aiohttp application on host:port, served from a thread of its own with its own event loop
    (saguaro.serve's main thread supervises tritonserver), and a client session (`self.session`)
    for Triton at upstream ("host:port"). Subclasses add their routes in `routes`."""

    thread_name = "saguaro-http"
    cancel_on_disconnect = False      # cancel a request's handler when its client goes away
    auto_decompress = False           # decode compressed upstream bodies (a proxy passes them on as they are)

    def __init__(self, host: str, port: int, upstream: str, max_body_bytes: int = MAX_BODY_BYTES,
                 stub_deaths: StubDeaths | None = None):
        self.host, self.port, self.upstream, self.max_body_bytes = host, port, upstream, max_body_bytes
        self.stub_deaths = stub_deaths if stub_deaths is not None else StubDeaths()   # the upstream's supervisor's
        self.loop = asyncio.new_event_loop()
        self.runner: web.AppRunner | None = None
        self.thread = threading.Thread(target=self.loop.run_forever, name=self.thread_name, daemon=True)

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def start(self) -> "BackgroundApp":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(30)
        return self

    async def _start(self) -> None:
        self.session = ClientSession(timeout=ClientTimeout(total=None, sock_connect=10),
                                     auto_decompress=self.auto_decompress)
        app = web.Application(client_max_size=self.max_body_bytes)
        self.routes(app)
        self.runner = web.AppRunner(app, access_log=None, handler_cancellation=self.cancel_on_disconnect)
        await self.runner.setup()
        await web.TCPSite(self.runner, self.host, self.port, reuse_address=True).start()

    def stop(self) -> None:
        if self.runner is None:
            return
        async def _stop():
            await self.runner.cleanup()
            await self.session.close()
        asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.runner = None


class HttpFront(BackgroundApp):
    """Listens on host:port and passes checked requests on to Triton at upstream ("host:port")."""

    thread_name = "saguaro-http-front"

    def routes(self, app: web.Application) -> None:
        app.router.add_route("*", "/{tail:.*}", self._handle)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if RESTRICTED_PATH.match(request.path):
            return _error(403, f"{request.path}: not open to clients (the server loads its models itself; "
                               f"logging, tracing and shared memory are its operator's)")
        if (request.content_length or 0) > self.max_body_bytes:
            return _error(413, f"request body: {request.content_length} bytes, above the limit of {self.max_body_bytes}")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"request body: above the limit of {self.max_body_bytes} bytes")
        problem = check_json(body, request.headers.get("Inference-Header-Content-Length")) \
            if request.method in ("POST", "PUT") else None
        if problem:
            return _error(400, problem)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        model = MODEL_PATH.match(request.path)
        died = self.stub_deaths.watch(model.group(1)) if model else (lambda: False)
        try:
            upstream = await unless_died(self.session.request(
                request.method, f"http://{self.upstream}{request.rel_url}", data=body or None, headers=headers), died)
        except OSError:
            return _error(503, "the server is restarting; retry")
        except ModelRestarted:
            return _error(503, restarted_message(model.group(1)))
        async with upstream:
            out = web.StreamResponse(status=upstream.status, headers={
                k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP})
            if upstream.content_length is not None:
                out.content_length = upstream.content_length
            await out.prepare(request)
            try:
                while chunk := await unless_died(upstream.content.readany(), died):
                    await out.write(chunk)
            except ModelRestarted:
                if upstream.content_type == "text/event-stream":     # generate_stream: as Triton sends an error
                    await out.write(b"data: " + json.dumps({"error": restarted_message(model.group(1))}).encode() + b"\n\n")
            await out.write_eof()
            return out


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)
