"""A model voice's encoder window and vocoder context: per-block stage cost against the distance they add.

    python -m benchmarks.context_trade --model student.rtsvc --pretrained-dir P --f0 fcpe \
        --encoder-ms 1000,500,300,200,100 --vocoder-frames 8,4 --rounds 3

Every (encoder context, vocoder context) pair is a streaming variant over the same loaded voice. Per
variant, at one block length (default 150.9 ms, the engine's other lengths at their defaults):

- distance: espeak-ng speech and a sung tone (4 s each) streamed through the engine, LSD (dB) and
  mel L1 (rtsvc eval's metric) against the offline conversion of the whole clip, and against the
  default variant's stream (what the cut itself changes; 0 = bit-identical output);
- cost: each pipeline stage's median ms per block (as `benchmarks.stage_split`: features = stage 1,
  DiT + vocoder = stage 2; and the voice's own parts: ContentVec, F0, DiT, vocoder) over `--blocks`
  blocks, the variants alternating within each of `--rounds` rounds so a changing load hits them all
  alike; the mean over rounds of those medians and its range. Medians, because a shared machine may
  pause a process (SIGSTOP) in the middle of a block.

The encoders never see more than the engine's window: its left part is --context-ms + crossfade +
SOLA search (~335 ms at the defaults), so longer encoder contexts cost and sound the same.
"""

import argparse
import json
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.stage_split import timed_blocks
from rtsvc.bench.blocks import log_spectral_distance
from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig, convert_stream
from rtsvc.eval.metrics import mel_l1
from rtsvc.settings import Knobs
from rtsvc.voices.defaults import ENCODER_CONTEXT_MS, VOCODER_CONTEXT_FRAMES
from rtsvc.voices.model import ModelVoice
from rtsvc.voices.spec import VoiceSpec, open_voice, sampling_steps


def inputs(seconds: float) -> dict[str, np.ndarray]:
    from benchmarks.realtime import speech_audio

    n = int(seconds * 44100)
    return {"speech": speech_audio()[:n], "sung": sung_tone(seconds)}


def variant(voice: ModelVoice, encoder_ms: float, frames: int) -> ModelVoice:
    return voice.for_streaming(encoder_context_s=encoder_ms / 1000.0, vocoder_context=frames)


def distances(voice: ModelVoice, pairs: list[tuple[float, int]], knobs: Knobs, config: StreamConfig,
              clips: dict[str, np.ndarray]) -> dict:
    """Per pair and clip: LSD and mel L1 against offline and against the default pair's stream."""
    offline = ModelVoice(voice.backend, voice.features, streaming=False)
    out: dict = {}
    for name, audio in clips.items():
        ref = offline.convert(audio, knobs)
        default = convert_stream(variant(voice, ENCODER_CONTEXT_MS, VOCODER_CONTEXT_FRAMES), audio, knobs,
                                 config)
        for pair in pairs:
            streamed = convert_stream(variant(voice, *pair), audio, knobs, config)
            out.setdefault(pair, {})[name] = {
                "lsd_offline": log_spectral_distance(streamed, ref), "mel_l1_offline": mel_l1(streamed, ref),
                "lsd_default": log_spectral_distance(streamed, default),
                "mel_l1_default": mel_l1(streamed, default),
                "identical_to_default": bool(np.array_equal(streamed, default))}
            print(f"  distance {pair} {name}: {out[pair][name]}", flush=True)
    return out


PARTS = ("contentvec", "f0")  # stage 1's parts (stage 2 runs outside the voice's own timing here)


def block_medians(voice: ModelVoice, config: StreamConfig, knobs: Knobs, blocks: int) -> dict:
    """Median ms per block of each stage and of the voice's parts, after two warm-up blocks."""
    parts: dict = {p: [] for p in PARTS}

    def collect() -> None:
        for p in PARTS:
            parts[p].append(voice.last_ms.get(p, 0.0))

    piped = timed_blocks(voice, config, knobs, blocks, after_block=collect)
    out = {"features": float(np.median(piped.prepare_ms)), "dit_vocoder": float(np.median(piped.run_ms))}
    return {**out, **{p: float(np.median(v)) for p, v in parts.items()}}


def costs(voice: ModelVoice, pairs: list[tuple[float, int]], knobs: Knobs, config: StreamConfig,
          blocks: int, rounds: int) -> dict:
    """Per pair, each round's stage means; the variants alternate inside every round."""
    per: dict = {p: [] for p in pairs}
    for r in range(rounds):
        order = pairs if r % 2 == 0 else pairs[::-1]  # no variant always runs first
        for pair in order:
            per[pair].append({**block_medians(variant(voice, *pair), config, knobs, blocks),
                              "load_1m": os.getloadavg()[0]})
        print(f"  round {r + 1}: " + ", ".join(
            f"{p}: {per[p][-1]['features']:.0f}+{per[p][-1]['dit_vocoder']:.0f}" for p in pairs), flush=True)
    return per


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--pretrained-dir", default="pretrained")
    ap.add_argument("--f0", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--block-ms", type=float, default=150.0)
    ap.add_argument("--encoder-ms", default="1000,500,300,200,100")
    ap.add_argument("--vocoder-frames", default="8,4")
    ap.add_argument("--blocks", type=int, default=8, help="timed blocks per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=4.0, help="audio per clip for the distances")
    ap.add_argument("--clips", default="all", choices=("all", "speech", "sung", "none"),
                    help="clips for the distances (none: costs only)")
    ap.add_argument("--json", default=None, help="also write the figures as JSON here (default: no file)")
    args = ap.parse_args()
    voice = open_voice(VoiceSpec(model=args.model, pretrained_dir=args.pretrained_dir, f0=args.f0,
                                 streaming=True, threads=args.threads))
    knobs = sampling_steps(Knobs(gate_db=-120.0), voice, None)
    config = replace(StreamConfig(), block_ms=args.block_ms).for_voice(voice)
    pairs = [(float(e), int(v)) for v in args.vocoder_frames.split(",") for e in args.encoder_ms.split(",")]
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"{started}, load {os.getloadavg()}, block {config.block_ms:g} ms, context {config.context_ms:g} "
          f"ms, steps {knobs.steps}", flush=True)
    dist = {} if args.clips == "none" else distances(voice, pairs, knobs, config,
                                                     {k: v for k, v in inputs(args.seconds).items()
                                                      if args.clips == "all" or k == args.clips})
    cost = costs(voice, pairs, knobs, config, args.blocks, args.rounds)
    if args.json:
        Path(args.json).write_text(json.dumps({"distances": {str(k): v for k, v in dist.items()},
                                               "costs": {str(k): v for k, v in cost.items()}}, indent=1))
    print(f"\nstarted {started}, ended {time.strftime('%H:%M UTC', time.gmtime())}, load {os.getloadavg()}")
    print("| encoder ms | vocoder frames | features ms (range) | DiT+vocoder ms (range) | ContentVec | F0 "
          "| LSD dB vs offline speech / sung | mel L1 vs offline | LSD dB vs default "
          "| mel L1 vs default |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for pair in pairs:
        f = [c["features"] for c in cost[pair]] or [float("nan")]  # --rounds 0: distances only
        d = [c["dit_vocoder"] for c in cost[pair]] or [float("nan")]
        q = dist.get(pair, {})
        cell = lambda key, q=q: " / ".join(f"{q[n][key]:.3f}" for n in q)  # noqa: E731
        same = " (identical)" if q and all(q[n]["identical_to_default"] for n in q) else ""
        print(f"| {pair[0]:g} | {pair[1]} | {np.mean(f):.1f} ({min(f):.0f}-{max(f):.0f}) | {np.mean(d):.1f} "
              f"({min(d):.0f}-{max(d):.0f}) | "
              + " | ".join(f"{np.mean([c[p] for c in cost[pair]] or [np.nan]):.1f}" for p in PARTS)
              + f" | {cell('lsd_offline')} | {cell('mel_l1_offline')} | "
              f"{cell('lsd_default')}{same} | {cell('mel_l1_default')} |")


if __name__ == "__main__":
    main()
