#!/usr/bin/env bash
# One device-tool call with the embedded model (carried as ../shared/DEVICE_MODEL.md says:
# piece 1 copied to /tmp/dm by the call before, .device_model_b carried by this one):
# the demo alone on the GPU, a role-learning smoke run (seconds per step), the 8B-shaped
# learn-roles memory check, and an eval on CUDA. Results under $OUT (demo.txt, learn/, eval/,
# packed into results.tar.gz beside the logs).
#   OUT=... EVAL="<eval args>" bash examples/gpu_model_session.sh
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT/learn" "$OUT/eval"
. examples/gpu_model_install.sh || exit 3
# 1. the demo, alone on the machine (its speed line is a measurement)
timeout "${DEMO_LIMIT:-150}" python3 -m lychee_fx demo --no-progress ${DEMO:-} > "$OUT/demo.txt" 2>&1; echo "demo exit $?" >> "$OUT/demo.txt"
# 2. beside each other, after the demo: a role-learning smoke run on CUDA (its log's
#    elapsed_s gives seconds per step, with the other two sharing the GPU and the cores), the
#    8B-shaped learn-roles memory check, and the eval (a quality measurement, not a timing)
(timeout "${LEARN_LIMIT:-70}" python3 -m lychee_fx learn-roles --count 12 --steps "${LEARN_STEPS:-40}" --log-every 10 --device cuda \
   --dtype float32 --no-progress --out "$OUT/learn/smoke.roles.json" --checkpoint /tmp/smoke.ckpt > "$OUT/learn/smoke.txt" 2>&1
 echo "learn exit $?" >> "$OUT/learn/smoke.txt") &
(timeout "${MEM_LIMIT:-120}" python3 examples/learn_roles_memory.py --out "$OUT/learn/learn_roles_memory.json" > "$OUT/learn/memory.txt" 2>&1
 echo "memory exit $?" >> "$OUT/learn/memory.txt") &
if [ -n "${EVAL:-}" ]; then
  # shellcheck disable=SC2086
  timeout "${EVAL_LIMIT:-200}" python3 -m lychee_fx eval --no-progress --out "$OUT/eval" $EVAL > "$OUT/eval/eval.txt" 2>&1
  echo "eval exit $?" >> "$OUT/eval/eval.txt"
fi
wait
echo "== demo"; grep -v -E "Warning|warn\(" "$OUT/demo.txt" | tail -${DEMO_TAIL:-25}
echo "== learn"; tail -4 "$OUT/learn/smoke.txt"; tail -12 "$OUT/learn/memory.txt"
echo "== eval"; grep -v -E "Warning|warn\(" "$OUT/eval/eval.txt" | tail -${EVAL_TAIL:-30}
tar -czf "$OUT/results.tar.gz" -C "$OUT" versions.txt demo.txt learn eval && rm -rf "$OUT/learn" "$OUT/eval"
