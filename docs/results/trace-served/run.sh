#!/bin/bash
# traced served sweep, T=0.7; $1 = tag
cd "$(git rev-parse --show-toplevel)"
D=${TRACE_DIR:-/tmp/trace}; mkdir -p "$D"
rm -f $D/$1.jsonl
SAGUARO_TRACE=$D/$1.jsonl .venv/bin/python -m saguaro.serve > runs/serve-$1.log 2>&1 &
SPID=$!
echo "server pid $SPID"
for i in $(seq 1 120); do curl -sf localhost:8000/v2/health/ready && break; sleep 1; done
echo "ready after $i s"
timeout 900 .venv/bin/python clients/perf/sweep.py --modes ${MODES:-ssd,sd,ar} ${NDT:---num-draft-tokens sd=2} --concurrency ${C:-1,2,4} --num-prompts 8 --max-tokens 128 --repeats ${R:-4} ${TEMPARG---temperature 0.7} --out runs/$1-t07 > runs/$1-t07.log 2>&1
echo "t0.7 rc=$?"
kill $SPID; wait $SPID
echo done
