#!/usr/bin/env bash
# One prepared GPU run: check the device, then time a QLoRA step of the Hugging Face stack and
# qlorakit on 1.7B- and 8B-shaped models (bench/gpu_qlora_step.py). Everything goes to $OUT.
#   OUT=/tmp/gpu bash bench/gpu_run.sh
# A machine without a package registry gets bitsandbytes from wheels in .whl/ (if that folder is
# there), installed into /tmp/site; nothing is downloaded.
set -u
OUT=${OUT:-/tmp/qlorakit-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
cd "$(dirname "$0")/.."
echo "== $(date -u +%FT%TZ) $(uname -srm)"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || echo "nvidia-smi not available"
PY=$(command -v python3 || command -v python)
echo "== python: $PY $($PY --version 2>&1)"
if ! $PY -c "import bitsandbytes" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
  echo "== installing from .whl: $(ls .whl)"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
for mod in torch transformers peft bitsandbytes accelerate safetensors yaml numpy; do
  $PY -c "import $mod" 2>/dev/null || echo "== missing: $mod"
done
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout "${TOTAL_TIMEOUT:-540}" $PY bench/gpu_qlora_step.py --out "$OUT" --shapes "${SHAPES:-1.7B,8B}" \
  --timeout "${SIDE_TIMEOUT:-150}" --batch 4 --seq 1024 --warmup 2 --steps 5
echo "== done $(date -u +%FT%TZ), exit $?"
