"""A model voice's two pipeline stages per block length, and their fixed (per-block) costs.

    python -m benchmarks.stage_split --model student.rtsvc --pretrained-dir P --f0 fcpe [--blocks 8]

For each candidate block (46.4 ... 209 ms) streams a sung tone through the engine with the stages
timed apart (`rtsvc.pipeline.PipelinedAdapter`, inline): features (F0, RMS, ContentVec: stage 1)
and DiT + vocoder (stage 2). A straight line through each stage's mean cost against the block
length gives its fixed cost per block (what does not shrink with the block: the encoders' context
window, the vocoder's context frames, the DiT's left context) and its cost per ms of audio. With
`--pipeline` a block fits when the slower stage does; without it, when their sum does.
"""

import argparse
from dataclasses import replace

import numpy as np

from rtsvc.autoblock import MEASURED_BLOCKS, frames_to_ms, measure_block
from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.pipeline import PipelinedAdapter
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voices.spec import VoiceSpec, open_voice, sampling_steps


def timed_blocks(voice, config: StreamConfig, knobs: Knobs, blocks: int,
                 after_block=None) -> PipelinedAdapter:
    """`blocks` blocks of a sung tone through the two stages (one thread), after two warm-up blocks
    whose times are dropped; `after_block()` runs after each timed block. Returns the adapter (its
    `prepare_ms` / `run_ms` hold the timed blocks)."""
    engine = StreamingConverter(voice, RuntimeSettings(replace(knobs, gate_db=-120.0)), config)
    piped = PipelinedAdapter(engine, voice.sample_rate, lambda out: None, threaded=False)
    n = engine.layout.block
    audio = sung_tone((blocks + 3) * n / voice.sample_rate, voice.sample_rate)
    piped.process(audio[: 2 * n])
    piped.prepare_ms.clear()
    piped.run_ms.clear()
    for i in range(blocks):
        piped.process(audio[(2 + i) * n:(3 + i) * n])
        if after_block is not None:
            after_block()
    return piped


def stage_times(voice, config: StreamConfig, knobs: Knobs, blocks: int) -> dict:
    """Each stage's mean and p99 (ms) over `blocks` blocks of a sung tone, after two warm-up blocks."""
    return timed_blocks(voice, config, knobs, blocks).stage_stats()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pretrained-dir", default="pretrained")
    ap.add_argument("--f0", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--blocks", type=int, default=MEASURED_BLOCKS, help="timed blocks per length")
    ap.add_argument("--frames", default="4,6,9,13,18", help="block lengths in mel frames")
    args = ap.parse_args()
    spec = VoiceSpec(model=args.model, pretrained_dir=args.pretrained_dir, f0=args.f0, streaming=True,
                     threads=args.threads)
    voice = open_voice(spec)
    knobs = sampling_steps(Knobs(), voice, None)
    frames = [int(f) for f in args.frames.split(",")]
    rows = []
    heads = ("block ms", "sum mean", "sum p99", "features", "p99", "DiT+voc", "p99")
    print(" ".join(f"{h:>9}" for h in heads))
    for f in frames:
        block = frames_to_ms(f, voice.sample_rate)
        config = replace(StreamConfig(), block_ms=block)
        voice.reset()
        total_p99, total_mean = measure_block(voice, config, knobs, args.blocks)
        voice.reset()
        st = stage_times(voice, config, knobs, args.blocks)
        rows.append((block, total_mean, st["prepare_ms_mean"], st["run_ms_mean"]))
        cells = (block, total_mean, total_p99, st["prepare_ms_mean"], st["prepare_ms_p99"], st["run_ms_mean"],
                 st["run_ms_p99"])
        print(" ".join(f"{c:9.1f}" for c in cells), flush=True)
    if len(rows) >= 2:
        blocks = np.array([r[0] for r in rows])
        for name, col in (("features", 2), ("DiT+vocoder", 3), ("sum", 1)):
            slope, fixed = np.polyfit(blocks, np.array([r[col] for r in rows]), 1)
            print(f"{name}: fixed {fixed:.1f} ms per block + {slope:.3f} ms per ms of block")


if __name__ == "__main__":
    main()
