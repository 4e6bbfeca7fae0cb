"""Unit tests of the sweep's parsing and report writing, on real perf_analyzer exports.

tests/data/perf_sample/ was produced by tests/data/make_perf_sample.py: perf_analyzer 2.51 against
a toy decoupled `ensemble` (8 tokens per request; ssd 2 ms, sd 3 ms, ar 4 ms per token) served
by the pip tritonserver. No server is needed here.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root holds clients/
from clients.common import (  # noqa: E402
    GenerateRequest, Generation, build_inputs, metrics_url_for, shapes_from_metadata,
)
from clients.perf.make_input_data import build_input_data, thread_order  # noqa: E402
from clients.perf.sweep import (  # noqa: E402
    ClientError, Row, _run_order, _whole_json, advantage_line, held_seconds, metric_deltas, parse_csv, parse_export, parse_mode_ks, parse_prometheus,
    paired_interval, percentile, rows_from_dir, run_perf_analyzer, speculative_rates, spread_line, write_input_data, write_report,
)

SAMPLE = Path(__file__).resolve().parent / "data" / "perf_sample"


def test_parse_csv_reads_perf_analyzer_columns() -> None:
    stats = parse_csv(SAMPLE / "ssd_c1.csv")
    assert stats["Concurrency"] == 1
    assert stats["Inferences/Second"] > 0
    assert stats["p50 latency"] <= stats["p99 latency"]


def test_parse_export_reads_totals_from_final_response_only() -> None:
    # Intermediate responses carry only text; perf_analyzer exports their missing totals as garbage.
    raw = json.loads((SAMPLE / "ssd_c2.json").read_text())
    garbage = [o["generated_tokens"] for r in raw["experiments"][0]["requests"] for o in r["response_outputs"][:-1]]
    assert any(g not in (0, 8) for g in garbage), "sample no longer exercises garbage outputs"
    exp = parse_export(SAMPLE / "ssd_c2.json")[0]
    assert exp["concurrency"] == 2
    assert exp["span_s"] > 0
    for r in exp["requests"]:
        assert r["generated_tokens"] == 8 and r["rounds"] == 4 and r["drafted_tokens"] == 12
        assert r["responses"] == 9  # 8 pieces + the totals
        assert 0 < r["ttft_ms"] < r["latency_ms"]
        assert 1.5 < r["itl_ms"] < 20  # the toy sleeps 2 ms per ssd token


def test_percentile_matches_numpy_linear() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == pytest.approx(2.5)
    assert percentile([float(i) for i in range(101)], 99) == pytest.approx(99.0)


def test_prometheus_scrape_and_rates() -> None:
    scraped = parse_prometheus((SAMPLE / "metrics.txt").read_text())
    assert scraped["saguaro_cache_hits_total"] > 0 and "nv_inference_request_success" in scraped
    before = {k: v / 2 for k, v in scraped.items()}
    deltas = metric_deltas(before, scraped)
    assert all(k.startswith("saguaro_") or k == "nv_inference_request_failure" for k in deltas)
    hit, acc = speculative_rates(deltas)
    total = scraped["saguaro_cache_hits_total"] + scraped["saguaro_cache_misses_total"]
    assert hit == pytest.approx(scraped["saguaro_cache_hits_total"] / total)
    assert acc == pytest.approx(scraped["saguaro_accepted_tokens_total"] / scraped["saguaro_drafted_tokens_total"])


def test_prometheus_sums_label_sets_and_accepts_names_without_total() -> None:
    text = ('# TYPE saguaro_cache_misses counter\nsaguaro_cache_misses{backup="neural"} 3\n'
            'saguaro_cache_misses{backup="fast"} 1\nsaguaro_cache_hits 12\n')
    assert speculative_rates(parse_prometheus(text)) == (pytest.approx(0.75), None)
    assert speculative_rates({}) == (None, None)


def test_rows_from_sample_sweep() -> None:
    rows = {(r.mode, r.concurrency): r for r in rows_from_dir(SAMPLE)}
    assert set(rows) == {(m, c) for m in ("ssd", "sd", "ar") for c in (1, 2)}
    for r in rows.values():
        assert r.errors == 0 and r.requests >= 4
        assert r.tokens_per_s == pytest.approx(8 * r.infer_per_s)
        assert r.latency_p50_ms is not None and r.ttft_p50_ms is not None and r.itl_p50_ms is not None
    assert rows[("ssd", 1)].hit_rate == pytest.approx(0.75)
    assert rows[("sd", 1)].hit_rate is None and rows[("ar", 1)].acceptance is None
    # The toy's per-token cost orders the modes.
    assert rows[("ssd", 1)].tokens_per_s > rows[("sd", 1)].tokens_per_s > rows[("ar", 1)].tokens_per_s


def test_write_report_table_and_plot(tmp_path: Path) -> None:
    for f in SAMPLE.iterdir():
        shutil.copy(f, tmp_path / f.name)
    md, png = write_report(rows_from_dir(tmp_path), tmp_path)
    text = md.read_text()
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| mode | concurrency |") and "p99 latency ms" in table[0] and "TTFT" in table[0]
    assert [line.split("|")[1].strip() for line in table[1:]] == ["ssd", "ssd", "sd", "sd", "ar", "ar"]
    assert "ssd stays ahead of sd at every measured concurrency" in text
    assert "At concurrency 1: ssd/sd" in text
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def _row(mode: str, c: int, tps: float, hit: float | None = None) -> Row:
    return Row(mode, c, 8, tps / 100, tps, tps / 100, 1.0, 2.0, 0.1, 0.2, 0.01, 1.0, hit, 0.5, 0)


def test_advantage_line_finds_where_ssd_stops_beating_sd() -> None:
    rows = [_row("ssd", 1, 200, 0.8), _row("sd", 1, 150), _row("ssd", 2, 260, 0.8), _row("sd", 2, 240),
            _row("ssd", 4, 290, 0.7), _row("sd", 4, 300), _row("ssd", 8, 300, 0.7), _row("sd", 8, 330)]
    line = advantage_line(rows)
    assert line.startswith("ssd's advantage over sd disappears at concurrency 4")
    assert "0.70^4 = 0.24" in line
    assert "even at concurrency 1" in advantage_line([_row("ssd", 1, 100), _row("sd", 1, 120)])
    assert "stays ahead" in advantage_line([_row("ssd", 1, 130), _row("sd", 1, 120)])
    assert "not both measured" in advantage_line([_row("ar", 1, 130)])


def test_input_data_format() -> None:
    data = build_input_data(["a", "b"], GenerateRequest("", max_tokens=16, decoding_mode="sd", temperature=0.5))
    assert data == {"data": [
        {"text_input": [p], "max_tokens": [16], "stream": [True], "decoding_mode": ["sd"], "temperature": [0.5],
         "top_p": [1.0]}   # TensorRT-LLM samples only with top_k or top_p: a temperature comes with top_p 1
        for p in ("a", "b")]}
    sd_k2 = GenerateRequest("", max_tokens=16, decoding_mode="sd", num_draft_tokens=2)
    assert build_input_data(["a"], sd_k2)["data"][0]["num_draft_tokens"] == [2]


@pytest.mark.parametrize("n_prompts", [1, 2, 3, 8])
@pytest.mark.parametrize("concurrency", [1, 2, 3, 4, 8])
def test_every_perf_analyzer_thread_decodes_every_prompt(n_prompts: int, concurrency: int) -> None:
    # perf_analyzer's thread i of C sends entries i, i + C, i + 2C, ... of the input data
    # (make_input_data's docstring cites the source), and with --request-count prompts x C each
    # thread sends `prompts` requests
    order = thread_order(n_prompts, concurrency)
    assert len(order) == n_prompts * concurrency
    per_thread = [[order[(i + k * concurrency) % len(order)] for k in range(n_prompts)] for i in range(concurrency)]
    for prompts in per_thread:
        assert sorted(prompts) == list(range(n_prompts))          # every prompt, once
    for k in range(n_prompts):                                   # in flight together: different prompts
        at_once = [prompts[k] for prompts in per_thread]
        assert len(set(at_once)) == min(concurrency, n_prompts)
    data = build_input_data(["a", "b"], GenerateRequest("", max_tokens=16), concurrency=2)
    assert [e["text_input"][0] for e in data["data"]] == ["a", "b", "b", "a"]   # thread 0: a, b; thread 1: b, a


def test_held_concurrency_share() -> None:
    # two requests in flight over [0, 2] s and [1, 4] s (send, last response): both in flight for 1 s
    req = lambda t0, t1: {"timestamp": int(t0 * 1e9), "response_timestamps": [int(t0 * 1e9) + 5, int(t1 * 1e9)]}
    assert held_seconds([req(0, 2), req(1, 4)], 2) == pytest.approx(1.0)
    assert held_seconds([req(0, 2), req(1, 4)], 1) == pytest.approx(4.0)
    assert held_seconds([req(0, 2), req(2, 4)], 1) == pytest.approx(4.0)   # the next sent as one ends
    for r in rows_from_dir(SAMPLE):
        assert 0.0 < r.held <= 1.0


def test_per_mode_draft_length_reaches_the_requests_and_the_report(tmp_path: Path) -> None:
    # Each mode at its best K: the sweep sends sd's own K and the report says which K each mode ran.
    assert parse_mode_ks("sd=2,ssd=3", ["ssd", "sd", "ar"]) == {"sd": 2, "ssd": 3}
    for bad in ("xd=2", "sd=0", "sd", "sd=two"):
        with pytest.raises(ClientError, match="MODE=K"):
            parse_mode_ks(bad, ["ssd", "sd", "ar"])
    out = tmp_path / "sweep"
    shutil.copytree(SAMPLE, out)
    write_input_data(out / "input_sd.json", ["a"], GenerateRequest("", max_tokens=16, decoding_mode="sd",
                                                                   num_draft_tokens=2))
    write_input_data(out / "input_ssd.json", ["a"], GenerateRequest("", max_tokens=16, decoding_mode="ssd"))
    md, _ = write_report(rows_from_dir(out), out)
    assert "num_draft_tokens per request: sd K=2 (other modes: the server's default)." in md.read_text()


def test_generation_timing_and_request_fields() -> None:
    gen = Generation(pieces=["a", "bc", "d"], piece_times=[0.1, 0.2, 0.4], totals={"generated_tokens": 5})
    assert gen.ttft_s == 0.1 and gen.itl_s == pytest.approx(0.3 / 4)
    req = GenerateRequest("hi", max_tokens=4, decoding_mode="ar", seed=1)
    assert req.fields() == {"text_input": "hi", "max_tokens": 4, "stream": True, "seed": 1, "decoding_mode": "ar"}
    assert metrics_url_for("127.0.0.1:8001") == "http://127.0.0.1:8002/metrics"


def test_build_inputs_follows_the_model_metadata_shapes() -> None:
    # max_batch_size 0 with dims [1] -> [1]; max_batch_size > 0 adds a -1 batch dim -> [1, 1].
    for meta_shape, want in (([1], [1]), ([-1, 1], [1, 1]), (["-1", "1"], [1, 1])):
        meta = [{"name": n, "shape": meta_shape} for n in ("text_input", "max_tokens", "stream")]
        shapes = shapes_from_metadata(meta)
        inputs = build_inputs(GenerateRequest("hi", max_tokens=4), shapes)
        assert [(i.name(), i.shape(), i.datatype()) for i in inputs] == [
            ("text_input", want, "BYTES"), ("max_tokens", want, "INT32"), ("stream", want, "BOOL")]


def test_repeated_runs_of_a_point_pool_into_one_row(tmp_path: Path) -> None:
    # --repeats writes <mode>_c<C>_r<i>.*: a point's runs pool their requests and add their wall times.
    for rep in range(2):
        for suffix in (".csv", ".json", ".metrics.json"):
            shutil.copy(SAMPLE / f"ssd_c1{suffix}", tmp_path / f"ssd_c1_r{rep}{suffix}")
    single = {(r.mode, r.concurrency): r for r in rows_from_dir(SAMPLE)}[("ssd", 1)]
    (pooled,) = rows_from_dir(tmp_path)
    assert (pooled.mode, pooled.concurrency, pooled.requests) == ("ssd", 1, 2 * single.requests)
    assert pooled.tokens_per_s == pytest.approx(single.tokens_per_s)
    assert pooled.hit_rate == pytest.approx(single.hit_rate)
    assert pooled.run_rates == pytest.approx([single.tokens_per_s] * 2)


def test_spread_line_pairs_the_runs_of_a_point(tmp_path: Path) -> None:
    # runs r0..r10 (r10 sorts after r9, not after r1), ssd's rates against ar's run by run
    ar = _row("ar", 1, 100)
    ssd = _row("ssd", 1, 100)
    ar.run_rates, ssd.run_rates = [100.0, 100.0, 200.0], [90.0, 110.0, 200.0]
    assert spread_line([ssd, ar], "ar") == ("ssd/ar run by run (the runs of a point paired in order): the range, then "
                                            "their geometric mean (95% confidence interval): c=1: 0.90-1.10x, 1.00x (0.78-1.28).")
    assert spread_line([_row("ssd", 1, 100), _row("ar", 1, 100)], "ar") is None     # one run a point
    stems = [f"ssd_c1_r{i}" for i in (10, 2, 0, 1, 9)]
    assert [p.stem for p in sorted((tmp_path / f"{s}.csv" for s in stems), key=_run_order)] == \
        ["ssd_c1_r0", "ssd_c1_r1", "ssd_c1_r2", "ssd_c1_r9", "ssd_c1_r10"]


def test_paired_interval_is_student_t_on_the_logs() -> None:
    # logs of 0.9, 1.1, 1.0: mean -0.00335, sd 0.1004; t(0.975, 2) = 4.303
    mean, low, high = paired_interval([0.9, 1.1, 1.0])
    assert mean == pytest.approx(0.99665, abs=1e-5)
    assert (low, high) == (pytest.approx(0.7767, abs=1e-4), pytest.approx(1.2789, abs=1e-4))
    assert paired_interval([1.05] * 4) == pytest.approx((1.05, 1.05, 1.05))    # runs that agree pin it down
    # past 31 pairs the normal quantile: 40 pairs of logs +-0.1 (sd 0.1013), half-width 1.96 * sd / sqrt(40)
    mean, low, high = paired_interval([math.exp(0.1), math.exp(-0.1)] * 20)
    assert mean == pytest.approx(1.0)
    assert math.log(high) == pytest.approx(1.96 * math.sqrt(0.4 / 39) / math.sqrt(40), rel=1e-6)


def test_an_export_cut_off_mid_file_is_not_taken_as_whole(tmp_path: Path) -> None:
    """perf_analyzer 2.51 now and then exits 0 having written its export only up to a 64 KiB
    boundary: the sweep runs such a point again rather than failing when it parses it."""
    export = SAMPLE / "ar_c1.json"
    text = export.read_text()
    cut = tmp_path / "cut.json"
    cut.write_text(text[: len(text) // 2])
    assert _whole_json(export) and not _whole_json(cut) and not _whole_json(tmp_path / "missing.json")


def test_a_run_whose_export_is_not_whole_runs_again(tmp_path: Path) -> None:
    """run_perf_analyzer's retry, driven by a script in perf_analyzer's place (the retry is ours to
    test; the real perf_analyzer runs in test_nvidia_inputs.py and test_clients.py): an exit 0 with
    an empty, then a cut-off export is run again; a whole one ends it; a failing exit is not retried."""
    export, log, calls = tmp_path / "export.json", tmp_path / "pa.log", tmp_path / "calls"
    whole = (SAMPLE / "ar_c1.json").read_text()
    script = tmp_path / "pa.sh"
    script.write_text(f"""#!/bin/sh
echo run >> {calls}
n=$(wc -l < {calls})
[ "$n" = 1 ] && : > {export}
[ "$n" = 2 ] && head -c 100 {SAMPLE / "ar_c1.json"} > {export}
[ "$n" -ge 3 ] && cp {SAMPLE / "ar_c1.json"} {export}
exit 0
""")
    script.chmod(0o755)
    assert run_perf_analyzer([str(script)], export, log, timeout_s=30) == (0, {})
    assert calls.read_text().count("run") == 3 and export.read_text() == whole
    calls.unlink()
    assert run_perf_analyzer([str(script)], export, log, timeout_s=30, attempts=2)[0] == 0
    assert calls.read_text().count("run") == 2 and not _whole_json(export)     # attempts spent: the caller sees it
    script.write_text("#!/bin/sh\necho failed\nexit 3\n")
    calls.unlink()
    assert run_perf_analyzer([str(script)], export, log, timeout_s=30)[0] == 3
    assert "failed" in log.read_text()
