#!/usr/bin/env bash
# One device-tool call: GPU test suite, then the benchmarks, results under $OUT.
#   bash examples/gpu_session.sh [tests] [attention] [decode] [quick]
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
what=" $* "
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv | tee "$OUT/nvidia-smi.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" | tee "$OUT/versions.txt"
if [[ $what == *" tests "* ]]; then
  # 6 xdist workers (pytest-xdist is on the H200 image): 143 s for the suite instead of 352 s
  timeout 420 python3 -m pytest -q -n ${WORKERS:-6} -p no:cacheprovider ${TESTS:-tests/test_gpu.py tests/test_kernels.py} 2>&1 | tee "$OUT/gpu_tests.log" | grep -v DEBUG | tail -40
fi
if [[ $what == *" attention "* ]]; then
  q=""; [[ $what == *" quick "* ]] && q="--quick"
  timeout 400 python3 examples/bench_attention.py --out "$OUT" $q ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench_attention.log" | tail -40
fi
if [[ $what == *" decode "* ]]; then
  q=""; [[ $what == *" quick "* ]] && q="--quick"
  timeout 500 python3 examples/bench_decode.py --out "$OUT" $q 2>&1 | tee "$OUT/bench_decode.log" | tail -40
fi
