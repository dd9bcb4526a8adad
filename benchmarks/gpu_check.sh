#!/usr/bin/env bash
# GPU check (needs a CUDA device): the exactness and energy checks of svdadapt on the GPU, then the init benchmark.
# Writes benchmarks/results/gpu_check.json; copy its table into docs/benchmarks.md ("GPU").
set -euo pipefail
cd "$(dirname "$0")/.."
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())"
python benchmarks/gpu_check.py --device cuda
