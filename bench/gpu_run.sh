#!/usr/bin/env bash
# One prepared GPU run: check the device, install what is missing (timed), then time a QLoRA step of
# the Hugging Face stack and qlorakit on 1.7B- and 8B-shaped models. Everything goes to $OUT.
#   OUT=/tmp/gpu bash bench/gpu_run.sh
set -u
OUT=${OUT:-/tmp/qlorakit-gpu}
mkdir -p "$OUT"
exec > >(tee "$OUT/log.txt") 2>&1
cd "$(dirname "$0")/.."
echo "== $(date -u +%FT%TZ) $(uname -a)"
nvidia-smi || echo "nvidia-smi not available"
PY=$(command -v python3 || command -v python)
echo "== python: $PY $($PY --version 2>&1)"
t0=$(date +%s)
if ! $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "== installing torch"; $PY -m pip install -q torch || echo "torch install failed"
fi
for spec in transformers peft bitsandbytes accelerate safetensors yaml:pyyaml tqdm numpy; do
  mod=${spec%%:*}; pkg=${spec##*:}
  $PY -c "import $mod" 2>/dev/null || { echo "== installing $pkg"; $PY -m pip install -q "$pkg" || echo "$pkg install failed"; }
done
echo "== install seconds: $(( $(date +%s) - t0 ))"
$PY - <<'PYEOF'
import torch, transformers, peft, bitsandbytes
print("torch", torch.__version__, "cuda", torch.version.cuda, "device", torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)
print("transformers", transformers.__version__, "peft", peft.__version__, "bitsandbytes", bitsandbytes.__version__)
PYEOF
timeout 420 $PY bench/gpu_qlora_step.py --out "$OUT" --shapes "${SHAPES:-1.7B,8B}" --timeout "${SIDE_TIMEOUT:-150}" \
  --batch 4 --seq 1024 --warmup 2 --steps 3
echo "== done $(date -u +%FT%TZ), exit $?"
