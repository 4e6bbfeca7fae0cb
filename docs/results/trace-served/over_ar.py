"""SSD's time over AR's, by round category: each SSD round's wall+gap minus what AR's plain rounds at that
batch took for the same tokens (AR's mean plain wall+gap per batch size, from the AR runs of the same trace)."""
import json, sys, statistics as st, re
from pathlib import Path
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
wins = []
for f in sorted(Path(sys.argv[2]).glob("*_c*_r*.json")):
    if f.name.endswith(".metrics.json"): continue
    m = re.fullmatch(r"(\w+?)_c(\d+)_r(\d+)", f.stem)
    reqs = json.loads(f.read_text())["experiments"][0]["requests"]
    wins.append((min(r["timestamp"] for r in reqs) / 1e9, max(max(r["response_timestamps"]) for r in reqs) / 1e9, m.group(1), int(m.group(2))))
def label(r):
    for a, b, mode, c in wins:
        if a - .01 <= r[0] <= b + .01: return mode, c
    return None, None
arplain = defaultdict(list)
byc = defaultdict(list)
for r in rows:
    mode, c = label(r)
    if mode is None: continue
    byc[(mode, c)].append(r)
    if mode == "ar" and r[7] == 0:
        arplain[r[1]].append(r[4] + r[5])
ref = {b: st.mean(v) for b, v in arplain.items()}
for (mode, c), rs in sorted(byc.items(), key=lambda x: (x[0][1], x[0][0])):
    if mode != "ssd": continue
    cat = defaultdict(lambda: [0, 0.0, 0.0])
    for r in rs:
        b, tok, w = r[1], r[2], r[4] + r[5]
        if r[7]: k = "join"
        elif r[13]: k = "spec:" + r[9].split("/")[0][:2] + ("/narrow" if r[8] else "")
        elif r[8]: k = "plain-narrow" + ("(unread)" if r[14] else "(idle)")
        else: k = "plain-wide"
        if b not in ref: continue
        cat[k][0] += 1; cat[k][1] += w; cat[k][2] += w - tok / b * ref[b]
    arw = sum(r[4] + r[5] for r in byc[("ar", c)])
    ssw = sum(v[1] for v in cat.values())
    print(f"c{c}: ssd wall {ssw/1000:.2f}s (ar run {arw/1000:.2f}s); excess over AR's plain rate by category (ms, % of ssd wall):")
    for k, (n, w, ex) in sorted(cat.items(), key=lambda x: -x[1][2]):
        print(f"   {k:24s} rounds {n:5d} wall {w:8.1f} excess {ex:8.1f} ({100*ex/ssw:+.2f}%)")
