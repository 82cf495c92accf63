#!/usr/bin/env bash
# GPU evidence in one command, for a lent H100/H200: under 9.5 minutes in all (the device tool's 10-minute command limit).
# UNVERIFIED ON GPU: written and tested on a machine without a GPU (python -m benchmarks.gpu_check --smoke runs in the test suite).
#
#   bash benchmarks/gpu_check.sh            # results in $OUT (device tool) or benchmarks/results
#
# 1. python -m benchmarks.gpu_check: the reference pipeline's own loop functions on DeepLab-V2 R101 (random init, 2 + 2 crops of 730²),
#    fp32 and bf16, with and without protocl's terms, every step under sync-debug "error": step time, peak memory,
#    static-label throughput; protocl's orchestrator alone under sync-debug and in a CUDA graph;
# 2. python -m benchmarks.daformer_cost: the DAFormer-class step of examples/train_daformer.py (MiT-B5 from random weights,
#    DAFormer's decoder, 2 + 2 crops of 512² from a synthetic 1280x720 / 1024x512 dataset, bf16) timed part by part
#    (EMA, source CE, teacher labels, ClassMix, strong transform, mixed CE, optimizer), the plain step, the
#    control's step, and the peak memory of one step (the docs' memory figure); 150 s at most;
# 3. bench.py on cuda (protocl's losses against the release loops) with the time that is left.
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
python -c "import torch, numpy, einops, PIL" || { echo "missing torch/numpy/einops/Pillow on this machine"; exit 2; }
LOG="$OUT/gpu_log.txt"   # one log: the device tool returns at most 8 files
START=$(date +%s)
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || true
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())"
} 2>&1 | tee "$LOG"

status=0
timeout 400 python -m benchmarks.gpu_check --device cuda --out "$OUT" 2>&1 | tee -a "$LOG" || status=1
timeout 150 python -m benchmarks.daformer_cost --device cuda --arch mit-b5 --crop 512 --amp bf16 --steps 10 --warmup 3 --out "$OUT" 2>&1 | tee -a "$LOG" || status=1
LEFT=$(( 560 - ($(date +%s) - START) ))
if [ "$LEFT" -gt 60 ]; then
  timeout "$LEFT" python benchmarks/bench.py --device cuda --rounds 3 --out "$OUT" 2>&1 | tee -a "$LOG" || status=1
else
  echo "bench.py skipped: ${LEFT}s left of the 560-second budget" | tee -a "$LOG"
fi
date -u | tee -a "$LOG"
exit $status
