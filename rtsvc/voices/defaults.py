"""Streaming defaults the voices declare, torch-free so the command line can show them in --help."""

DSP_BLOCK_MS = 50.0  # 4 mel frames = 46.4 ms: DSP voice p99 ~0.45 of the block, 2 cores (docs/benchmarks.md)
MODEL_BLOCK_MS = 150.0  # 13 frames = 150.9 ms: a model block costs 30-300 ms on a CPU (tiny: p99 0.28 of it)
DIT_CONTEXT_MS = 250.0  # streaming model voices: left context the DiT sees before the vocoded frames
# streaming model voices: left context the encoders (ContentVec, Whisper) see before the new samples;
# the engine's window (--context-ms + the block's tail) bounds it, so at the default context of 300 ms
# anything above ~335 ms is the whole window (docs/benchmarks.md)
ENCODER_CONTEXT_MS = 1000.0
MIN_ENCODER_CONTEXT_MS = 100.0  # a segment's first 100 ms (ENCODER_EDGE_FRAMES) keep their cached frames
VOCODER_CONTEXT_FRAMES = 8  # left frames vocoded before a tail: measured -50 dB off at 8, exact at 12
MAX_VOCODER_CONTEXT_FRAMES = 64
