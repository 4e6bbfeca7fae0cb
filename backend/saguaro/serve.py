"""Serve the model repository from the pip-installed tritonserver: `python -m saguaro.serve`.

Starts the server in the foreground, waits until every model is loaded, prints the endpoints, and
stops it (with its Python-backend processes) on Ctrl-C or SIGTERM. HTTP clients reach it through
saguaro.http_front, which turns away request bodies Triton 2.51 would crash on; OpenAI clients through
saguaro.openai_front on --openai-port (both on --host, both stopped with the server). While it runs, a model whose
stub process dies is reloaded (saguaro.supervisor), and a tritonserver that exits is started again,
with backoff (1 s, doubling to 30 s; back to 1 s after a minute of running).
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from saguaro.errors import SaguaroError
from saguaro.http_front import HttpFront
from saguaro.openai_front import OpenAIFront, repository_tokenizer_dir
from saguaro.supervisor import StubDeaths
from saguaro.tritonserver_process import DEFAULT_MODEL_REPOSITORY, TritonServer, free_port, port_in_use


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saguaro.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY,
                   help="Triton model repository (default: the project's model_repository/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--openai-port", type=int, default=9000,
                   help="OpenAI-compatible endpoints (/v1/completions, /v1/chat/completions, /v1/models) for "
                        "the ensemble (default 9000; 0: off)")
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver verbose log level (0 = off)")
    p.add_argument("--log-file", type=Path, default=None, help="also append the server log to this file")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all models to load")
    p.add_argument("--tritonserver", type=Path, default=None,
                   help="a tritonserver binary to run instead of the nvidia-pytriton wheel's "
                        "(e.g. tritonserver in NVIDIA's Triton images)")
    return p.parse_args(argv)


BACKOFF_S = (1.0, 30.0)          # first and longest wait before starting a crashed server again
STABLE_S = 60.0                  # a server that ran this long resets the backoff


def _interrupt(*_: object) -> None:
    # SIGTERM behaves like Ctrl-C, also while models are loading: unwind and stop the server.
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background start may inherit it ignored
        signal.signal(sig, _interrupt)
    server, front, openai_front, delay, started = None, None, None, BACKOFF_S[0], 0
    # HTTP clients reach Triton through the front (it turns away bodies Triton would crash on or
    # answer 500 to); Triton's own HTTP port is on loopback, one port for every restart.
    upstream_port = free_port("127.0.0.1")
    stub_deaths = StubDeaths()      # found by each server's supervisor; the fronts end requests a dead stub held
    try:
        for flag, port in (("--http-port", args.http_port), ("--openai-port", args.openai_port)):
            if port and port_in_use(args.host, port):
                print(f"saguaro: {flag}: port {port} on {args.host} is already in use; stop that process "
                      f"or pick another port", file=sys.stderr)
                return 2
        if args.openai_port:
            try:
                openai_front = OpenAIFront(args.host, args.openai_port, f"127.0.0.1:{upstream_port}",
                                           repository_tokenizer_dir(args.model_repository), stub_deaths=stub_deaths).start()
            except SaguaroError as e:
                print(f"saguaro: {e}", file=sys.stderr)
                return 2
        front = HttpFront(args.host, args.http_port, f"127.0.0.1:{upstream_port}", stub_deaths=stub_deaths).start()
        while True:
            server = TritonServer(args.model_repository, host=args.host, http_host="127.0.0.1",
                                  http_port=upstream_port, grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                                  log_verbose=args.log_verbose, log_path=args.log_file, echo=True,
                                  binary=args.tritonserver, stub_deaths=stub_deaths)
            try:
                server.start(timeout_s=args.timeout)
            except SaguaroError as e:
                if not started:                 # a bad setup: say so and stop
                    print(f"saguaro: {e}", file=sys.stderr)
                    return 2
                print(f"saguaro: restarting tritonserver failed: {e}", file=sys.stderr, flush=True)
            else:
                started += 1
                t_up = time.monotonic()
                print(f"\nsaguaro: serving {server.model_repository}{' (restarted)' if started > 1 else ''}\n"
                      f"  HTTP     http://{TritonServer._hostport(args.host, args.http_port)}   "
                      f"(e.g. POST /v2/models/ensemble/generate)\n"
                      f"  gRPC     {server.grpc_url}\n"
                      f"  metrics  {server.metrics_url}\n"
                      + (f"  OpenAI   http://{TritonServer._hostport(args.host, args.openai_port)}/v1   "
                         f"(model \"ensemble\": /v1/completions, /v1/chat/completions)\n" if openai_front else "") +
                      "Ctrl-C to stop.", flush=True)
                while server.proc is not None and server.proc.poll() is None:
                    time.sleep(0.2)
                code = server.proc.returncode if server.proc is not None else None
                print(f"saguaro: tritonserver exited unexpectedly (code {code}):\n{server.log_tail(15)}",
                      file=sys.stderr, flush=True)
                if time.monotonic() - t_up > STABLE_S:
                    delay = BACKOFF_S[0]
            server.stop()                       # its stubs, its private folder
            print(f"saguaro: starting tritonserver again in {delay:.0f} s", file=sys.stderr, flush=True)
            time.sleep(delay)
            delay = min(delay * 2, BACKOFF_S[1])
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        if server is not None:
            print("saguaro: stopping tritonserver", file=sys.stderr, flush=True)
            server.stop()
        for app in (front, openai_front):
            if app is not None:
                app.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
