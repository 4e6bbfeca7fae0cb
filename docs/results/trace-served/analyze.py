"""Reads a traced served sweep (README.md): the ssd process's rounds, the target's forwards and the
sweep's perf_analyzer exports, whose windows label each round by mode and concurrency.

    python analyze.py TRACE RUN_DIR {by-mode,over-ar,since-event,joins}

TRACE is the ssd process's file; the target's (TRACE.PID, the largest of them) is found beside it.
A round's fields: time, batch, tokens, verify_ms, wall_ms, gap_ms, prefill_ms, joined, one_core,
option, ar, sd, ssd, drafted, unread, deferred, draft_wait_ms, forward_ms, forward start, round
start, round end."""
import bisect
import json
import re
import statistics as st
import sys
from collections import defaultdict
from pathlib import Path

T, BATCH, TOK, VERIFY, WALL, GAP, PREFILL, JOINED, ONE_CORE, OPTION, DRAFTED, UNREAD, FWD, FWD_T0 = \
    0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 14, 17, 18


def load(trace: Path, run_dir: Path):
    """(rounds labelled (mode, concurrency, round), target forwards [(start, end)] in start order)."""
    rows = [json.loads(line) for line in trace.open()]
    others = sorted(trace.parent.glob(trace.name + ".*"), key=lambda f: f.stat().st_size)
    forwards = sorted(((r[1], r[2]) for r in map(json.loads, others[-1].open()) if r[0] == "T")) if others else []
    windows = []
    for f in sorted(run_dir.glob("*_c*_r*.json")):
        m = re.fullmatch(r"(\w+?)_c(\d+)_r(\d+)", f.stem)
        if not m:
            continue
        reqs = json.loads(f.read_text())["experiments"][0]["requests"]
        windows.append((min(r["timestamp"] for r in reqs) / 1e9, max(max(r["response_timestamps"]) for r in reqs) / 1e9,
                        m.group(1), int(m.group(2))))
    labelled = []
    for r in rows:
        w = next((w for w in windows if w[0] - 0.01 <= r[T] <= w[1] + 0.01), None)
        labelled.append((w[2], w[3], r) if w else (None, None, r))
    return labelled, forwards


def target_ms(forwards, r):
    """The target's compute for round r (the forward that started with it), or None."""
    i = bisect.bisect_left(forwards, (r[FWD_T0] - 0.0005,))
    if i < len(forwards) and forwards[i][0] - r[FWD_T0] < 0.005:
        return (forwards[i][1] - forwards[i][0]) * 1e3
    return None


def plain(r) -> bool:
    return not r[JOINED] and not r[ONE_CORE] and not r[DRAFTED]


def mean(v):
    return st.mean(v) if v else 0.0


def by_mode(labelled, forwards):
    """Per mode and concurrency: the full-batch plain rounds' times, the share of one-core, join and
    speculating rounds in the wall time."""
    agg = defaultdict(lambda: defaultdict(list))
    for mode, c, r in labelled:
        if mode is None:
            continue
        a = agg[(mode, c)]
        a["wall"].append(r[WALL] + r[GAP]); a["tok"].append(r[TOK]); a["b"].append(r[BATCH])
        if plain(r) and r[BATCH] == c:
            a["verify"].append(r[VERIFY]); a["fwd"].append(r[FWD]); a["round"].append(r[WALL] + r[GAP])
            tc = target_ms(forwards, r)
            if tc is not None:
                a["target"].append(tc)
        if r[ONE_CORE] and not r[JOINED]:
            a["one"].append(r[WALL] + r[GAP])
        if r[JOINED]:
            a["join"].append(r[WALL] + r[GAP])
        if r[DRAFTED]:
            a["spec"].append(r[WALL] + r[GAP]); a["spectok"].append(r[TOK])
    for (mode, c), a in sorted(agg.items(), key=lambda x: (x[0][1], x[0][0])):
        w = sum(a["wall"])
        print(f"{mode:3s} c{c}: rounds {len(a['wall']):5d} batch {mean(a['b']):.2f} tok/s {1000 * sum(a['tok']) / w:6.1f} "
              f"wall {w / 1000:.2f}s | full-batch plain {len(a['verify']):5d}: verify {mean(a['verify']):.3f} fwd {mean(a['fwd']):.3f} "
              f"target {mean(a['target']):.3f} (med {st.median(a['target']) if a['target'] else 0:.3f}) wall+gap {mean(a['round']):.3f} "
              f"| one-core {len(a['one'])} {sum(a['one']) / w * 100:.1f}% joins {len(a['join'])} {sum(a['join']) / w * 100:.1f}% "
              f"spec {len(a['spec'])} {sum(a['spec']) / w * 100:.1f}% ({sum(a['spectok'])} tok)")


def over_ar(labelled, forwards):
    """SSD's time over AR's by round category: each SSD round's wall + gap less what AR's plain rounds
    at that batch took (their mean, same trace) for the same tokens."""
    ar_plain, by_c = defaultdict(list), defaultdict(list)
    for mode, c, r in labelled:
        if mode is None:
            continue
        by_c[(mode, c)].append(r)
        if mode == "ar" and not r[JOINED]:
            ar_plain[r[BATCH]].append(r[WALL] + r[GAP])
    ref = {b: st.mean(v) for b, v in ar_plain.items()}
    for (mode, c), rs in sorted(by_c.items(), key=lambda x: (x[0][1], x[0][0])):
        if mode != "ssd":
            continue
        cat = defaultdict(lambda: [0, 0.0, 0.0])
        for r in rs:
            b, w = r[BATCH], r[WALL] + r[GAP]
            if b not in ref:
                continue
            if r[JOINED]:
                k = "join"
            elif r[DRAFTED]:
                k = "spec:" + r[OPTION].split("/")[0][:2] + ("/narrow" if r[ONE_CORE] else "")
            elif r[ONE_CORE]:
                k = "plain-narrow" + ("(unread)" if r[UNREAD] else "(idle)")
            else:
                k = "plain-wide"
            cat[k][0] += 1; cat[k][1] += w; cat[k][2] += w - r[TOK] / b * ref[b]
        ar_wall = sum(r[WALL] + r[GAP] for r in by_c[("ar", c)])
        ssd_wall = sum(v[1] for v in cat.values())
        print(f"c{c}: ssd wall {ssd_wall / 1000:.2f}s (ar run {ar_wall / 1000:.2f}s); excess over AR's plain rate by category (ms, % of ssd wall):")
        for k, (n, w, ex) in sorted(cat.items(), key=lambda x: -x[1][2]):
            print(f"   {k:24s} rounds {n:5d} wall {w:8.1f} excess {ex:8.1f} ({100 * ex / ssd_wall:+.2f}%)")


def since_event(labelled, forwards):
    """Full-batch plain rounds by how many rounds since the last one-core, join or speculating round
    (target compute, verify, wall ms)."""
    out, since = defaultdict(list), 99
    for mode, c, r in labelled:
        since = 0 if not plain(r) else since + 1
        if mode and r[BATCH] == c and plain(r):
            tc = target_ms(forwards, r)
            if tc is not None:
                k = "1" if since == 1 else "2-4" if since <= 4 else "5-16" if since <= 16 else ">16"
                out[(c, mode, k)].append((tc, r[VERIFY], r[WALL] + r[GAP]))
    for key in sorted(out):
        v = out[key]
        print(key, len(v), "target %.3f verify %.3f wall %.3f" % tuple(st.mean(x[j] for x in v) for j in range(3)))


def joins(labelled, forwards):
    """Join rounds (a prompt's prefill) per mode: prefill, verify, wall, the round after, by batch."""
    out = defaultdict(list)
    for i, (mode, c, r) in enumerate(labelled):
        if mode and r[JOINED]:
            nxt = labelled[i + 1][2] if i + 1 < len(labelled) else r
            out[(c, mode)].append((r[PREFILL], r[VERIFY], r[WALL] + r[GAP], int(r[ONE_CORE]), int(r[UNREAD]), r[BATCH], nxt[WALL] + nxt[GAP]))
    for k in sorted(out):
        v = out[k]
        print(k, len(v), "prefill %.2f verify %.2f wall %.2f next %.2f | one-core %d unread %d | by batch %s" % (
            st.mean(x[0] for x in v), st.mean(x[1] for x in v), st.mean(x[2] for x in v), st.mean(x[6] for x in v),
            sum(x[3] for x in v), sum(x[4] for x in v),
            {b: round(st.mean(x[0] for x in v if x[5] == b), 1) for b in sorted({x[5] for x in v})}))


if __name__ == "__main__":
    trace, run_dir, what = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    {"by-mode": by_mode, "over-ar": over_ar, "since-event": since_event, "joins": joins}[what](*load(trace, run_dir))
