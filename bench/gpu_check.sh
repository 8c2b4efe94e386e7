#!/usr/bin/env bash
# The GPU check (issue 12), for a CUDA machine, in about 5-8 minutes: installs the engine beside the
# machine's own CUDA build of torch, runs the device tests (Testing/test_device.py) on CUDA, then the
# target case end to end three times (bench/bench_speed.py --device cuda), and prints the time per
# stage, the peak memory and the PSNR. The table goes to docs/benchmarks_gpu.md (a dry run's to bench/output/).
#
#   bench/gpu_check.sh [WHEELHOUSE]
#
# WHEELHOUSE: a folder of wheels for a machine without a package index (SimpleITK, vtk, tqdm,
# faiss-gpu-cu12 or faiss-cpu, pytest and their dependencies); without it pip reads the index. torch
# is never installed: the machine's is used (a CPU-only torch fails the check at once).
# Environment: GPU_CHECK_VENV (default bench/output/gpu-venv; an existing one is reused),
# GPU_CHECK_DEVICE (default cuda; cpu runs the same steps as a dry run on a machine without a GPU),
# GPU_CHECK_REPEATS (default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${GPU_CHECK_VENV:-bench/output/gpu-venv}
device=${GPU_CHECK_DEVICE:-cuda}
repeats=${GPU_CHECK_REPEATS:-3}
source_args=()
if [[ $# -ge 1 ]]; then
  source_args=(--no-index --find-links "$1")
fi
python=$venv/bin/python

[[ -x $python ]] || python3 -m venv --system-site-packages "$venv"
"$python" - "$device" <<'PY'
import sys

import torch

device = sys.argv[1]
if device == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu_check: torch {torch.__version__} sees no CUDA GPU (a CPU-only build, or no driver)")
name = torch.cuda.get_device_name(0) if device == "cuda" else "cpu"
print(f"gpu_check: torch {torch.__version__} on {name}")
PY
"$python" -m pip install -q "${source_args[@]}" -e . pytest
if [[ $device == cuda ]]; then
  # faiss-cpu and faiss-gpu provide the same module: one of them, the GPU's if it installs.
  "$python" -m pip uninstall -q -y faiss-cpu
  "$python" -m pip install -q "${source_args[@]}" faiss-gpu-cu12 \
    || { echo "gpu_check: no faiss-gpu, the neighbours are searched by torch"; \
         "$python" -m pip install -q "${source_args[@]}" faiss-cpu; }
fi
GAUSSIANSVR_TEST_DEVICE=$device "$python" -m pytest -q -p no:cacheprovider Testing/test_device.py
# Only a CUDA run is a GPU measurement: a dry run's table stays out of docs/.
table=docs/benchmarks_gpu.md
[[ $device == cuda ]] || table=bench/output/gpu_check_$device.md
"$python" bench/bench_speed.py --device "$device" --repeats "$repeats" --write "$table"
