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
out = defaultdict(list)
for i, r in enumerate(rows):
    mode, c = label(r)
    if mode and r[7]:
        nxt = rows[i + 1] if i + 1 < len(rows) else r
        out[(c, mode)].append((r[6], r[3], r[4] + r[5], int(r[8]), int(r[14]), r[1], nxt[4] + nxt[5]))
for k in sorted(out):
    v = out[k]
    print(k, len(v), "prefill %.2f verify %.2f wall %.2f next %.2f | one-core %d unread %d | by batch %s" % (
        st.mean(x[0] for x in v), st.mean(x[1] for x in v), st.mean(x[2] for x in v), st.mean(x[6] for x in v), sum(x[3] for x in v), sum(x[4] for x in v),
        {b: round(st.mean(x[0] for x in v if x[5] == b), 1) for b in sorted({x[5] for x in v})}))
