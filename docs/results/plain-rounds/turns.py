"""ar and ssd requests on two identically built decoders (the served ssd model's), taking turns of 16
rounds (bench.run_side_by_side, staggered): tok/s and per-round forward medians of full-batch plain rounds."""
import os, sys, time, statistics as st
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[3] / "backend"))
from saguaro.llm import build_decoder
from saguaro.config import EngineConfig, SamplingParams, SpecConfig, DEV_PROMPTS, DEMO_TARGET, DEMO_DRAFT
from saguaro.bench import load_prompts, Run, run_side_by_side
from saguaro.text import load_tokenizer, encode_prompt


def timed(dec, per):
    eng = dec.target
    depth = [0]
    for name in ("forward", "forward_greedy"):
        f = getattr(eng, name)
        def wrap(*a, _f=f, **k):
            depth[0] += 1
            t = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                depth[0] -= 1
                if depth[0] == 0:
                    per.append(time.perf_counter() - t)
        setattr(eng, name, wrap)


def main():
    temp = float(os.environ.get("T", "0.7")); batch = int(os.environ.get("B", "4")); n = int(os.environ.get("N", "16"))
    tok = load_tokenizer(str(DEMO_TARGET))
    ids = [encode_prompt(tok, p) for p in load_prompts(DEV_PROMPTS, n)]
    cores = os.cpu_count()
    params = SamplingParams(max_tokens=128, temperature=temp, seed=1 if temp > 0 else None)
    runs, per = [], {}
    for mode in ("ar", "ssd"):
        dec = build_decoder(EngineConfig(checkpoint=str(DEMO_TARGET), max_slots=16, prefill_threads=cores),
                            EngineConfig(checkpoint=str(DEMO_DRAFT), max_slots=16), SpecConfig(), draft_process=True,
                            draft_core=cores - 1)
        per[mode] = []
        runs.append(Run(dec, mode, params, ids[0]))
        timed(dec, per[mode])
        # per-round forward time, beside the decoder's own RoundStats
        step = dec.step
        rec = per[mode + "_rounds"] = []
        def stepped(_step=step, _per=per[mode], _rec=rec, _dec=dec):
            _per.clear()
            ev = _step()
            if _dec.history:
                _rec.append((_dec.history[-1], sum(_per) * 1e3))
            return ev
        dec.step = stepped
    for rep in range(int(os.environ.get("R", "3"))):
        run_side_by_side(runs if rep % 2 == 0 else runs[::-1], ids, batch, "turns", staggered=True)
    for r in runs:
        r.dec.close()
    for r in runs:
        rounds = per[r.mode + "_rounds"]
        plain = [(h, f) for h, f in rounds if h.batch == batch and not h.joined and not h.one_core and h.tokens == batch]
        fw = sorted(f for _, f in plain)
        out = sorted(h.wall_ms - f for h, f in plain)
        print(f"{r.mode}: {r.tokens_per_s:.1f} tok/s, rounds {len(rounds)}, one_core {sum(h.one_core for h, _ in rounds)}, "
              f"plain full-batch {len(plain)}: forward median {st.median(fw):.3f} ms (p25 {fw[len(fw)//4]:.3f}, p75 {fw[3*len(fw)//4]:.3f}), "
              f"outside the forward median {st.median(out)*1e3:.0f} us")
    print(f"ssd/ar {runs[1].tokens_per_s / runs[0].tokens_per_s:.3f}")


if __name__ == "__main__":
    main()
