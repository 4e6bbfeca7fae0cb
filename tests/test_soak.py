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


def _soak_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("soak_script", ROOT / "scripts" / "soak.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module     # (its dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def test_the_soak_stops_waiting_for_a_server_that_exited_and_shows_its_log(tmp_path, capsys):
    import time

    from saguaro.tritonserver_process import free_port
    soak = _soak_module()
    gone = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    gone.wait()
    t0 = time.monotonic()
    assert not soak.wait_ready(f"127.0.0.1:{free_port()}", 60, gone)
    assert time.monotonic() - t0 < 5
    log = tmp_path / "server.log"
    log.write_text("".join(f"line {i}\n" for i in range(100)) + "Signal (11) received.\n")
    soak.show_log(str(log), lines=3)
    shown = capsys.readouterr().out
    assert "its last 3 lines" in shown and "    line 98\n    line 99\n    Signal (11) received." in shown
    assert "line 97" not in shown
