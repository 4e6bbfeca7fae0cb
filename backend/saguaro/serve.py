"""Serve the model repository from the pip-installed tritonserver: `python -m saguaro.serve`.

Starts the server in the foreground, waits until every model is loaded, prints the endpoints, and
stops it (with its Python-backend processes) on Ctrl-C or SIGTERM.
"""
from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from saguaro.errors import SaguaroError
from saguaro.triton_server import DEFAULT_MODEL_REPOSITORY, TritonServer


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m saguaro.serve", description=__doc__.splitlines()[0])
    p.add_argument("--model-repository", type=Path, default=DEFAULT_MODEL_REPOSITORY,
                   help="Triton model repository (default: the project's model_repository/)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--http-port", type=int, default=8000)
    p.add_argument("--grpc-port", type=int, default=8001)
    p.add_argument("--metrics-port", type=int, default=8002)
    p.add_argument("--log-verbose", type=int, default=0, help="tritonserver verbose log level (0 = off)")
    p.add_argument("--log-file", type=Path, default=None, help="also append the server log to this file")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all models to load")
    return p.parse_args(argv)


def _interrupt(*_: object) -> None:
    # SIGTERM behaves like Ctrl-C, also while models are loading: unwind and stop the server.
    raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    server = TritonServer(args.model_repository, host=args.host, http_port=args.http_port,
                          grpc_port=args.grpc_port, metrics_port=args.metrics_port,
                          log_verbose=args.log_verbose, log_path=args.log_file, echo=True)
    for sig in (signal.SIGINT, signal.SIGTERM):  # SIGINT too: a background start may inherit it ignored
        signal.signal(sig, _interrupt)
    try:
        server.start(timeout_s=args.timeout)
        print(f"\nsaguaro: serving {server.model_repository}\n"
              f"  HTTP     http://{server.http_url}   (e.g. POST /v2/models/ensemble/generate)\n"
              f"  gRPC     {server.grpc_url}\n"
              f"  metrics  {server.metrics_url}\n"
              f"Ctrl-C to stop.", flush=True)
        while server.proc is not None and server.proc.poll() is None:
            time.sleep(0.5)
        print(f"saguaro: tritonserver exited unexpectedly:\n{server.log_tail()}", file=sys.stderr)
        return 1
    except SaguaroError as e:
        print(f"saguaro: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl-C must not cut the shutdown short
            signal.signal(sig, signal.SIG_IGN)
        print("saguaro: stopping tritonserver", file=sys.stderr, flush=True)
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
