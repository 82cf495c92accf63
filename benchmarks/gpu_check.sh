#!/usr/bin/env bash
# Prepared GPU check for a lent H100/H200 (issue 4). Budget: under 8 minutes in all.
# UNVERIFIED ON GPU: written and CPU-path-tested on a machine without a GPU.
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (device tool) or benchmarks/results
#
# 1. bench_step.py on cuda: protocl step/losses vs the release loops, all cases, peak memory, static labels;
# 2. gpu_check.py: DeepLab-V2 R101 step (2+2 crops of 730², fp32 and bf16) with and without protocl,
#    sync-debug mode "error" with value checks off, CUDA-graph capture of the protocl step;
# 3. bench_step.py --compile at the release's shapes (torch.compile variants; last, as compiling is the
#    slowest part and the least important).
# Each command has its own timeout so that one hang cannot eat the budget; a failure does not stop the rest.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src:$PWD:${PYTHONPATH:-}"
export PYTHONUNBUFFERED=1
# the device machine has no network: pure-Python dependencies can travel as wheels in .wheels/
#   (here: pip download einops matplotlib -d .wheels; then run with carry [".wheels"])
if [ -d .wheels ]; then pip install -q --no-index --find-links .wheels einops matplotlib 2>&1 | tail -2; fi
python -c "import torch, numpy, einops" || { echo "missing torch/numpy/einops on this machine"; exit 2; }
LOG="$OUT/gpu_log.txt"   # one log: the device tool returns at most 8 files
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG"

status=0
timeout 180 python benchmarks/bench_step.py --device cuda --out "$OUT" 2>&1 | tee -a "$LOG" || status=1
timeout 140 python benchmarks/gpu_check.py --device cuda --out "$OUT" 2>&1 | tee -a "$LOG" || status=1
timeout 150 python benchmarks/bench_step.py --device cuda --compile --cases release --no-static --no-memory \
  --formats json --out "$OUT" 2>&1 | tee -a "$LOG" || status=1
date -u | tee -a "$LOG"
exit $status
