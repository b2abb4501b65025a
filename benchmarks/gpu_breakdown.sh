#!/usr/bin/env bash
# The per-stage GPU table of docs/benchmarks.md, for a machine with an NVIDIA GPU (not run here: no GPU in this project's
# containers so far). One command, about 5-8 minutes plus the students' first export: per-stage cost
# of the real V3 one-evaluation students (dit-512-8, dit-768-12) and the full V2 voice (Whisper
# large-v3 size) at real sizes, random weights, on torch fp16, ONNX Runtime CUDA and TensorRT (last: its engines take the longest to build; they are
# cached in ~/.cache/rtsvc/trt). Prints markdown tables; paste them into docs/benchmarks.md.
#   bash benchmarks/gpu_breakdown.sh            (from the repository root)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
for backends in torch-fp16 onnx-cuda onnx-tensorrt; do
  timeout 240 python -m benchmarks.realtime --backends "$backends" \
    --voices v3s-512,v3s-768,v2-512 --f0 rmvpe,fcpe --precision fp32 --threads 4 \
    --seconds 4 --rounds 1 || echo "($backends: stopped or failed, exit $?)"
done
