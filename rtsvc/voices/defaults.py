"""Streaming defaults the voices declare, torch-free so the command line can show them in --help."""

DSP_BLOCK_MS = 50.0  # 4 mel frames = 46.4 ms: DSP voice p99 ~0.45 of the block, 2 cores (docs/benchmarks.md)
MODEL_BLOCK_MS = 150.0  # 13 frames = 150.9 ms: a model block costs 30-300 ms on a CPU (tiny: p99 0.28 of it)
DIT_CONTEXT_MS = 250.0  # streaming model voices: left context the DiT sees before the vocoded frames
