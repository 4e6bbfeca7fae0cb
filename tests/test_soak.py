"""Half a minute of scripts/soak.py in CI: mixed load with cancellations, disconnects and bad input
against its own `saguaro.serve`; it exits non-zero on a lost request, a wrong greedy output, a
leaked slot or RSS growth over 10%."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_half_minute_soak_loses_nothing_and_leaks_nothing():
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "soak.py"), "--minutes", "0.5", "--concurrency", "4",
                          "--report-s", "10"], capture_output=True, text=True, timeout=600)
    print(run.stdout)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "soak: PASSED" in run.stdout
    done = next(line for line in run.stdout.splitlines() if line.startswith("soak: done"))
    assert " lost 0 " in done and "greedy mismatches 0" in done
