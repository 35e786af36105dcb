#!/usr/bin/env bash
# One device-tool call for the user's path: generate() rows (bench_generate.py, one worker per
# method), and beside their compiles a PRE command on the GPU (kernel benchmarks, GPU tests)
# that the workers wait for before they time. Results under $OUT; big files packed into
# $OUT/results.tar.gz (the device tool returns few files).
#   OUT=... GEN="<bench_generate args>" PRE="<command, run from the repo root>" POST="<command>" bash examples/gpu_generate_session.sh
# POST runs after the timed rows (PRE and POST write under $OUT/pre).
# .whl/ (carried) may hold py-spy's wheel: it is installed and bench_generate samples the host.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
limit=${LIMIT:-540}
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv > "$OUT/nvidia-smi.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
spy=""
if ls .whl/py_spy-*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/pyspy .whl/py_spy-*.whl && spy="--py-spy /tmp/pyspy/bin/py-spy"
fi
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
sync="$OUT/sync"; rm -rf "$sync"; mkdir -p "$sync"
methods=$(echo "${GEN:-}" | sed -n 's/.*--methods \([^ ]*\).*/\1/p')
count=$(echo "${methods:-hf_compiled,lychee_paper}" | tr ',' '\n' | wc -l)
mkdir -p "$OUT/pre" "$OUT/gen"
if [ -n "${PRE:-}" ]; then
  count=$((count + 1))
  (timeout "$limit" bash -c "$PRE" > "$OUT/pre/pre.log" 2>&1; touch "$sync/pre") &  # PRE writes under $OUT/pre
fi
if [ -n "${GEN:-}" ]; then
  # shellcheck disable=SC2086
  (cd examples && timeout "$limit" python3 bench_generate.py --out "$OUT/gen" --jobs --sync-dir "$sync" \
     --sync-count $count --sync-wait ${SYNC_WAIT:-420} $spy $GEN > "$OUT/gen/bench_generate.log" 2>&1)
fi
wait
if [ -n "${POST:-}" ]; then  # after the timed rows: a quiet machine
  timeout "$limit" bash -c "$POST" > "$OUT/pre/post.log" 2>&1
fi
echo "== PRE: ${PRE:-}"; grep -v -E "Warning|warn\(|DEBUG" "$OUT/pre/pre.log" 2>/dev/null | tail -${PRE_TAIL:-30}
[ -n "${POST:-}" ] && { echo "== POST: $POST"; grep -v -E "Warning|warn\(|DEBUG" "$OUT/pre/post.log" | tail -${POST_TAIL:-30}; }
echo "== GEN: ${GEN:-}"; grep -v -E "Warning|warn\(|^\s*$|DEBUG|model.generate" "$OUT/gen/bench_generate.log" 2>/dev/null | tail -${GEN_TAIL:-40}
rm -rf "$sync"
tar -czf "$OUT/results.tar.gz" -C "$OUT" versions.txt nvidia-smi.txt pre gen && rm -rf "$OUT/pre" "$OUT/gen"
