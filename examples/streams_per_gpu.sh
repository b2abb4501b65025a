#!/usr/bin/env bash
# Streams held in real time per GPU: full-size voices, fp16, torch vs ONNX Runtime
# CUDA / TensorRT, unbatched vs batched. Not yet run: written for a machine with one NVIDIA GPU.
#
#   PRETRAINED=pretrained examples/streams_per_gpu.sh v2.ckpt v2-fp16.rtsvc [v3.ckpt v3-fp16.rtsvc]
#
# A .ckpt runs on torch with fp16 autocast; a .rtsvc bundle (export it with `rtsvc export --fp16`)
# runs on ONNX Runtime, once with CUDA and once with TensorRT (engines are cached in
# ~/.cache/rtsvc/trt; the first TensorRT build of a full-size DiT takes minutes and is not timed).
# Each line of output is one `rtsvc bench --streams` table: per stream count and max batch, late
# blocks, latency p50/p99 and whether real time held; the last line names the largest count held.
# About 1 minute per model and backend with the defaults below (COUNTS x BATCHES runs of SECS s).
set -euo pipefail
PRE=${PRETRAINED:-pretrained}
COUNTS=${COUNTS:-4,8,16,32}
BATCHES=${BATCHES:-1,16}
SECS=${SECS:-5}
[ $# -ge 1 ] || { echo "usage: $0 MODEL.ckpt|MODEL.rtsvc ..." >&2; exit 2; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
bench() {
  echo "== $*"
  timeout 900 rtsvc bench --streams "$COUNTS" --max-batches "$BATCHES" --seconds "$SECS" \
    --device cuda --pretrained-dir "$PRE" --threads 4 "$@"
}
for model in "$@"; do
  case "$model" in
    *.ckpt) bench --model "$model" --backend torch --precision fp16 ;;
    *.rtsvc)
      bench --model "$model" --backend onnx --providers cuda,cpu
      bench --model "$model" --backend onnx --providers tensorrt,cuda,cpu ;;
    *) echo "skipping $model: not a .ckpt or .rtsvc" >&2 ;;
  esac
done
