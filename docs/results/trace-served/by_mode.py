"""Served trace by run (perf_analyzer exports give each run's window): per mode and concurrency."""
import json, sys, statistics as st, bisect, re
from pathlib import Path
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
tg = [json.loads(l) for l in open(sys.argv[2])] if len(sys.argv) > 2 and Path(sys.argv[2]).exists() else []
tg = [r for r in tg if r[0] == "T"]
tstarts = [r[1] for r in tg]
wins = []
for f in sorted(Path(sys.argv[3]).glob("*_c*_r*.json")):
    m = re.fullmatch(r"(\w+?)_c(\d+)_r(\d+)", f.stem)
    if not m: continue
    reqs = json.loads(f.read_text())["experiments"][0]["requests"]
    t0 = min(r["timestamp"] for r in reqs) / 1e9
    t1 = max(max(r["response_timestamps"]) for r in reqs) / 1e9
    wins.append((t0, t1, m.group(1), int(m.group(2)), int(m.group(3))))
agg = defaultdict(lambda: defaultdict(list))
for r in rows:
    w = [w for w in wins if w[0] - 0.01 <= r[0] <= w[1] + 0.01]
    if not w: continue
    mode, c = w[0][2], w[0][3]
    a = agg[(mode, c)]
    a["wall"].append(r[4] + r[5]); a["tok"].append(r[2]); a["b"].append(r[1])
    plain = r[7] == 0 and not r[8] and r[13] == 0
    if plain and r[1] == c:
        a["pv"].append(r[3]); a["pf"].append(r[17]); a["pwall"].append(r[4]); a["pgap"].append(r[5])
        i = bisect.bisect_left(tstarts, r[18] - 0.0005)
        if i < len(tg) and tg[i][1] - r[18] < 0.005:
            a["tc"].append((tg[i][2] - tg[i][1]) * 1e3)
    if r[8] and not r[7]: a["one"].append(r[4] + r[5])
    if r[7]: a["join"].append(r[4] + r[5])
    if r[13]: a["spec"].append(r[4] + r[5]); a["spectok"].append(r[2])
for (mode, c), a in sorted(agg.items(), key=lambda x: (x[0][1], x[0][0])):
    m = lambda k: st.mean(a[k]) if a[k] else 0
    md = lambda k: st.median(a[k]) if a[k] else 0
    W = sum(a["wall"])
    print(f"{mode:3s} c{c}: rounds {len(a['wall']):5d} batch {m('b'):.2f} tok/s {1000*sum(a['tok'])/W:6.1f} wall {W/1000:.2f}s | full-batch plain {len(a['pv']):5d}: verify {m('pv'):.3f} fwd {m('pf'):.3f} target {m('tc'):.3f} (med {md('tc'):.3f}) wall+gap {m('pwall')+m('pgap'):.3f}"
          f" | one-core {len(a['one'])} {sum(a['one'])/W*100:.1f}% joins {len(a['join'])} {sum(a['join'])/W*100:.1f}% spec {len(a['spec'])} {sum(a['spec'])/W*100:.1f}% ({sum(a['spectok'])} tok)")
