#!/usr/bin/env bash
# The GPU figures in one short, prepared run (about 6 minutes on an H200), then written, with the device
# named, under $OUT (when set) or bench/:
#   - CLIP ViT-B-32 extraction, images/s at batch 256 on generated JPEGs (random init, same compute)
#   - the sweep ratios and configs/s (32 probes, 32 D=256 fusion heads) and D=256 head epochs/s
#   - fine-tuning CLIP ViT-B-32 (random init) at batch 64: samples/s and peak memory, full vs LoRA,
#     each with and without gradient checkpointing
#
# It runs from the source tree with the machine's own python3 and torch (a GPU machine with no network
# has them, but not every package mmcache needs): the packages it lacks come as wheels in .whl/, made
# beforehand on a machine with network by `make gpu-wheels`. Where the network is there, a plain
#   python3 -m pip install -e ".[lora]"
# does the same.
#
#   bash bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-bench}"
mkdir -p "$OUTDIR"
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUTDIR/gpu-device.txt"
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/mmcache-site .whl/*.whl
  export PYTHONPATH="/tmp/mmcache-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
$PY - <<'EOF'
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
missing = [m for m in ("open_clip", "transformers", "h5py", "typer", "filelock", "peft", "sklearn", "safetensors")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing packages {missing}: run `make gpu-wheels` on a machine with network and bring .whl/ along")
print(torch.cuda.get_device_name(0), "torch", torch.__version__)
EOF
$PY bench/bench_extract.py --preset clip --modality image --random-init --device cuda --batch-size 256 \
  --num-workers "$(nproc)" 2>&1 | tee "$OUTDIR/gpu-extract.txt"
$PY bench/bench_finetune.py --random-init --device cuda --batch-size 64 --steps 40 --num-workers 8 \
  --json "$OUTDIR/gpu-finetune.json" 2>&1 | grep -v "^warning:" | tee "$OUTDIR/gpu-finetune.txt"
$PY bench/run.py --threads 4 --out "$OUTDIR/results-gpu" 2>&1 | tee "$OUTDIR/gpu-run.txt"
