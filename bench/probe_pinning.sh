#!/usr/bin/env bash
# frame_stats served with its worker free to move between cores, and pinned to one (a host policy), in
# turns over HTTP + system shm (bench/probe_served.sh): does a pinned worker compute the 1080p frame as fast
# as the model called in a loop?
#
#   bash bench/probe_pinning.sh [rounds]     # perf_analyzer on PATH (or $PERF_ANALYZER); examples/models
#   (on the device: STEPS=none PROBE="PERF_ANALYZER=/tmp/site/perf_analyzer/bin/perf_analyzer bash
#   bench/probe_pinning.sh 3" bash bench/device_run.sh)
exec bash "$(dirname "$0")/probe_served.sh" "${1:-2}" http free= \
  "pinned=--host-policy=cpu,cpu-cores=$(( $(nproc) / 2 ))-$(( $(nproc) / 2 ))"
