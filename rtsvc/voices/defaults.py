"""Streaming defaults the voices declare, torch-free so the command line can show them in --help."""

from rtsvc.voice import StreamDefaults

# 2 mel frames = 23.2 ms: the DSP voice costs 12-21 ms a block of continuous voice on 2 AVX2 cores
# (auto may pick longer there); with the lengths below, the pulse client and the settled buffer,
# 92-102 ms mic to ear through PulseAudio without underruns (docs/benchmarks.md)
DSP_BLOCK_MS = 23.2
MODEL_BLOCK_MS = 150.0  # 13 frames = 150.9 ms: a model block costs 30-300 ms on a CPU (tiny: p99 0.28 of it)

# the DSP voice continues WORLD's pulse clock from window to window (rtsvc/voices/dsp.py), so SOLA
# only trims what F0 re-estimated with more right context moves: a 12 ms crossfade and 8 ms search,
# 9 ms less than the 15 / 20 ms its windows needed when each started its pulses afresh (a 6 ms search
# left 60 Hz output 318-695 cents off then). Pitch within 10 cents from 60 to 440 Hz out; speech as far
# from offline as before (2.47 dB LSD, 2.41 before), steady tones 0.6 dB further (docs/benchmarks.md).
# The jitter prime rides out pyworld holding the GIL (~5 ms a call): 20 ms, no underrun in 60 s; 10 ms
# underran 3-4 times a minute
DSP_STREAM = StreamDefaults(DSP_BLOCK_MS, crossfade_ms=12.0, sola_search_ms=8.0, jitter_ms=20.0)
# a model's blocks join less cleanly (each is sampled with its own context): longer fades, and a
# prime for compute that moves by tens of ms from block to block
MODEL_STREAM = StreamDefaults(MODEL_BLOCK_MS, crossfade_ms=25.0, sola_search_ms=10.0, jitter_ms=40.0)
DIT_CONTEXT_MS = 250.0  # streaming model voices: left context the DiT sees before the vocoded frames
# streaming model voices: left context the encoders (ContentVec, Whisper) see before the new samples;
# the engine's window (--context-ms + the block's tail) bounds it, so at the default context of 300 ms
# anything above ~335 ms is the whole window (docs/benchmarks.md)
ENCODER_CONTEXT_MS = 1000.0
MIN_ENCODER_CONTEXT_MS = 100.0  # a segment's first 100 ms (ENCODER_EDGE_FRAMES) keep their cached frames
VOCODER_CONTEXT_FRAMES = 8  # left frames vocoded before a tail: measured -50 dB off at 8, exact at 12
MAX_VOCODER_CONTEXT_FRAMES = 64
