#!/usr/bin/env bash
# One device-tool call: learn the embedded model's role maps for several retrieval counts on
# CUDA, side by side (one process each), optionally beside the GPU test suite (a correctness
# run; the learners' seconds per step are then measured with it sharing the machine).
# Maps, logs and checkpoints under $OUT/learn (a rerun with the checkpoints there resumes);
# the maps are also copied to /tmp/maps for a later call on the same warm machine.
#   OUT=... COUNTS="6 24" STEPS=2000 LIMIT=540 SUITE=1 SUITE_LIMIT=480 bash examples/gpu_learn_maps.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/learn" /tmp/maps
. examples/gpu_model_install.sh || exit 3
for c in ${COUNTS:-6 24}; do
  name=smollm2-135m.r$c.roles.json
  [ -f "${RESUME:-/nonexistent}/r$c.ckpt" ] && cp "$RESUME/r$c.ckpt" "$RESUME/$name.log.jsonl" "$OUT/learn/"
  (timeout "${LIMIT:-540}" python3 -m lychee_fx learn-roles --count "$c" --steps "${STEPS:-2000}" --context 1024 3072 \
     --device cuda --dtype float32 --threads 1 --no-progress --out "$OUT/learn/$name" --checkpoint "$OUT/learn/r$c.ckpt" \
     > "$OUT/learn/r$c.txt" 2>&1
   echo "learn exit $?" >> "$OUT/learn/r$c.txt"; [ -f "$OUT/learn/$name" ] && cp "$OUT/learn/$name" /tmp/maps/) &
done
if [ -n "${SUITE:-}" ]; then
  timeout "${SUITE_LIMIT:-480}" python3 -m pytest -v -n "${WORKERS:-8}" -rf --tb=line -p no:cacheprovider -W ignore \
    tests/test_gpu.py tests/test_kernels.py tests/test_tensor_parallel.py::test_example_on_cuda_over_nccl > "$OUT/suite.log" 2>&1
  echo "suite exit $?" >> "$OUT/suite.log"
fi
wait
for f in "$OUT"/learn/r*.txt; do echo "== $f"; tail -3 "$f"; done
[ -f "$OUT/suite.log" ] && { echo "== suite"; grep -E "FAILED|ERROR|passed|failed|exit" "$OUT/suite.log" | tail -40; }
