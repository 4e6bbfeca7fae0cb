"""Concurrency sweep of the `ensemble` with perf_analyzer, per decoding mode, into a report.

    python clients/perf/sweep.py --url 127.0.0.1:8001 --out runs/sweep             # 1,2,4,8 x ssd,sd,ar
    python clients/perf/sweep.py --concurrency 1,2 --modes ssd,sd --max-tokens 32 --out runs/quick
    python clients/perf/sweep.py --concurrency 1 --repeats 6 --num-draft-tokens sd=2 --out runs/c1   # sd at K=2
    python clients/perf/sweep.py --report-only runs/sweep                          # redo report.md/png

For each mode and concurrency it writes perf_analyzer's CSV (`<mode>_c<C>.csv`) and profile
export (`<mode>_c<C>.json`, every response's timestamp and outputs), and the difference of the
server's Prometheus counters over the run (`<mode>_c<C>.metrics.json`: every `saguaro_*` metric
plus Triton's request failures). report.md and report.png summarize them.

By default every point runs a fixed number of requests, prompts x concurrency, laid out so that
each of perf_analyzer's C threads decodes every prompt once (make_input_data.py: perf_analyzer
steps each thread through the input data by C, and splits the count between its threads), so each
mode decodes the same prompts: acceptance depends on the prompt, and time windows would let faster
modes see a different mix. With one entry per prompt instead, at C = 8 each thread repeated one
prompt, and a mode whose speed varies by prompt ran its last ~40% below concurrency 8, waiting for
its slowest prompt. A mode whose requests finish unevenly still ends each run below concurrency C
for its last requests (greedy SSD at C = 8 read 0.98x AR with 8 requests a thread, 1.10x with 32):
--request-count N x prompts x C gives each thread every prompt N times, so that tail weighs less.
--measurement-interval switches to perf_analyzer's time windows. The report's
"at C" column is the share of a point's wall time during which all C requests were in flight.

--repeats N runs every point N times, the modes in a rotated order each time (files
`<mode>_c<C>_r<i>.*`), and reports each point over all its runs: on a shared machine whose speed
drifts by tens of percent within minutes, one block per mode can hand a mode a slow minute. The
report then also gives ssd/ar run by run (each point's runs paired in order): how far the host
moved a point.

--num-draft-tokens MODE=K,... sends K with that mode's requests, so each mode can run at its own
best K (served on this CPU, sd is fastest at K=1-2, ssd at the server's default K=3).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from clients.common import (  # noqa: E402
    DEFAULT_PROMPTS_FILE, TOTALS, ClientError, GenerateRequest, check_ready, cli, load_prompts, metrics_url_for,
)
from clients.perf.make_input_data import write_input_data  # noqa: E402

PERF_ANALYZER = Path(__file__).resolve().parent / "perf_analyzer.sh"
FAILURE_METRIC = "nv_inference_request_failure"


@dataclass
class Row:
    """One (mode, concurrency) point of the sweep. Times in ms; None where not measurable."""

    mode: str
    concurrency: int
    requests: int
    infer_per_s: float
    tokens_per_s: float | None
    pa_infer_per_s: float  # perf_analyzer's own figure; it counts at least a 1 s window, so short runs read low
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    ttft_p50_ms: float | None
    ttft_p99_ms: float | None
    itl_p50_ms: float | None
    held: float | None          # share of the wall time with all `concurrency` requests in flight
    hit_rate: float | None
    acceptance: float | None
    errors: int
    run_rates: list[float] = field(default_factory=list)   # throughput of each of its runs, in run order


# ---- parsing perf_analyzer's outputs ---------------------------------------------------------

def parse_csv(path: Path) -> dict[str, float]:
    """The first data row of perf_analyzer's -f CSV (one concurrency per file here)."""
    header, values = list(csv.reader(path.read_text().splitlines()))[:2]
    out = {}
    for key, value in zip(header, values):
        try:
            out[key] = float(value)
        except ValueError:
            pass
    return out


def parse_export(path: Path) -> list[dict[str, Any]]:
    """Per experiment (concurrency level) of a --profile-export-file: per-request latency, time
    to first response, inter-token latency (ms) and the request totals found in its outputs."""
    experiments = []
    for exp in json.loads(path.read_text())["experiments"]:
        reqs = []
        for r in exp["requests"]:
            ts = r.get("response_timestamps") or []
            outs = r.get("response_outputs") or []
            # Totals arrive on the final response only. perf_analyzer 2.51 exports an output a
            # response lacks as whatever its buffer held (garbage ints), so read the last one and
            # reject values no request can have.
            last = outs[-1] if outs else {}
            totals = {k: v if isinstance(v := last.get(k), int) and 0 <= v < 10**7 else 0 for k in TOTALS}
            item: dict[str, Any] = {"responses": len(ts), **totals}
            if ts:
                item["latency_ms"] = (ts[-1] - r["timestamp"]) / 1e6
                item["ttft_ms"] = (ts[0] - r["timestamp"]) / 1e6
                # Only pieces that carry text: the last response may hold the totals alone.
                text_ts = [t for t, o in zip(ts, outs) if o.get("text_output")] if outs else ts
                if len(text_ts) >= 2 and totals["generated_tokens"] >= 2:
                    item["itl_ms"] = (text_ts[-1] - text_ts[0]) / 1e6 / (totals["generated_tokens"] - 1)
            reqs.append(item)
        # Wall time of the closed loop: first send to last response over all requests.
        sends = [r["timestamp"] for r in exp["requests"]]
        ends = [r["response_timestamps"][-1] for r in exp["requests"] if r.get("response_timestamps")]
        span_s = (max(ends) - min(sends)) / 1e9 if ends else 0.0
        concurrency = int(exp["experiment"]["value"])
        experiments.append({"concurrency": concurrency, "requests": reqs, "span_s": span_s,
                            "held_s": held_seconds(exp["requests"], concurrency)})
    return experiments


def held_seconds(requests: list[dict[str, Any]], concurrency: int) -> float:
    """Seconds during which `concurrency` requests were in flight (sent, last response not yet in)."""
    answered = [r for r in requests if r.get("response_timestamps")]
    edges = sorted([(r["timestamp"], 1) for r in answered] + [(r["response_timestamps"][-1], -1) for r in answered])
    held, in_flight, since = 0, 0, 0
    for t, step in edges:
        if in_flight >= concurrency:
            held += t - since
        in_flight, since = in_flight + step, t
    return held / 1e9


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not values:
        return None
    v = sorted(values)
    pos = (len(v) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


# ---- server metrics --------------------------------------------------------------------------

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)")


def parse_prometheus(text: str) -> dict[str, float]:
    """Prometheus text format -> metric name -> value summed over its label sets."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if m and not line.startswith("#"):
            try:
                out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
            except ValueError:
                pass
    return out


def scrape_metrics(url: str | None) -> dict[str, float]:
    if not url:
        return {}
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return parse_prometheus(r.read().decode())
    except OSError as e:
        print(f"  warning: cannot scrape {url}: {e}", flush=True)
        return {}


def metric_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Change over one run of every saguaro_* metric and of Triton's request failures.
    Histogram buckets are left out: summed over `le` they mean nothing (_sum and _count stay)."""
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items())
            if (k.startswith("saguaro_") and not k.endswith("_bucket")) or k == FAILURE_METRIC}


def _counter(deltas: dict[str, float], *names: str) -> float | None:
    # The lead defines the names; accept saguaro_<name>, with or without the _total suffix.
    for name in names:
        for key in (f"saguaro_{name}_total", f"saguaro_{name}"):
            if key in deltas:
                return deltas[key]
    return None


def speculative_rates(deltas: dict[str, float]) -> tuple[float | None, float | None]:
    """(cache hit rate, draft acceptance) from the metric deltas, None where not available."""
    hits, misses = _counter(deltas, "cache_hits"), _counter(deltas, "cache_misses")
    accepted = _counter(deltas, "accepted_tokens", "accepted_draft_tokens", "accepted")
    drafted = _counter(deltas, "drafted_tokens", "draft_tokens", "drafted")
    hit_rate = hits / (hits + misses) if hits is not None and misses is not None and hits + misses > 0 else None
    acceptance = accepted / drafted if accepted is not None and drafted else None
    return hit_rate, acceptance


# ---- one point -------------------------------------------------------------------------------

Run = tuple[Path, Path, dict[str, float]]   # one perf_analyzer run: its CSV, its export, the metric deltas


def summarize_runs(mode: str, runs: list[Run]) -> Row:
    """One point from its runs (one, or --repeats of them): requests pooled, wall times added."""
    exps = [parse_export(export)[0] for _, export, _ in runs]
    reqs = [r for exp in exps for r in exp["requests"]]
    tokens = [r["generated_tokens"] for r in reqs if r["generated_tokens"]]
    span_s = sum(exp["span_s"] for exp in exps)
    held_s = sum(exp["held_s"] for exp in exps)
    run_rates = [(sum(r["generated_tokens"] for r in exp["requests"]) if tokens else len(exp["requests"])) / exp["span_s"]
                 for exp in exps if exp["span_s"]]
    deltas: dict[str, float] = {}
    for _, _, d in runs:
        for k, v in d.items():
            deltas[k] = deltas.get(k, 0.0) + v
    pa_rates = [parse_csv(csv_path).get("Inferences/Second", 0.0) for csv_path, _, _ in runs]
    hit_rate, acceptance = speculative_rates(deltas)
    if acceptance is None:  # no server metric: fall back to the requests' own totals
        drafted = sum(r["drafted_tokens"] for r in reqs)
        acceptance = sum(r["accepted_tokens"] for r in reqs) / drafted if drafted else None
    # A request that got no response or no tokens failed, whatever perf_analyzer counted.
    errors = int(deltas.get(FAILURE_METRIC, 0)) + sum(1 for r in reqs if not r["responses"])
    return Row(
        mode=mode, concurrency=exps[0]["concurrency"], requests=len(reqs),
        infer_per_s=len(reqs) / span_s if span_s else 0.0,
        tokens_per_s=sum(tokens) / span_s if tokens and span_s else None,
        pa_infer_per_s=sum(pa_rates) / len(pa_rates),
        latency_p50_ms=percentile([r["latency_ms"] for r in reqs if "latency_ms" in r], 50),
        latency_p99_ms=percentile([r["latency_ms"] for r in reqs if "latency_ms" in r], 99),
        ttft_p50_ms=percentile([r["ttft_ms"] for r in reqs if "ttft_ms" in r], 50),
        ttft_p99_ms=percentile([r["ttft_ms"] for r in reqs if "ttft_ms" in r], 99),
        itl_p50_ms=percentile([r["itl_ms"] for r in reqs if "itl_ms" in r], 50),
        held=held_s / span_s if span_s else None, hit_rate=hit_rate, run_rates=run_rates, acceptance=acceptance, errors=errors,
    )


def run_point(a: argparse.Namespace, mode: str, concurrency: int, input_path: Path, n_prompts: int,
              repeat: int | None = None) -> Run:
    stem = a.out / (f"{mode}_c{concurrency}" + (f"_r{repeat}" if repeat is not None else ""))
    csv_path, export_path = stem.with_suffix(".csv"), stem.with_suffix(".json")
    # one thread per request in flight, as the input data's order assumes (make_input_data.thread_order)
    cmd = [str(PERF_ANALYZER), "-m", a.model, "-u", a.url, "-i", "grpc", "--async", "--streaming",
           "--concurrency-range", str(concurrency), "--max-threads", str(concurrency), "--input-data", str(input_path),
           "-f", str(csv_path), "--profile-export-file", str(export_path)]
    if a.measurement_interval:
        cmd += ["--measurement-interval", str(a.measurement_interval), "--stability-percentage", str(a.stability)]
    else:
        count = a.request_count or n_prompts * concurrency
        cmd += ["--request-count", str(count)]
    log = stem.with_suffix(".log")
    returncode, deltas = run_perf_analyzer(cmd, export_path, log, a.timeout_s, a.metrics_url)
    if returncode != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise ClientError(f"perf_analyzer failed (exit {returncode}) for {mode} c={concurrency}:\n{tail}")
    stem.with_suffix(".metrics.json").write_text(json.dumps(deltas, indent=1))
    return csv_path, export_path, deltas


def run_perf_analyzer(cmd: list[str], export_path: Path, log: Path, timeout_s: float,
                      metrics_url: str | None = None, attempts: int = 3) -> tuple[int, dict[str, float]]:
    """Run perf_analyzer `cmd` (which writes --profile-export-file `export_path`), its output into
    `log`: its exit status, and the server metrics' change over the run (metric_deltas; empty
    without `metrics_url`).

    perf_analyzer 2.51 records an output that a response lacks with bytes that are not that output's
    (measured: floats such as 4.06e31 and -2.0e-43 where no value was sent). Our responses, like
    TensorRT-LLM's backend, leave out the outputs that do not apply (cum_log_probs unless
    return_log_probs, the totals before the final response). When such bytes read as a float NaN
    or infinity, rapidjson's Writer refuses the value and stops, and its 64 KiB buffer is never
    flushed (perf_analyzer's profile_data_exporter.cc, OutputToFile): the export is empty or cut at
    a 64 KiB boundary while perf_analyzer exits 0. About one small run in fifteen here. Such a run
    is run again, up to `attempts` times; the metrics are those of the run that counts."""
    returncode, deltas = -1, {}
    for attempt in range(attempts):
        export_path.unlink(missing_ok=True)   # perf_analyzer refuses to overwrite an export (a re-run into --out)
        before = scrape_metrics(metrics_url)
        with log.open("w") as f:
            f.write(" ".join(cmd) + "\n")
            f.flush()
            returncode = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, timeout=timeout_s).returncode
        deltas = metric_deltas(before, scrape_metrics(metrics_url)) if metrics_url else {}
        if returncode != 0 or _whole_json(export_path):
            break
        size = export_path.stat().st_size if export_path.exists() else 0
        print(f"  perf_analyzer exited 0 with an empty or cut-off profile export ({size} bytes, "
              f"{export_path.name}); running it again", file=sys.stderr, flush=True)
    return returncode, deltas


def _whole_json(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def warm_up(a: argparse.Namespace, req: GenerateRequest) -> None:
    """A few unmeasured requests so a mode's first point does not pay one-time start-up costs."""
    if a.warmup <= 0:
        return
    import tritonclient.grpc as grpcclient

    from clients.grpc_stream import stream_generate

    print(f"  warming up {req.decoding_mode} ({a.warmup} request(s)) ...", flush=True)
    client = grpcclient.InferenceServerClient(a.url)
    try:
        for _ in range(a.warmup):
            stream_generate(client, req, a.model, a.shapes)
    finally:
        client.close()


# ---- report ----------------------------------------------------------------------------------

def _fmt(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def _pct(v: float | None) -> str:
    return "–" if v is None else f"{100 * v:.0f}%"


def _throughput(r: Row) -> float:
    return r.tokens_per_s if r.tokens_per_s is not None else r.infer_per_s


def advantage_line(rows: list[Row], base: str = "sd") -> str:
    """Where ssd's throughput lead over `base` (sd or ar) ends, from the data, and the likely cause."""
    by = {(r.mode, r.concurrency): r for r in rows}
    cs = sorted(c for m, c in by if m == "ssd" and (base, c) in by)
    if not cs:
        return f"ssd vs {base}: not both measured."
    unit = "tokens/s" if all(by[(m, c)].tokens_per_s is not None for c in cs for m in ("ssd", base)) else "infer/s"
    ratios = {c: _throughput(by[("ssd", c)]) / _throughput(by[(base, c)]) if _throughput(by[(base, c)]) else math.inf
              for c in cs}
    listed = ", ".join(f"c={c}: {ratios[c]:.2f}x" for c in cs)
    lost = [c for c in cs if ratios[c] <= 1.0]
    if not lost:
        return f"ssd stays ahead of {base} at every measured concurrency (ssd/{base} {unit}: {listed})."
    if lost[0] == cs[0]:
        return f"ssd is not faster than {base} even at concurrency {cs[0]} (ssd/{base} {unit}: {listed})."
    c = lost[0]
    why = ""
    hit = by[("ssd", c)].hit_rate
    if hit is not None:
        # docs/design.md, "Backups": with b sequences per round a round stalls on the backup unless all hit.
        why = (f" Expected cause (docs/design.md, section Backups): a batched round avoids the backup only when every sequence"
               f" hits, about p_hit^b = {hit:.2f}^{c} = {hit ** c:.2f} at b ≈ {c}; the pre-drafting fan-out"
               f" also competes with verification for the same cores as the batch grows.")
        if base == "ar":
            why += (" Against AR also: each sequence adds K+1 positions to a speculative verify but one to an"
                    " AR step, so once the batch makes the target compute-bound the rejected positions cost"
                    " more than speculation saves.")
    return f"ssd's advantage over {base} disappears at concurrency {c} (ssd/{base} {unit}: {listed}).{why}"


# two-sided 95% Student t quantiles by degrees of freedom (1-30), the normal one above
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
       2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def paired_interval(ratios: list[float]) -> tuple[float, float, float]:
    """The geometric mean of paired run ratios and its 95% confidence interval (Student t on the
    logs): how well a point's runs pin down a mode's ratio on a host whose speed drifts."""
    logs = [math.log(r) for r in ratios]
    n = len(logs)
    mean = sum(logs) / n
    sd = math.sqrt(sum((x - mean) ** 2 for x in logs) / (n - 1))
    half = (T95[n - 2] if n - 1 <= len(T95) else 1.960) * sd / math.sqrt(n)
    return math.exp(mean), math.exp(mean - half), math.exp(mean + half)


def spread_line(rows: list[Row], base: str = "ar") -> str | None:
    """ssd/`base` run by run, the runs of a point paired in order (with --repeats the modes take
    turns, so a pair ran minutes apart at most): how far the host moved a point, and the 95%
    confidence interval of the pairs' geometric mean. None with one run."""
    by = {(r.mode, r.concurrency): r for r in rows}
    spans = []
    for c in sorted(c for m, c in by if m == "ssd" and (base, c) in by):
        pairs = [s / b for s, b in zip(by[("ssd", c)].run_rates, by[(base, c)].run_rates) if b and s]
        if len(pairs) > 1:
            mean, low, high = paired_interval(pairs)
            spans.append(f"c={c}: {min(pairs):.2f}-{max(pairs):.2f}x, {mean:.2f}x ({low:.2f}-{high:.2f})")
    return (f"ssd/{base} run by run (the runs of a point paired in order): the range, then their geometric mean "
            f"(95% confidence interval): {'; '.join(spans)}.") if spans else None


def write_report(rows: list[Row], out: Path, title: str = "Saguaro on Triton: concurrency sweep") -> tuple[Path, Path]:
    import matplotlib
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: (["ssd", "sd", "ar"].index(r.mode) if r.mode in ("ssd", "sd", "ar") else 9,
                                       r.concurrency))
    lines = [f"# {title}", "",
             "| mode | concurrency | requests | infer/s | tokens/s | at C | p50 latency ms | p99 latency ms "
             "| p50 TTFT ms | p99 TTFT ms | p50 ITL ms | hit rate | acceptance | errors |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.mode} | {r.concurrency} | {r.requests} | {_fmt(r.infer_per_s, 2)} | {_fmt(r.tokens_per_s)} "
                     f"| {_pct(r.held)} | {_fmt(r.latency_p50_ms)} | {_fmt(r.latency_p99_ms)} | {_fmt(r.ttft_p50_ms)} "
                     f"| {_fmt(r.ttft_p99_ms)} | {_fmt(r.itl_p50_ms, 2)} | {_fmt(r.hit_rate, 3)} "
                     f"| {_fmt(r.acceptance, 3)} | {r.errors} |")
    c1 = {r.mode: r for r in rows if r.concurrency == 1}
    lines += ["", advantage_line(rows, "sd"), "", advantage_line(rows, "ar")]
    spread = spread_line(rows, "ar")
    if spread:
        lines += ["", spread]
    if "ssd" in c1 and _throughput(c1["ssd"]):
        ratios = [f"ssd/{m} {_throughput(c1['ssd']) / _throughput(c1[m]):.2f}x" for m in ("sd", "ar")
                  if m in c1 and _throughput(c1[m])]
        if ratios:
            lines.append(f"At concurrency 1: {', '.join(ratios)}.")
    ks = requested_ks(out)
    if ks:
        lines += ["", "num_draft_tokens per request: " + ", ".join(f"{m} K={k}" for m, k in ks.items())
                  + " (other modes: the server's default)."]
    lines += ["", "Latency: send to last response; TTFT: send to first response; ITL: (last - first piece) /"
              " (tokens - 1); throughput: requests and generated tokens over the wall time from the first send to"
              " the last response; at C: the share of that wall time with all C requests in flight; all from"
              " perf_analyzer's profile export. Hit rate = cache_hits / (hits + misses)"
              " and acceptance = accepted / drafted from the server's saguaro_* counters over the run"
              " (acceptance falls back to the requests' own totals)."]
    md = out / "report.md"
    md.write_text("\n".join(lines) + "\n")

    fig, (ax_t, ax_l) = plt.subplots(1, 2, figsize=(11, 4.2))
    tokens = all(r.tokens_per_s is not None for r in rows)
    for mode in dict.fromkeys(r.mode for r in rows):
        pts = [r for r in rows if r.mode == mode]
        cs = [r.concurrency for r in pts]
        ax_t.plot(cs, [_throughput(r) for r in pts], marker="o", label=mode)
        ax_l.plot(cs, [r.latency_p50_ms or math.nan for r in pts], marker="o", label=f"{mode} p50")
        ax_l.plot(cs, [r.latency_p99_ms or math.nan for r in pts], marker="x", linestyle="--",
                  color=ax_l.lines[-1].get_color(), label=f"{mode} p99")
    ax_t.set(xlabel="concurrency", ylabel="tokens/s" if tokens else "infer/s", title="Throughput")
    ax_t.set_ylim(bottom=0)
    ax_l.set(xlabel="concurrency", ylabel="latency (ms)", title="Request latency")
    for ax in (ax_t, ax_l):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.concurrency for r in rows}), [str(c) for c in sorted({r.concurrency for r in rows})])
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    png = out / "report.png"
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return md, png


RUN_NAME = re.compile(r"(\w+?)_c(\d+)(?:_r(\d+))?")   # <mode>_c<C>[_r<i>], a point's run's files


def _run_order(csv_path: Path) -> tuple[str, int]:
    """By point, then run index as a number (r10 after r9)."""
    m = RUN_NAME.fullmatch(csv_path.stem)
    return (csv_path.stem, -1) if m is None else (f"{m.group(1)}_c{m.group(2)}", int(m.group(3) or -1))


def rows_from_dir(out: Path) -> list[Row]:
    """Rebuilds the rows from a sweep directory's <mode>_c<C>[_r<i>].{csv,json,metrics.json} files."""
    points: dict[tuple[str, int], list[Run]] = {}
    for csv_path in sorted(out.glob("*_c*.csv"), key=_run_order):
        m = RUN_NAME.fullmatch(csv_path.stem)
        export = csv_path.with_suffix(".json")
        if not m or not export.exists():
            continue
        metrics = csv_path.with_suffix(".metrics.json")
        deltas = json.loads(metrics.read_text()) if metrics.exists() else {}
        points.setdefault((m.group(1), int(m.group(2))), []).append((csv_path, export, deltas))
    return [summarize_runs(mode, runs) for (mode, _), runs in points.items()]


def parse_mode_ks(spec: str, modes: list[str]) -> dict[str, int]:
    """"sd=2,ssd=3" -> {"sd": 2, "ssd": 3}: the num_draft_tokens each mode's requests carry."""
    ks = {}
    for item in filter(None, spec.split(",")):
        mode, _, k = item.partition("=")
        if mode not in modes or not k.isdigit() or int(k) < 1:
            raise ClientError(f"--num-draft-tokens {item!r}: write MODE=K with MODE one of {modes} and K >= 1")
        ks[mode] = int(k)
    return ks


def requested_ks(out: Path) -> dict[str, int]:
    """The num_draft_tokens a sweep's requests carried, per mode, from its input files."""
    ks = {}
    for path in sorted(out.glob("input_*.json")):      # input_<mode>_c<C>.json (input_<mode>.json before)
        entries = json.loads(path.read_text())["data"]
        if entries and "num_draft_tokens" in entries[0]:
            ks[re.sub(r"_c\d+$", "", path.stem.removeprefix("input_"))] = entries[0]["num_draft_tokens"][0]
    return ks


# ---- main ------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="localhost:8001", help="Triton gRPC address")
    p.add_argument("--metrics-url", default=None, help="Prometheus endpoint (default: same host, port 8002)")
    p.add_argument("--model", default="ensemble")
    p.add_argument("--prompts", type=Path, default=DEFAULT_PROMPTS_FILE)
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--modes", default="ssd,sd,ar")
    p.add_argument("--num-draft-tokens", default="", metavar="MODE=K,...",
                   help="K per mode, e.g. sd=2 (each mode at its best K; default: the server's)")
    p.add_argument("--concurrency", default="1,2,4,8")
    p.add_argument("--request-count", type=int, default=0,
                   help="requests per point (default: prompts x concurrency, every perf_analyzer thread decoding every prompt once)")
    p.add_argument("--measurement-interval", type=int, default=0, help="ms; use time windows instead of a request count")
    p.add_argument("--stability", type=float, default=999, help="perf_analyzer --stability-percentage (time windows)")
    p.add_argument("--timeout-s", type=float, default=1800, help="per perf_analyzer run")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured requests per mode before its first point")
    p.add_argument("--repeats", type=int, default=1, help="runs per point, the modes' order rotating between them")
    p.add_argument("--out", type=Path, default=Path("runs") / time.strftime("sweep-%Y%m%d-%H%M%S"))
    p.add_argument("--report-only", type=Path, default=None, metavar="DIR", help="rewrite DIR's report from its exports")
    a = p.parse_args()

    if a.report_only:
        md, png = write_report(rows_from_dir(a.report_only), a.report_only)
        print(md.read_text())
        print(f"wrote {md} and {png}")
        return

    a.metrics_url = a.metrics_url or metrics_url_for(a.url)
    a.shapes = check_ready(a.url, a.model, "grpc")
    a.out.mkdir(parents=True, exist_ok=True)
    modes = a.modes.split(",")
    levels = [int(c) for c in a.concurrency.split(",")]
    prompts = load_prompts(a.prompts)[: a.num_prompts]
    if a.repeats < 1:
        raise ClientError(f"--repeats {a.repeats}: run every point at least once")
    total, step = len(modes) * len(levels) * a.repeats, 0
    ks = parse_mode_ks(a.num_draft_tokens, modes)
    inputs = {}
    for mode in modes:
        request = GenerateRequest(prompts[0], max_tokens=a.max_tokens, temperature=a.temperature,
                                  num_draft_tokens=ks.get(mode), decoding_mode=mode)
        for c in levels:
            inputs[(mode, c)] = write_input_data(a.out / f"input_{mode}_c{c}.json", prompts, request, concurrency=c)
        warm_up(a, request)
    runs: dict[tuple[str, int], list[Run]] = {}
    rows: dict[tuple[str, int], Row] = {}
    # Concurrency by concurrency, the modes back to back (and, with --repeats, taking turns first):
    # on a shared machine that drifts, the modes compared at one level are measured together.
    for c in levels:
        for rep in range(a.repeats):
            for mode in modes[rep % len(modes):] + modes[: rep % len(modes)]:
                step += 1
                print(f"[{step}/{total}] {mode} concurrency {c}: running perf_analyzer ...", flush=True)
                t0 = time.monotonic()
                runs.setdefault((mode, c), []).append(
                    run_point(a, mode, c, inputs[(mode, c)], len(prompts), rep if a.repeats > 1 else None))
                row = rows[(mode, c)] = summarize_runs(mode, runs[(mode, c)])
                print(f"[{step}/{total}] {mode} concurrency {c}: {row.requests} requests so far, last run "
                      f"{time.monotonic() - t0:.0f} s; {_fmt(row.tokens_per_s)} tokens/s, p50 latency "
                      f"{_fmt(row.latency_p50_ms, 0)} ms, hit rate {_fmt(row.hit_rate, 2)}, acceptance "
                      f"{_fmt(row.acceptance, 2)}, errors {row.errors}", flush=True)
                (a.out / "rows.json").write_text(json.dumps([asdict(r) for r in rows.values()], indent=1))
    md, png = write_report(list(rows.values()), a.out)
    print("\n" + md.read_text())
    print(f"wrote {md} and {png}")


if __name__ == "__main__":
    sys.exit(cli(main))
