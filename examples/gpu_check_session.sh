#!/usr/bin/env bash
# One device-tool call: the GPU suite (named failures, -rf) beside the compiles of a
# bench_decode run whose workers time only once the suite is done (a machine barrier).
#   OUT=... DECODE="<bench_decode args>" bash examples/gpu_check_session.sh
# Results under $OUT: suite.log, bench_decode.log, and results.tar.gz (rows, profiles).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv > "$OUT/nvidia-smi.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
sync="$OUT/sync"; rm -rf "$sync"; mkdir -p "$sync" "$OUT/dec"
(timeout "${SUITE_LIMIT:-300}" python3 -m pytest -q -n "${WORKERS:-8}" -rf --tb=short -p no:cacheprovider \
   ${TESTS:-tests/test_gpu.py tests/test_kernels.py tests/test_tensor_parallel.py} > "$OUT/suite.log" 2>&1
 echo "suite exit $?" >> "$OUT/suite.log"; touch "$sync/suite") &
if [ -n "${DECODE:-}" ]; then
  methods=$(echo "$DECODE" | sed -n 's/.*--methods \([^ ]*\).*/\1/p' | tr ',' '\n' | wc -l)
  # shellcheck disable=SC2086
  (cd examples && timeout "${DECODE_LIMIT:-520}" python3 bench_decode.py --out "$OUT/dec" --jobs --sync-dir "$sync" \
     --sync-count $((methods + 1)) --sync-wait "${SYNC_WAIT:-330}" $DECODE > "$OUT/bench_decode.log" 2>&1)
fi
wait
echo "== suite"; grep -E "^(FAILED|ERROR)|passed|failed|suite exit" "$OUT/suite.log" | tail -${SUITE_TAIL:-40}
echo "== decode"; grep -v -E "Warning|warn\(|^\s*$|DEBUG" "$OUT/bench_decode.log" 2>/dev/null | tail -${DECODE_TAIL:-30}
rm -rf "$sync"
tar -czf "$OUT/results.tar.gz" -C "$OUT" versions.txt nvidia-smi.txt dec suite.log bench_decode.log && rm -rf "$OUT/dec"
