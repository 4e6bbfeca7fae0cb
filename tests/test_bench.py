"""The benchmark command end to end on a tiny run: every mode reports, SSD's greedy output equals AR's."""
import json

from saguaro import bench


def test_bench_side_by_side_report(tmp_path, capsys):
    bench.main(["--limit", "2", "--max-new-tokens", "12", "--modes", "ar,sd,ssd", "--threads", "1",
                "--sd-k", "2", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    modes = report["modes"]
    assert set(modes) == {"ar", "sd", "ssd"}
    for m in modes.values():
        assert m["tokens_per_s"] > 0
        assert [len(o) for o in m["outputs"]] == [12, 12]
    assert modes["sd"]["outputs"] == modes["ar"]["outputs"] == modes["ssd"]["outputs"]
    assert modes["sd"]["draft_dtype"] in ("float32", "bfloat16")
    assert 0.0 <= modes["ssd"]["cache_hit_rate"] <= 1.0
    out = capsys.readouterr().out
    assert "greedy outputs identical to AR: ssd 2/2" in out
    ssd = modes["ssd"]   # the bound: the same rounds with nothing but the verify
    assert ssd["verify_bound_tokens_per_s"] >= ssd["decode_tokens_per_s"]
    assert "ssd decode bound with drafting fully hidden" in out
    assert (tmp_path / "bench.png").stat().st_size > 0
