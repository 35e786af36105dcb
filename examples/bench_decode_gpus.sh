#!/usr/bin/env bash
# One device-tool call on a machine of several GPUs: one bench_decode run per GPU, all at
# once (each with its own --jobs workers), under one time limit so that a run cut short still
# leaves its finished rows (bench_decode.<method>.partial.json). Results of run i go to
# $OUT/run<i>/, and everything is packed into $OUT/results.tar.gz (the device tool returns
# few files).
#   OUT=... LIMIT=540 [PRE="<command>"] bash examples/bench_decode_gpus.sh "<bench_decode args, GPU 0>" "<args, GPU 1>" ...
# PRE (e.g. the GPU tests, or bench_select on one GPU) runs beside the compiles, its output in
# $OUT/pre.log, and counts at the barrier: timing starts when it is done.
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
limit=${LIMIT:-540}
nvidia-smi --query-gpu=index,name,driver_version,clocks.sm,clocks.mem,memory.used --format=csv > "$OUT/nvidia-smi.txt"
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'gpus', torch.cuda.device_count())" | tee "$OUT/versions.txt"
# Workers dump their stacks 60 s before the limit (they start 10-30 s after their run, so a
# smaller margin let the limit kill them first on the H200). Every worker of every run (and
# PRE) meets at one machine-wide barrier before timing: no compile then competes with a timed
# step for the host's cores.
sync="$OUT/sync"; rm -rf "$sync"; mkdir -p "$sync"
count=0
default_methods=$(cd examples && python3 -c "import bench_decode; print(len(bench_decode.DEFAULT_METHODS))")
for spec in "$@"; do
  methods=$(echo "$spec" | sed -n 's/.*--methods \([^ ]*\).*/\1/p')
  n=$default_methods; [ -n "$methods" ] && n=$(echo "$methods" | tr ',' '\n' | wc -l)
  count=$((count + n))
done
if [ -n "${PRE:-}" ]; then
  count=$((count + 1))
  (timeout "$limit" bash -c "$PRE" > "$OUT/pre.log" 2>&1; touch "$sync/pre") &
fi
i=0
for spec in "$@"; do
  mkdir -p "$OUT/run$i"
  echo "$spec" > "$OUT/run$i/args.txt"
  # shellcheck disable=SC2086
  CUDA_VISIBLE_DEVICES=$i timeout "$limit" python3 examples/bench_decode.py --out "$OUT/run$i" --sync-dir "$sync" --sync-count $count --sync-wait ${SYNC_WAIT:-120} --dump-after $((limit - 60)) $spec > "$OUT/run$i/bench_decode.log" 2>&1 &
  i=$((i + 1))
done
wait
for d in "$OUT"/run*/; do
  # a finished run's bench_decode.json holds every row: its partial files are redundant
  [ -f "$d/bench_decode.json" ] && rm -f "$d"/bench_decode.*.partial.json
  echo "== $d: $(cat "$d/args.txt")"
  grep -v -E "Warning|warn\(|^\s*$|DEBUG" "$d/bench_decode.log" | tail -25
done
[ -f "$OUT/pre.log" ] && { echo "== PRE: $PRE"; grep -v -E "DEBUG|warn" "$OUT/pre.log" | tail -${PRE_TAIL:-12}; }
tar -czf "$OUT/results.tar.gz" -C "$OUT" versions.txt nvidia-smi.txt $(cd "$OUT" && ls -d run* pre.log pre 2>/dev/null)
rm -rf "$OUT/pre.log" "$OUT/pre" "$sync"
rm -rf "$OUT"/run*
