#!/usr/bin/env bash
# frame_stats (examples/models: a 1080p frame's channel means) served in turns under several server options,
# with perf_analyzer at c=1 through system shared memory: which options make the served compute as fast as the
# model called in a loop?
#
#   bash bench/probe_served.sh ROUNDS PROTOCOL NAME=ARGS...   # perf_analyzer on PATH (or $PERF_ANALYZER)
#     e.g. bash bench/probe_served.sh 3 grpc default= spin5ms=--backend-config=python,worker-spin-us=5000
#   (on the device: STEPS=none PROBE="PERF_ANALYZER=/tmp/site/perf_analyzer/bin/perf_analyzer bash
#   bench/probe_served.sh ..." bash bench/device_run.sh)
#
# Per run: perf_analyzer's p50 over PROTOCOL (http or grpc), and the server's mean compute infer from the
# statistics extension; then bench.probe_frame's direct call on this machine. ARGS are `kernel start` options,
# split on spaces.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
PA=${PERF_ANALYZER:-perf_analyzer}
PORT=18600
rounds=${1:?rounds}
protocol=${2:?http or grpc}
shift 2
url=localhost:$PORT
[ "$protocol" = grpc ] && url=localhost:$((PORT + 1))
for round in $(seq "$rounds"); do
  for mode in "$@"; do
    name=${mode%%=*}
    read -r -a args <<< "${mode#*=}"
    "$PY" -m kernel start --http-port $PORT --grpc-port $((PORT + 1)) --metrics-port $((PORT + 2)) "${args[@]}" \
      > /tmp/probe-served-server.log 2>&1 &
    server=$!
    for _ in $(seq 120); do curl -sf localhost:$PORT/v2/models/frame_stats/ready && break; sleep 0.5; done
    p50=$("$PA" -m frame_stats -u "$url" -i "$protocol" --shared-memory system --measurement-interval 2000 \
      --percentile 50 --max-trials 10 2>&1 | grep -m1 "p50 latency:" | awk '{print $3}')
    infer=$(curl -s localhost:$PORT/v2/models/frame_stats/stats | "$PY" -c '
import json, sys
s = json.load(sys.stdin)["model_stats"][0]["inference_stats"]["compute_infer"]
print(round(int(s["ns"]) / max(int(s["count"]), 1) / 1000))')
    echo "round $round, $name ($protocol): perf_analyzer p50 ${p50:-?} us, compute infer mean ${infer:-?} us"
    kill -INT $server
    wait $server
  done
done
"$PY" -m bench.probe_frame --seconds 1 | sed -n '1,5p'
