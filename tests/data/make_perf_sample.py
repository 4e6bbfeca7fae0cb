"""Regenerates tests/data/perf_sample/ by really running perf_analyzer (through clients/perf/sweep.py).

Serves the toy decoupled `ensemble` (tests/toy_triton.py) from the pip-installed tritonserver on
free 127.0.0.1 ports, sweeps concurrency 1,2 for ssd, sd, ar with two short prompts, and keeps
the raw exports (CSV, profile export JSON, metric deltas) plus one Prometheus scrape. Run from
the repository root (takes about 15 s):
    .venv/bin/python tests/data/make_perf_sample.py
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.toy_triton import toy_server  # noqa: E402

DEST = Path(__file__).resolve().parent / "perf_sample"


def main() -> None:
    with toy_server() as server, tempfile.TemporaryDirectory() as tmp:
        prompts = Path(tmp) / "prompts.jsonl"
        prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("def add(a, b):", "class Stack:")))
        out = Path(tmp) / "sweep"
        subprocess.run([sys.executable, str(ROOT / "clients/perf/sweep.py"), "--url", server.grpc_url,
                        "--metrics-url", server.metrics_url, "--prompts", str(prompts), "--concurrency", "1,2",
                        "--max-tokens", "8", "--out", str(out)], check=True)
        shutil.rmtree(DEST, ignore_errors=True)
        DEST.mkdir()
        for f in out.iterdir():
            if f.name.endswith((".csv", ".json")) and f.name != "rows.json":
                shutil.copy(f, DEST / f.name)
        with urllib.request.urlopen(server.metrics_url) as r:
            (DEST / "metrics.txt").write_bytes(r.read())
    print(f"wrote {DEST}")


if __name__ == "__main__":
    main()
