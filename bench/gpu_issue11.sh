#!/usr/bin/env bash
# Issue 11's GPU checks as one prepared run of a few minutes on one CUDA GPU (run from the repository root
# with dpfunc and a CUDA torch importable; Opacus optional):
#
#     bash bench/gpu_issue11.sh [DATA_DIR]
#
# 1. bench/speed.py rows of the issue's table on the GPU: SmallCNN 28² B = 256 / 1024 / 4096, the transformer
#    B = 256, ResNet-18-GN 64² B = 256 — non-private, dpfunc fast / bridge fast / vmap, Opacus hooks / ghost;
# 2. bench/gpu_profile.py: host time, kernel time, launches and syncs per step (SmallCNN B = 1024,
#    ResNet-18-GN B = 256);
# 3. the device-parametrised tests on the GPU (tests/test_devices.py; their CUDA cases skip without one).
# Everything is logged to ${LOG:-bench/results/gpu_issue11.log}; results under bench/results/.
set -uo pipefail
DATA=${1:-../shared/data}
PY=${PYTHON:-python3}
LOG=${LOG:-bench/results/gpu_issue11.log}
M="nonprivate dpfunc_fast dpfunc_bridge_fast dpfunc_vmap opacus_hooks opacus_ghost"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $PY -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0))"
  for spec in "cnn 1024" "resnet18 256" "cnn 256" "cnn 4096" "transformer 256"; do  # the targets' rows first
    set -- $spec
    echo "== speed $1 B=$2"
    timeout 120 $PY bench/speed.py --device cuda --models "$1" --batch-sizes "$2" --methods $M --no-memory \
        --repeats 10 --warmup 3 --output-suffix "_cuda_$1_$2" | grep -v "^$"
  done
  echo "== profile"
  timeout 120 $PY bench/gpu_profile.py --device cuda
  echo "== tests"
  DPFUNC_DATA="$DATA" CI=true HYPOTHESIS_PROFILE=ci timeout 180 $PY -m pytest -q -rs -p no:cacheprovider tests/test_devices.py
} 2>&1 | tee "$LOG"
