import json, sys, statistics as st, re, bisect
from pathlib import Path
from collections import defaultdict
rows = [json.loads(l) for l in open(sys.argv[1])]
tg = [json.loads(l) for l in open(sys.argv[2])]; tg = [r for r in tg if r[0] == "T"]; ts = [r[1] for r in tg]
wins = []
for f in sorted(Path(sys.argv[3]).glob("*_c*_r*.json")):
    if f.name.endswith(".metrics.json"): continue
    m = re.fullmatch(r"(\w+?)_c(\d+)_r(\d+)", f.stem)
    reqs = json.loads(f.read_text())["experiments"][0]["requests"]
    wins.append((min(r["timestamp"] for r in reqs) / 1e9, max(max(r["response_timestamps"]) for r in reqs) / 1e9, m.group(1), int(m.group(2))))
def label(r):
    for a, b, mode, c in wins:
        if a - .01 <= r[0] <= b + .01: return mode, c
    return None, None
out = defaultdict(list)
prev = None; since = 99
for r in rows:
    mode, c = label(r)
    if r[8] or r[7] or r[13]: since = 0
    else: since += 1
    if mode and r[1] == c and not (r[8] or r[7] or r[13]):
        i = bisect.bisect_left(ts, r[18] - 0.0005)
        if i < len(tg) and tg[i][1] - r[18] < 0.005:
            tc = (tg[i][2] - tg[i][1]) * 1e3
            k = "1" if since == 1 else "2-4" if since <= 4 else "5-16" if since <= 16 else ">16"
            out[(c, mode, k)].append((tc, r[3], r[4] + r[5]))
for key in sorted(out):
    v = out[key]
    print(key, len(v), "target %.3f verify %.3f wall %.3f" % tuple(st.mean(x[j] for x in v) for j in range(3)))
