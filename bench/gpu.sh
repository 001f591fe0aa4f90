#!/usr/bin/env bash
# The GPU figures in one short, prepared run (about 5 minutes on an H200): installs the normal CUDA
# wheels into .venv-gpu, then measures
#   - CLIP ViT-B-32 extraction, images/s at batch 256 on generated JPEGs (random init, same compute)
#   - the sweep ratios and configs/s (32 probes, 32 D=256 fusion heads) and D=256 head epochs/s
# and writes them, with the device named, under $OUT (the device tool's output folder) or bench/.
#
#   bash bench/gpu.sh            # on a machine with an NVIDIA GPU
set -euo pipefail
cd "$(dirname "$0")/.."
OUTDIR="${OUT:-bench}"
mkdir -p "$OUTDIR"
nvidia-smi -L | tee "$OUTDIR/gpu-device.txt"
if [ ! -x .venv-gpu/bin/python ]; then
  python3 -m venv .venv-gpu
  .venv-gpu/bin/pip install -q --upgrade pip
  .venv-gpu/bin/pip install -q torch torchvision
  .venv-gpu/bin/pip install -q -e ".[video]"
fi
PY=.venv-gpu/bin/python
$PY -c "import torch; assert torch.cuda.is_available(), 'no CUDA device visible to torch'; print(torch.cuda.get_device_name(0))"
$PY bench/bench_extract.py --preset clip --modality image --random-init --device cuda --batch-size 256 \
  --num-workers "$(nproc)" 2>&1 | tee "$OUTDIR/gpu-extract.txt"
$PY bench/run.py --threads 4 --out "$OUTDIR/results-gpu" 2>&1 | tee "$OUTDIR/gpu-run.txt"
