"""Side-by-side benchmark: AR vs SD vs SSD (and transformers' assisted generation) in one run.

    python -m saguaro.bench --prompts prompts/dev.jsonl --max-new-tokens 128 --batch-size 1 \
        --temperature 0 --modes ar,sd,ssd,hf --out runs/bench
    python -m saguaro.bench --grid --out runs/grid     # {greedy, T=0.7} x {batch 1, 4} x {dev, held-out}

Same models, prompts and new-token count for every mode. AR and SD run with the thread count
(and SD with the K and draft dtype) that makes them fastest here (--threads/--sd-k auto measures
it). SSD is the default decoding mode as served: the round policy picks AR, SD or SSD each round;
its draft worker has its own core, and its target one thread in rounds that pre-draft and every
core in the others (prompt prefill uses every core). The modes take turns of TURN_ROUNDS rounds
over each batch of prompts, so drift on a shared machine falls on all of them alike. Prints one summary line per mode,
the policy's mix of round types, K and B, and its predicted tokens/s beside the measured
(docs/design.md, "The speedup model"); writes report.json and a plot.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from saguaro.config import DEMO_DRAFT, DEMO_TARGET, DEV_PROMPTS, EngineConfig, SamplingParams, SpecConfig
from saguaro.decoder import Decoder, RoundStats
from saguaro.engines.torch_engine import resolve_dtype
from saguaro.model import cpu_has_fast_bf16
from saguaro.llm import build_decoder
from saguaro.text import encode_prompt, load_tokenizer

HELDOUT_PROMPTS = DEV_PROMPTS.with_name("heldout.jsonl")   # prompts/build_heldout.py: third-party code


@dataclass
class ModeResult:
    mode: str
    tokens_per_s: float
    outputs: list[list[int]]
    threads: int
    k: int
    draft_dtype: str | None = None      # the draft engine's dtype (SD tunes it; SSD uses the default)
    rounds: int = 0
    acceptance_rate: float = 0.0        # accepted / drafted draft tokens
    mean_accepted_len: float = 0.0      # tokens emitted per sequence-round, bonus included
    cache_hit_rate: float | None = None
    verify_ms: float = 0.0              # per round
    draft_ms: float = 0.0               # per round: drafting the loop waited for (SD) or hidden builds (SSD)
    exposed_draft_ms: float = 0.0       # per round: time the loop waited on the drafter
    backup_ms: float | None = None      # SSD: drafter answer time in rounds with a miss
    decode_tokens_per_s: float | None = None   # after each prompt's first token (its round excluded)
    verify_bound_tokens_per_s: float | None = None  # decode rate if rounds cost the verify alone
    round_mix: dict[str, float] | None = None   # SSD (the policy): share of decode sequence-rounds by type
    k_histogram: dict[int, int] | None = None   # K of the speculating sequence-rounds
    budget_histogram: dict[int, int] | None = None  # fan-out budget B of the pre-drafting ones
    c_histogram: dict[float, int] | None = None     # ... and their Saguaro C
    options: dict[str, int] | None = None       # the policy's choices, by option
    predicted_tokens_per_s: float | None = None  # the policy's prediction over the rounds it predicted
    measured_tokens_per_s: float | None = None   # ... and what those same rounds measured
    degraded_rounds: int = 0            # rounds run on the target alone after the drafter failed


def load_prompts(path: Path, limit: int | None) -> list[str]:
    with open(path) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()]
    return prompts[:limit] if limit else prompts


def _batches(items: list, size: int) -> list[list]:
    return [items[i:i + size] for i in range(0, len(items), size)]


TURN_ROUNDS = 16    # rounds a mode runs before the next mode takes its turn


class Run:
    """One mode's decoder and what it has produced so far. The modes take turns TURN_ROUNDS rounds
    at a time over the same batch of prompts, so the machine's drift (it is shared) falls on every
    mode alike: this host's speed moved by up to 25% within a second, and with turns of a whole
    batch (a quarter to half a second) single cells moved by 5-10% between runs."""

    def __init__(self, dec: Decoder, mode: str, params: SamplingParams, warmup: list[int]):
        self.dec, self.mode, self.params = dec, mode, params
        dec.generate([warmup], params.with_(max_tokens=16), mode)
        dec.history.clear()
        self.outputs: list[list[int]] = []
        self.produced, self.busy = 0, 0.0
        self.sums = {"drafted": 0, "accepted": 0, "seq_rounds": 0}
        self.out: dict[int, list[int]] = {}

    @property
    def tokens_per_s(self) -> float:
        return self.produced / self.busy if self.busy else 0.0

    def start(self, group: list[list[int]], in_flight: int | None = None) -> None:
        """The group's prompts: all at once, or `in_flight` at a time, the next joining as one
        finishes (as served requests do)."""
        t0 = time.perf_counter()
        self.queue, self.in_flight, self.out = list(group), in_flight or len(group), {}
        self._admit()
        self.busy += time.perf_counter() - t0

    def _admit(self) -> None:
        while self.queue and self.dec.active < self.in_flight:
            self.out[self.dec.add(self.queue.pop(0), self.params, self.mode)] = []

    def turn(self, rounds: int) -> bool:
        """Up to `rounds` rounds of the batch, and on until the drafter owes no answer (its work is
        this mode's time, and would take a core from the next mode's); True once the batch is done."""
        dec = self.dec
        t0 = time.perf_counter()
        n = 0
        while dec.active and (n < rounds or not dec.drafter_idle):
            for e in dec.step():
                self.out[e.seq_id].extend(e.tokens)
                if e.finish_reason is not None:
                    self.sums["drafted"] += e.stats.drafted
                    self.sums["accepted"] += e.stats.accepted
                    self.sums["seq_rounds"] += e.stats.rounds
            self._admit()
            n += 1
        dec.pause()
        if not dec.active:
            dec.settle()       # what the drafter still owes is this mode's time, not the next one's
            self.outputs += self.out.values()
            self.produced += sum(len(x) for x in self.out.values())
        self.busy += time.perf_counter() - t0
        return not dec.active


def run_side_by_side(runs: list[Run], ids: list[list[int]], batch: int, label: str, staggered: bool = False) -> None:
    """Every batch of prompts through every mode, the modes taking turns of TURN_ROUNDS rounds (the
    order rotating per batch), with progress. staggered: the prompts as one group, `batch` of them
    in flight, the next joining as one finishes (served requests' arrivals)."""
    for n, group in enumerate([ids] if staggered else _batches(ids, batch)):
        live = [runs[(n + i) % len(runs)] for i in range(len(runs))]
        for r in live:
            r.start(group, batch if staggered else None)
        while live:
            live = [r for r in live if not r.turn(TURN_ROUNDS)]
        rates = "  ".join(f"{r.mode} {r.tokens_per_s:6.1f}" for r in runs)
        print(f"\r[{label}] {len(ids) if staggered else min((n + 1) * batch, len(ids))}/{len(ids)} prompts, tok/s: {rates}",
              end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)


def summarize(mode: str, tps: float, outputs, rounds: list[RoundStats], sums: dict, threads: int, k: int,
              draft_dtype: str | None, budget: int, c: float = 1.0) -> ModeResult:
    r = ModeResult(mode, tps, outputs, threads, k, draft_dtype, rounds=len(rounds),
                   degraded_rounds=sum(x.degraded for x in rounds))
    if not rounds:
        return r
    mean = lambda xs: statistics.fmean(xs) if xs else 0.0
    # The decode phase: what follows a prompt's first token (its round holds the prefill and, for
    # SD and SSD, the drafter's own prefill), as time per output token is usually reported.
    decode = [x for x in rounds if not x.joined]
    decode_ms = sum(x.wall_ms for x in decode)
    r.decode_tokens_per_s = 1000.0 * sum(x.tokens for x in decode) / decode_ms if decode_ms else None
    r.verify_ms = mean([x.verify_ms for x in decode])
    r.verify_bound_tokens_per_s = 1000.0 * mean([x.tokens for x in decode]) / r.verify_ms if r.verify_ms else None
    r.exposed_draft_ms = mean([x.draft_wait_ms for x in decode])
    r.mean_accepted_len = sum(len(o) for o in outputs) / max(1, sums["seq_rounds"])
    r.acceptance_rate = sums["accepted"] / sums["drafted"] if sums["drafted"] else 0.0
    if mode == "sd":
        r.draft_ms = r.exposed_draft_ms
    if mode == "ssd":
        r.draft_ms = mean([x.build_ms for x in rounds if x.build_ms])
        looked_up = sum(x.hits + x.misses for x in rounds)
        r.cache_hit_rate = sum(x.hits for x in rounds) / looked_up if looked_up else None
        missed = [x.draft_ms for x in rounds if x.misses]
        r.backup_ms = mean(missed) if missed else None
        policy_mix(r, decode, budget, c)
    return r


def policy_mix(r: ModeResult, decode: list[RoundStats], budget: int, c: float = 1.0) -> None:
    """The policy's mix of round types, K, B and C over the decode rounds, and its predicted tokens/s
    against the measured over the rounds it predicted (not those trying an unmeasured option)."""
    kinds = {kind: sum(getattr(x, kind) for x in decode) for kind in ("ar", "sd", "ssd")}
    total = sum(kinds.values()) or 1
    r.round_mix = {kind: n / total for kind, n in kinds.items()}
    r.k_histogram = dict(sorted(Counter(k for x in decode for k in x.ks if k).items()))
    budgets: Counter = Counter()     # per pre-drafting sequence round: the policy's B and C, else the configured ones
    cs: Counter = Counter()
    for x in decode:
        if x.ssd:
            budgets[x.budget or budget] += x.ssd
            cs[c if x.saguaro_c is None else x.saguaro_c] += x.ssd
    r.budget_histogram = dict(sorted(budgets.items()))
    r.c_histogram = dict(sorted(cs.items()))
    r.options = dict(Counter(x.option for x in decode if x.option).most_common())
    predicted = [x for x in decode if x.predicted_ms]
    if predicted:
        r.predicted_tokens_per_s = 1000.0 * sum(x.predicted_tokens for x in predicted) / sum(x.predicted_ms for x in predicted)
        r.measured_tokens_per_s = (1000.0 * sum(x.tokens for x in predicted)
                                   / sum(x.wall_ms + x.gap_ms for x in predicted))


def fastest(candidates: list[tuple], trial) -> tuple:
    """The candidate whose short trial run is fastest (AR/SD threads, SD's K and draft dtype). Two
    passes in opposite orders, best of each candidate's two: a shared machine drifts, and a single
    short trial can hand a baseline the wrong setting."""
    best: dict[tuple, float] = {}
    for order in (candidates, candidates[::-1]):
        for c in order:
            best[c] = max(best.get(c, 0.0), trial(*c))
    for c in candidates:
        print(f"  tune {c}: {best[c]:.1f} tok/s", file=sys.stderr)
    return max(candidates, key=best.__getitem__)


def run_hf(target: str, draft: str, ids: list[list[int]], params: SamplingParams, k: int, threads: int) -> tuple[float, list[list[int]]]:
    """transformers' own assisted generation on the same pair: the peer a CPU user reaches for."""
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(threads)
    tgt = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32).eval()
    dft = AutoModelForCausalLM.from_pretrained(draft, dtype=torch.float32).eval()
    dft.generation_config.num_assistant_tokens = k
    dft.generation_config.num_assistant_tokens_schedule = "constant"
    dft.generation_config.assistant_confidence_threshold = 0.0
    kw = dict(max_new_tokens=params.max_tokens, min_new_tokens=params.max_tokens, assistant_model=dft,
              pad_token_id=0, eos_token_id=None)
    if not params.greedy:
        kw.update(do_sample=True, temperature=params.temperature, top_k=params.top_k or None, top_p=params.top_p)
    else:
        kw.update(do_sample=False)
    outputs, produced, busy = [], 0, 0.0
    with torch.inference_mode():
        tgt.generate(torch.tensor([ids[0]]), **{**kw, "max_new_tokens": 8, "min_new_tokens": 8})
        for n, p in enumerate(ids, 1):
            t0 = time.perf_counter()
            out = tgt.generate(torch.tensor([p]), **kw)[0, len(p):].tolist()
            busy += time.perf_counter() - t0
            outputs.append(out)
            produced += len(out)
            print(f"\r[hf] {n}/{len(ids)} prompts, {produced / busy:7.1f} tok/s", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return produced / busy, outputs


def summary_line(r: ModeResult, ar_tps: float | None) -> str:
    speedup = f"{r.tokens_per_s / ar_tps:5.2f}x AR" if ar_tps else "   n/a  "
    parts = [f"{r.mode:>4}: {r.tokens_per_s:7.1f} tok/s  {speedup}", f"threads={r.threads} K={r.k}"]
    if r.draft_dtype:
        parts.append(f"draft={r.draft_dtype}")
    if r.mode in ("sd", "ssd"):
        parts += [f"accept={r.acceptance_rate:.3f}", f"accepted_len={r.mean_accepted_len:.2f}"]
    if r.cache_hit_rate is not None:
        parts.append(f"hit_rate={r.cache_hit_rate:.3f}")
    if r.decode_tokens_per_s:
        parts.append(f"decode={r.decode_tokens_per_s:.1f}tok/s")
    if r.rounds:
        parts += [f"verify={r.verify_ms:.2f}ms/round", f"draft={r.draft_ms:.2f}ms/round"]
    if r.mode == "ssd":
        parts.append(f"draft_wait={r.exposed_draft_ms:.2f}ms/round")
        if r.backup_ms is not None:
            parts.append(f"backup={r.backup_ms:.2f}ms")
    return "  ".join(parts)


def plot(results: dict[str, ModeResult], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    modes = list(results)
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4))
    tps = [results[m].tokens_per_s for m in modes]
    bars = a1.bar(modes, tps, color=["#888", "#4a90d9", "#2a9d4a", "#c77"][: len(modes)])
    if "ssd" in results and results["ssd"].predicted_tokens_per_s:
        a1.axhline(results["ssd"].predicted_tokens_per_s, ls="--", c="#2a9d4a", lw=1, label="ssd: the policy's prediction (decode rounds; bars include prefill)")
        a1.legend(loc="lower right")
    base = results["ar"].tokens_per_s if "ar" in results else None
    for b, v in zip(bars, tps):
        a1.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}" + (f"\n{v / base:.2f}x" if base else ""), ha="center", va="bottom")
    a1.set_ylabel("tokens / s")
    a1.set_title("throughput")
    timed = [m for m in modes if results[m].rounds]
    verify = [results[m].verify_ms for m in timed]
    waited = [results[m].exposed_draft_ms for m in timed]
    a2.bar(timed, verify, label="target verify")
    a2.bar(timed, waited, bottom=verify, label="waiting for the draft")
    a2.set_ylabel("ms per round")
    a2.set_title("where a round's time goes")
    a2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m saguaro.bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=Path, default=DEV_PROMPTS, help="jsonl with a 'prompt' field")
    ap.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--arrivals", default="together", choices=["together", "staggered"],
                    help="together: batches of --batch-size prompts, each run to its end; staggered: "
                         "--batch-size prompts in flight, the next joining as one finishes (as served)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-k", type=int, default=0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--modes", default="ar,sd,ssd", help="comma list of ar, sd, ssd, hf")
    ap.add_argument("--out", type=Path, default=Path("runs/bench"))
    ap.add_argument("--target", default=str(DEMO_TARGET))
    ap.add_argument("--draft", default=str(DEMO_DRAFT))
    ap.add_argument("--target-dtype", default=EngineConfig.dtype, help="auto, float32, bfloat16 or float16")
    ap.add_argument("--draft-dtype", default=EngineConfig.dtype, help="auto, float32, bfloat16 or float16")
    ap.add_argument("--k", type=int, default=SpecConfig.k, help="draft tokens per round (SSD, and SD unless --sd-k)")
    ap.add_argument("--sd-k", default="auto", help="SD's K: a number, or auto (the fastest of 2..6 here)")
    ap.add_argument("--threads", default="auto", help="AR/SD threads: a number, or auto (the faster of 1 and 2)")
    ap.add_argument("--budget", type=int, default=SpecConfig.budget, help="speculation-cache branches per sequence")
    ap.add_argument("--fanout", default=SpecConfig.fanout, choices=["geometric", "uniform"])
    ap.add_argument("--saguaro-c", type=float, default=SpecConfig.saguaro_c, help="Saguaro C (1: off)")
    ap.add_argument("--backup", default=SpecConfig.backup, choices=["auto", "neural", "fast"])
    ap.add_argument("--no-policy", action="store_true", help="ssd pre-drafts every round at --k (no round policy)")
    ap.add_argument("--grid", action="store_true", help="every cell of {greedy, T=0.7} x {batch 1, 4} x "
                    "{--prompts, --heldout-prompts}, each a side-by-side run; --temperature and --batch-size are ignored")
    ap.add_argument("--heldout-prompts", type=Path, default=HELDOUT_PROMPTS, help="the grid's second prompt set")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    return run_grid(args) if args.grid else run_cell(args)


def run_cell(args: argparse.Namespace) -> dict:
    """One side-by-side run of the modes: summary lines, report.json and a plot under args.out."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    tok = load_tokenizer(args.target)
    ids = [encode_prompt(tok, p) for p in load_prompts(args.prompts, args.limit)]
    params = SamplingParams(max_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed if args.temperature > 0 else None)
    c = args.saguaro_c
    spec = SpecConfig(k=args.k, budget=args.budget, fanout=args.fanout, saguaro_c=c, backup=args.backup,
                      policy=not args.no_policy)
    slots = max(16, args.batch_size)
    tcfg = EngineConfig(checkpoint=args.target, max_slots=slots, dtype=args.target_dtype)
    dcfg = EngineConfig(checkpoint=args.draft, max_slots=slots, dtype=args.draft_dtype)
    threads_options = [1, 2] if args.threads == "auto" else [int(args.threads)]
    trial_ids, trial_params = ids[:3], params.with_(max_tokens=64)

    def in_process(mode: str, threads: int, k: int, draft_dtype: str = args.draft_dtype) -> Decoder:
        return build_decoder(replace(tcfg, threads=threads),
                             replace(dcfg, threads=threads, dtype=draft_dtype) if mode == "sd" else None,
                             replace(spec, k=k), draft_process=False)

    def trial(*config) -> float:
        mode = config[0]
        dec = in_process(*config)
        try:
            run = Run(dec, mode, trial_params, trial_ids[0])
            run_side_by_side([run], trial_ids, args.batch_size, f"tune {mode}")
            return run.tokens_per_s
        finally:
            dec.close()

    # SD drafts one row at a time, where fp32 (auto: its weights held in fp16, docs/design.md, "The
    # engine on CPU") can beat bf16: it gets whichever draft dtype is faster.
    sd_dtypes = ["auto", "bfloat16"] if args.draft_dtype == "auto" else [args.draft_dtype]
    auto_draft = str(resolve_dtype("auto", dcfg.device, draft=True)).removeprefix("torch.")
    if auto_draft == "float32" and dcfg.device == "cpu" and cpu_has_fast_bf16():
        auto_draft = "float32/bfloat16"      # few rows in fp32 on fp16-held weights, many in bf16
    runs: list[Run] = []
    configs: dict[str, tuple[int, int, str | None]] = {}   # mode -> threads, K, draft dtype
    for mode in [m for m in modes if m != "hf"]:
        if mode == "ssd":
            cores = os.cpu_count() or 1
            dec = build_decoder(replace(tcfg, prefill_threads=cores), dcfg, spec, draft_process=True,
                                draft_core=cores - 1 if cores > 1 else None)
            configs[mode] = (1, args.k, auto_draft if args.draft_dtype == "auto" else args.draft_dtype)
        else:
            ks = [args.k] if mode == "ar" or args.sd_k != "auto" else [2, 3, 4, 5, 6]
            if mode == "sd" and args.sd_k != "auto":
                ks = [int(args.sd_k)]
            candidates = [(mode, t, k) + ((d,) if mode == "sd" else ()) for t in threads_options for k in ks
                          for d in (sd_dtypes if mode == "sd" else [None])]
            best = fastest(candidates, trial) if len(candidates) > 1 else candidates[0]
            dec = in_process(*best)
            configs[mode] = (best[1], best[2], (auto_draft if best[3] == "auto" else best[3]) if mode == "sd" else None)
        runs.append(Run(dec, mode, params, ids[0]))
    try:
        run_side_by_side(runs, ids, args.batch_size, "+".join(r.mode for r in runs), args.arrivals == "staggered")
    finally:
        for r in runs:
            r.dec.close()
    results: dict[str, ModeResult] = {}
    for r in runs:
        threads, k, draft_dtype = configs[r.mode]
        results[r.mode] = summarize(r.mode, r.tokens_per_s, r.outputs, list(r.dec.history), r.sums, threads,
                                    0 if r.mode == "ar" else k, draft_dtype, args.budget, c)
    if "hf" in modes:
        threads = results["sd"].threads if "sd" in results else threads_options[-1]
        tps, outs = run_hf(args.target, args.draft, ids, params, args.k, threads)
        results["hf"] = ModeResult("hf", tps, outs, threads, args.k)

    ar_tps = results["ar"].tokens_per_s if "ar" in results else None
    print(f"\nsaguaro.bench: {len(ids)} prompts, {args.max_new_tokens} new tokens, batch {args.batch_size} "
          f"({args.arrivals}), "
          f"temperature {args.temperature}, budget {args.budget} ({args.fanout}), C={c}, backup={args.backup}")
    for r in results.values():
        print(summary_line(r, ar_tps))
    for r in results.values():
        if r.degraded_rounds:    # a failed drafter leaves plain target steps: not a run of this mode
            print(f"WARNING {r.mode}: the drafter failed; {r.degraded_rounds} of {r.rounds} rounds ran on the target "
                  f"alone, so these figures do not measure {r.mode}")
    ssd = results.get("ssd")
    if ssd and ssd.round_mix:
        print(policy_lines(ssd))
    if ssd and ssd.verify_bound_tokens_per_s and "sd" in results:
        # SSD can at best hide drafting: its rounds still cost a verify on the target's one core.
        print(f"ssd decode bound with drafting fully hidden (tokens per round / verify time, target on "
              f"{ssd.threads} thread): {ssd.verify_bound_tokens_per_s:.1f} tok/s, "
              f"{ssd.verify_bound_tokens_per_s / results['sd'].decode_tokens_per_s:.2f}x sd's decode phase "
              f"(sd verifies on {results['sd'].threads} threads)")
    for base in ("sd", "ar"):
        if ssd and base in results:
            b = results[base]
            decode = (f", decode phase {ssd.decode_tokens_per_s / b.decode_tokens_per_s:.2f}x"
                      if ssd.decode_tokens_per_s and b.decode_tokens_per_s else "")
            print(f"ssd/{base} = {ssd.tokens_per_s / b.tokens_per_s:.2f}x end to end{decode}")
    if params.greedy and "ar" in results:
        for m, r in results.items():
            if m != "ar":
                same = sum(a == b for a, b in zip(r.outputs, results["ar"].outputs))
                print(f"greedy outputs identical to AR: {m} {same}/{len(ids)}")
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"settings": {k: str(v) for k, v in vars(args).items()}, "modes": {m: asdict(r) for m, r in results.items()}}
    (args.out / "report.json").write_text(json.dumps(report))
    plot(results, args.out / "bench.png")
    print(f"wrote {args.out / 'report.json'} and {args.out / 'bench.png'}")
    return report


def policy_lines(r: ModeResult) -> str:
    mix = "  ".join(f"{kind.upper()} {share:.0%}" for kind, share in r.round_mix.items())
    hist = lambda h: " ".join(f"{k}:{n}" for k, n in h.items()) or "-"
    options = " ".join(f"{o}:{n}" for o, n in list(r.options.items())[:6])
    lines = [f"ssd policy mix (decode sequence-rounds): {mix}  K histogram {hist(r.k_histogram)}  "
             f"B histogram {hist(r.budget_histogram)}  C histogram {hist({f'{c:g}': n for c, n in (r.c_histogram or {}).items()})}  "
             f"top options {options or '-'}"]
    if r.predicted_tokens_per_s:
        lines.append(f"ssd policy (docs/design.md, the speedup model on measured costs): predicted "
                     f"{r.predicted_tokens_per_s:.1f} tok/s, measured {r.measured_tokens_per_s:.1f} tok/s over the same "
                     f"rounds: measured/predicted = {r.measured_tokens_per_s / r.predicted_tokens_per_s:.2f}")
    return "\n".join(lines)


GRID = [(temperature, batch, prompts) for temperature in (0.0, 0.7) for batch in (1, 4) for prompts in ("dev", "heldout")]


def run_grid(args: argparse.Namespace) -> dict:
    """Every cell of GRID as its own side-by-side run (ar, sd, ssd), then one line per cell with the
    issue's bars: ssd >= 0.97x max(ar, sd) everywhere, >= 1.05x on greedy batch 1 dev prompts,
    greedy outputs identical to AR, and the policy's prediction within 10% of the measurement."""
    cells = {}
    for temperature, batch, prompts in GRID:
        name = f"{'greedy' if temperature == 0 else f'T{temperature}'}-b{batch}-{prompts}"
        print(f"\n=== {name}", flush=True)
        cell = argparse.Namespace(**{**vars(args), "temperature": temperature, "batch_size": batch, "grid": False,
                                     "prompts": args.prompts if prompts == "dev" else args.heldout_prompts,
                                     "modes": "ar,sd,ssd", "out": args.out / name})
        cells[name] = grid_row(run_cell(cell), bar=1.05 if (temperature, batch, prompts) == (0.0, 1, "dev") else 0.97)
    print("\ngrid (tokens/s end to end; pred/meas: the policy's predicted over measured tokens/s):")
    for name, row in cells.items():
        print(f"{name:>20}: " + "  ".join(f"{k}={v}" for k, v in row.items()))
    (args.out / "grid.json").write_text(json.dumps(cells, indent=1))
    print(f"wrote {args.out / 'grid.json'}")
    return cells


def grid_row(report: dict, bar: float) -> dict:
    m = report["modes"]
    best = max(m["ar"]["tokens_per_s"], m["sd"]["tokens_per_s"])
    ratio = m["ssd"]["tokens_per_s"] / best
    failed = [x for x in ("sd", "ssd") if m[x].get("degraded_rounds")]
    row = {"ar": round(m["ar"]["tokens_per_s"], 1), "sd": round(m["sd"]["tokens_per_s"], 1),
           "ssd": round(m["ssd"]["tokens_per_s"], 1), "ssd/max(ar,sd)": round(ratio, 3), "bar": bar,
           "meets_bar": ratio >= bar and not failed}
    if failed:
        row["drafter_failed"] = failed
    if report["settings"]["temperature"] == "0.0":
        row["identical"] = all(m[x]["outputs"] == m["ar"]["outputs"] for x in ("sd", "ssd"))
    predicted, measured = m["ssd"]["predicted_tokens_per_s"], m["ssd"]["measured_tokens_per_s"]
    if predicted:
        row["pred/meas"] = round(predicted / measured, 3)
        row["within_10%"] = abs(predicted / measured - 1) <= 0.10
    row["mix"] = {k: round(v, 2) for k, v in (m["ssd"]["round_mix"] or {}).items()}
    return row


if __name__ == "__main__":
    main()
