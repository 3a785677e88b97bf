#!/usr/bin/env bash
# The comparison on the GPU device machine (Ubuntu 24.04, CPython 3.12, no network), in one command:
#
#   scripts/device-bundle                 # here, once: fills .device-bundle/ (git-ignored)
#   device run, carry [".device-bundle"], command: bash bench/device_run.sh
#
# It installs the bundle's wheels into $SITE, then runs the steps of $STEPS (default: all, in this order):
#   gpu       the GPU tests (tests/device: PyTorch on a KIND_GPU instance, DLPack python models, frames
#             mapped from a client's region)
#   backends  `python -m bench.backends --triton` (framework models: served vs called directly; the
#             1080p frame mapped, staged, and on the reference Triton)
#   compare   `python -m bench compare --client perf_analyzer` on every scenario (short windows: about
#             8 minutes)
# (backends and compare first unpack the trimmed reference Triton and check it.)
#   floor     `python -m bench.floor measure` (protocol stacks alone)
# and leaves in $OUT: run.log, performance.md (also written to docs/), gpu.log, backends.json,
# compare/{results.json,performance.md,ours.log,triton.log,client.log} and floor/floor.json.
# Env: OUT (required), PYTHON (default python3), SITE (default /tmp/site), STEPS, COMPARE_ARGS and BACKENDS_ARGS
# (extra arguments of those steps, e.g. BACKENDS_ARGS="--trace 1"; BACKENDS_TIMEOUT, default 300 s), COMPARE_TIMEOUT and COMPARE_BUDGET (seconds: the step's limit, default 420, and bench
# compare's --time-budget, default 300), PROBE (a command run after the GPU tests, its output in probe.log;
# PROBE_TIMEOUT, default 300 s), PERF_ANALYZER (a perf_analyzer binary other than the wheel's), SKIP_FLOOR (non-empty: no floor),
# BASELINE (non-empty: compare against the build in the bundle's baseline.tar.gz, `scripts/device-bundle --baseline REV`,
# instead of the reference Triton: an A/B of two builds on one machine; docs/ is left alone).
set -uo pipefail
cd "$(dirname "$0")/.."
: "${OUT:?OUT must name the folder that comes back}"
PY=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
BUNDLE=.device-bundle
REF=${REF_DIR:-/tmp/reference-triton-bundle}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
START=$(date +%s)
step() { echo "== [$(( $(date +%s) - START ))s] $*"; }

main() {
step "machine"
uname -a; nproc; free -g | head -2; "$PY" --version; command -v nvidia-smi >/dev/null && nvidia-smi -L
[ -d "$BUNDLE/wheels" ] && [ -f "$BUNDLE/reference-triton.tar.xz" ] || {
  echo "error: $BUNDLE is missing: run scripts/device-bundle here and carry .device-bundle"; exit 1; }

step "wheels -> $SITE"
PIP=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
"${PIP[@]}" $(ls "$BUNDLE"/wheels/*.whl | grep -v /perf_analyzer-) || { echo "error: installing the wheels failed"; exit 1; }
# perf_analyzer's wheel is tagged manylinux_2_38: it installs on Ubuntu 24.04, not on older systems.
"${PIP[@]}" "$BUNDLE"/wheels/perf_analyzer-*.whl || [ -n "${PERF_ANALYZER:-}" ] ||
  { echo "error: installing perf_analyzer failed (glibc < 2.38?); set PERF_ANALYZER to a working binary"; exit 1; }
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export PATH="$SITE/bin:$PATH"
chmod +x "$SITE"/perf_analyzer/bin/perf_analyzer 2>/dev/null
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" . ||
  echo "warning: pip could not install the project (setuptools missing?); it runs from the tree anyway"
export EDGE_KERNEL_COMMIT="$(cat "$BUNDLE/COMMIT" 2>/dev/null || echo unknown) (bundle)"

step "imports"
"$PY" - <<'EOF' || { echo "error: a package the run needs is missing or broken (see above)"; exit 1; }
import importlib, sys
from importlib.metadata import version
need = ["numpy", "httptools", "uvloop", "msgpack", "ml_dtypes", "prometheus_client", "hpack", "hyperframe", "posix_ipc",
        "google.protobuf", "matplotlib", "grpc", "tritonclient.http.aio", "tritonclient.grpc.aio"]
bad = []
for mod in need:
    try:
        importlib.import_module(mod)
    except Exception as e:  # noqa: BLE001
        bad.append(f"{mod}: {e}")
dists = ["numpy", "httptools", "uvloop", "msgpack", "ml_dtypes", "prometheus_client", "hpack", "hyperframe", "grpclib",
         "posix_ipc", "protobuf",
         "grpcio", "tritonclient", "perf_analyzer", "matplotlib"]
def ver(dist):
    try:
        return version(dist)
    except Exception:  # noqa: BLE001
        return "missing"
print(" ".join(f"{d}={ver(d)}" for d in dists))
print("\n".join(bad), file=sys.stderr)
sys.exit(1 if bad else 0)
EOF
PA_BIN=${PERF_ANALYZER:-$SITE/perf_analyzer/bin/perf_analyzer}
if ldd "$PA_BIN" 2>&1 | grep -E "not found|GLIBC"; then echo "warning: $PA_BIN may not start here"; fi

STEPS=${STEPS:-gpu backends compare floor}
[ -n "${SKIP_FLOOR:-}" ] && STEPS=${STEPS//floor/}
rc=0
if [[ " $STEPS " == *" backends "* || ( " $STEPS " == *" compare "* && -z "${BASELINE:-}" ) ]]; then
  step "reference Triton"
  rm -rf "$REF" && mkdir -p "$REF" && tar -xJf "$BUNDLE/reference-triton.tar.xz" -C "$REF" || exit 1
  export REFERENCE_TRITON_CACHE="$REF/reference-triton"
  "$PY" scripts/reference-triton check || echo "warning: scripts/reference-triton check failed (see above)"
fi
if [[ " $STEPS " == *" gpu "* ]]; then
  step "GPU tests (tests/device)"
  EDGE_KERNEL_DEVICE_TESTS=1 timeout -s TERM 300 "$PY" -m pytest -q -p no:cacheprovider tests/device tests/test_dlpack.py \
    2>&1 | tee "$OUT/gpu.log" | tail -40 || rc=1
fi
if [ -n "${PROBE:-}" ]; then
  step "probe: $PROBE"
  timeout -s TERM ${PROBE_TIMEOUT:-300} bash -c "$PROBE" 2>&1 | tee "$OUT/probe.log" || rc=1
fi
if [[ " $STEPS " == *" backends "* ]]; then
  step "bench.backends (framework models: served vs called directly)"
  # shellcheck disable=SC2086
  timeout -s TERM ${BACKENDS_TIMEOUT:-300} "$PY" -m bench.backends --triton --seconds ${BACKENDS_SECONDS:-3} --out "$OUT" ${BACKENDS_ARGS:-} || rc=1
fi
if [[ " $STEPS " != *" compare "* ]]; then
  cp docs/performance.md "$OUT/performance.md" 2>/dev/null
  step "done (rc=$rc)"
  return $rc
fi

step "compare"
AB=()
if [ -n "${BASELINE:-}" ]; then
  rm -rf /tmp/baseline-tree && mkdir -p /tmp/baseline-tree && tar -xzf "$BUNDLE/baseline.tar.gz" -C /tmp/baseline-tree ||
    { echo "error: no baseline in the bundle (scripts/device-bundle --baseline REV)"; exit 1; }
  AB=(--baseline-tree /tmp/baseline-tree)
fi
# shellcheck disable=SC2086
timeout -s TERM ${COMPARE_TIMEOUT:-420} "$PY" -m bench compare --client perf_analyzer --scenarios all \
  --measurement-interval 2000 --max-trials 5 --time-budget ${COMPARE_BUDGET:-300} --out "$OUT/compare" ${AB[@]+"${AB[@]}"} \
  ${COMPARE_ARGS:-} || rc=$?
cp docs/performance.md "$OUT/performance.md" 2>/dev/null
if [[ " $STEPS " == *" floor "* ]]; then
  step "protocol floors (canned answers, no model)"
  timeout -s TERM 300 "$PY" -m bench.floor measure --out "$OUT/floor" --measurement-interval 1500 \
    ${PERF_ANALYZER:+--perf-analyzer "$PERF_ANALYZER"} || echo "warning: bench.floor failed"
fi
step "done (compare rc=$rc)"
return $rc
}

main 2>&1 | tee "$OUT/run.log"
