#!/usr/bin/env bash
# frame_stats served with its worker free to move between cores, and pinned to one (a host policy), in
# turns: does a pinned worker compute the 1080p frame as fast as the model called in a loop?
#
#   bash bench/probe_pinning.sh [rounds]     # perf_analyzer on PATH (or $PERF_ANALYZER); examples/models
#   (on the device: STEPS=none PROBE="PERF_ANALYZER=/tmp/site/perf_analyzer/bin/perf_analyzer bash
#   bench/probe_pinning.sh 3" bash bench/device_run.sh)
#
# Per run: perf_analyzer's p50 over HTTP + system shm at c=1, and the server's mean compute infer from the
# statistics extension; then bench.probe_frame's direct call on this machine.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PA=${PERF_ANALYZER:-perf_analyzer}
PORT=18600
CORE=$(( $(nproc) / 2 ))
for round in $(seq "${1:-2}"); do
  for mode in free pinned; do
    args=()
    [ "$mode" = pinned ] && args=(--host-policy="cpu,cpu-cores=$CORE-$CORE")
    "$PY" -m kernel start --http-port $PORT --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) "${args[@]}" \
      > /tmp/probe-pinning-server.log 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf localhost:$PORT/v2/models/frame_stats/ready && break; sleep 0.5; done
    p50=$("$PA" -m frame_stats -u localhost:$PORT --shared-memory system --measurement-interval 2000 \
      --percentile 50 --max-trials 4 2>&1 | grep -m1 "p50 latency:" | awk '{print $3}')
    infer=$(curl -s localhost:$PORT/v2/models/frame_stats/stats | "$PY" -c '
import json, sys
s = json.load(sys.stdin)["model_stats"][0]["inference_stats"]["compute_infer"]
print(round(int(s["ns"]) / max(int(s["count"]), 1) / 1000))')
    echo "round $round, worker $mode: perf_analyzer p50 ${p50:-?} us, compute infer mean ${infer:-?} us"
    kill -INT $server
    wait $server
  done
done
"$PY" -m bench.probe_frame --seconds 1 | sed -n '1,5p'
