"""The benchmark command end to end on a tiny run: every mode reports, SSD's greedy output equals
AR's, the round policy's mix and prediction are reported; the grid runs every cell and judges it."""
import json
from pathlib import Path

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
    assert modes["sd"]["draft_dtype"] in ("float32", "float32/bfloat16", "bfloat16")
    out = capsys.readouterr().out
    assert "greedy outputs identical to AR: ssd 2/2" in out
    ssd = modes["ssd"]   # the bound: the same rounds with nothing but the verify
    assert ssd["verify_bound_tokens_per_s"] >= ssd["decode_tokens_per_s"]
    assert "ssd decode bound with drafting fully hidden" in out
    # the policy's mix of round types over the decode sequence-rounds, and its K histogram
    assert set(ssd["round_mix"]) == {"ar", "sd", "ssd"} and abs(sum(ssd["round_mix"].values()) - 1) < 1e-9
    assert all(1 <= int(k) <= 6 for k in ssd["k_histogram"]) and ssd["options"]
    assert "ssd policy mix (decode sequence-rounds): AR" in out
    assert (tmp_path / "bench.png").stat().st_size > 0


def _report(ar, sd, ssd, temperature="0.0", same=True, predicted=100.0, measured=95.0):
    outputs = [[1, 2]] if same else [[1, 3]]
    mode = lambda tps, out=[[1, 2]], **kw: {"tokens_per_s": tps, "outputs": out, "predicted_tokens_per_s": None,
                                            "measured_tokens_per_s": None, "round_mix": None, **kw}
    return {"settings": {"temperature": temperature},
            "modes": {"ar": mode(ar), "sd": mode(sd), "ssd": mode(ssd, outputs, predicted_tokens_per_s=predicted,
                                                                measured_tokens_per_s=measured,
                                                                round_mix={"ar": 0.5, "sd": 0.2, "ssd": 0.3})}}


def test_grid_row_judges_a_cell_against_the_bar():
    row = bench.grid_row(_report(400.0, 450.0, 440.0), bar=0.97)
    assert row["ssd/max(ar,sd)"] == round(440 / 450, 3) and row["meets_bar"] and row["identical"]
    assert row["pred/meas"] == round(100 / 95, 3) and row["within_10%"]
    row = bench.grid_row(_report(400.0, 450.0, 440.0, same=False, predicted=120.0), bar=1.05)
    assert not row["meets_bar"] and not row["identical"] and not row["within_10%"]
    assert "identical" not in bench.grid_row(_report(1.0, 1.0, 1.0, temperature="0.7"), bar=0.97)


def test_grid_runs_every_cell_side_by_side(tmp_path, monkeypatch):
    seen = []

    def fake_cell(args):
        seen.append((args.temperature, args.batch_size, Path(args.prompts).name, args.modes, args.out.name))
        return _report(1.0, 1.0, 1.0, temperature=str(args.temperature))

    monkeypatch.setattr(bench, "run_cell", fake_cell)
    cells = bench.main(["--grid", "--out", str(tmp_path), "--limit", "2"])
    assert sorted((t, b, p) for t, b, p, _, _ in seen) == sorted(
        (t, b, "dev.jsonl" if p == "dev" else "heldout.jsonl") for t, b, p in bench.GRID)
    assert all(modes == "ar,sd,ssd" for *_, modes, _ in seen) and len(seen) == 8
    assert "greedy-b1-dev" in cells and cells["greedy-b1-dev"]["bar"] == 1.05
    assert json.loads((tmp_path / "grid.json").read_text()).keys() == cells.keys()


def test_modes_take_turns_of_a_few_rounds(monkeypatch):
    """The host's speed drifts within a second: the modes run the same batch in turns of
    TURN_ROUNDS rounds, each turn's time its own, and produce what they would alone."""
    from saguaro.config import DEMO_TARGET, EngineConfig, SamplingParams, SpecConfig
    from saguaro.llm import build_decoder

    monkeypatch.setattr(bench, "TURN_ROUNDS", 3)
    params = SamplingParams(max_tokens=10, temperature=0.0)
    decs = [build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=4), None, SpecConfig(), draft_process=False)
            for _ in range(2)]
    try:
        prompts = [[5, 6, 7, 8], [9, 10, 11]]
        alone = decs[0].generate(prompts, params, "ar")
        runs = [bench.Run(d, "ar", params, prompts[0]) for d in decs]
        order = []
        for i, r in enumerate(runs):
            step = r.dec.step
            monkeypatch.setattr(r.dec, "step", lambda step=step, i=i: order.append(i) or step())
        bench.run_side_by_side(runs, prompts, 2, "ar+ar")
        # one batch of two prompts: 10 rounds each (the first holds the prefill), in turns of 3
        assert order == [0, 0, 0, 1, 1, 1] * 3 + [0, 1]
        for r in runs:
            assert r.outputs == alone and r.produced == 20 and r.busy > 0
            assert [x.gap_ms for x in r.dec.history[3::3]] == [0.0] * 3   # the other mode's turn is no gap
    finally:
        for d in decs:
            d.close()


def test_staggered_arrivals_keep_a_few_in_flight_the_next_joining_as_one_finishes(monkeypatch):
    """--arrivals staggered: served requests join as others finish, and each join costs the SSD
    decoder what a batch's joins together do not (its greedy concurrency-4 loss showed there, not
    in batches): `batch` prompts in flight, the next added in the round after one finished, in
    the modes' turns, each output the prompt's own."""
    from saguaro.config import DEMO_TARGET, EngineConfig, SamplingParams, SpecConfig
    from saguaro.llm import build_decoder

    monkeypatch.setattr(bench, "TURN_ROUNDS", 3)
    decs = [build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=4), None, SpecConfig(), draft_process=False)
            for _ in range(2)]
    try:
        prompts = [[12, 13], [100, 200, 300, 400], [14, 15, 16], [5, 6, 7, 8]]
        first = decs[0].generate(prompts[:1], SamplingParams(max_tokens=6, temperature=0.0), "ar")[0]
        # the first prompt stops early (at the first token its output had not emitted before), the second later
        stop = next(i for i in range(1, len(first)) if first[i] not in first[:i])
        params = SamplingParams(max_tokens=6, temperature=0.0, stop=((first[stop],),))
        alone = [decs[0].generate([p], params, "ar")[0] for p in prompts]
        assert len(alone[0]) == stop + 1 < len(alone[1]), alone
        runs = [bench.Run(d, "ar", params, prompts[0]) for d in decs]
        in_flight = []
        for r in runs:
            step = r.dec.step
            monkeypatch.setattr(r.dec, "step", lambda step=step, d=r.dec: in_flight.append(d.active) or step())
        bench.run_side_by_side(runs, prompts, 2, "ar+ar", staggered=True)
        for r in runs:
            assert r.outputs == alone and r.produced == sum(map(len, alone))
            joins = [h.joined for h in r.dec.history]
            # the third prompt joins in the round after the first stopped, beside the second
            assert joins[:stop + 2] == [2] + [0] * stop + [1] and sum(joins) == 4, joins
        assert max(in_flight) == 2
    finally:
        for d in decs:
            d.close()


def test_a_turn_goes_on_while_the_drafter_owes_an_answer(monkeypatch):
    """An SSD decoder leaves its drafter's answers to new prompts and catch-ups unread while it
    steps on: its turn ends only once nothing is owed, or the drafter's work would run into the
    next mode's turn (taking a core from it) and be counted there."""
    from saguaro.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig, SamplingParams, SpecConfig
    from saguaro.llm import build_decoder

    monkeypatch.setattr(bench, "TURN_ROUNDS", 1)
    params = SamplingParams(max_tokens=24, temperature=0.0)
    dec = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=4, prefill_threads=2),
                        EngineConfig(checkpoint=str(DEMO_DRAFT), max_slots=4), SpecConfig(k=2, policy=False),
                        draft_process=True)   # (a policy far from paying would defer the joins: nothing owed)
    try:
        prompts = [[5, 6, 7, 8, 9, 10], [9, 10, 11, 12]]
        alone = dec.generate(prompts, params, "ssd")
        run = bench.Run(dec, "ssd", params, prompts[0])
        ends = []
        pause = dec.pause
        monkeypatch.setattr(dec, "pause", lambda: ends.append((dec.active, dec.drafter_idle, len(dec.history))) or pause())
        bench.run_side_by_side([run], prompts, 2, "ssd")
        assert run.outputs == alone
        # the first round leaves the joins' draft prefill unread: that turn runs on past one round
        assert ends[0][2] > 1, ends
        assert all(idle for active, idle, _ in ends if active), ends
    finally:
        dec.close()
