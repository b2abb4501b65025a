"""`--block-ms auto`: pick the block length by measuring the voice on this machine.

A voice's declared block (`stream_defaults.block_ms`) says nothing about this CPU, its load or the
model's size (the DSP voice's 46.4 ms block ran at p99 5x the block on a busy 2-core machine). So `live`,
`serve` and `convert --stream` measure: a copy of the voice (same weights, own stream state)
converts a few blocks of a sung test tone at a candidate block, and the shortest candidate whose
p99 compute stays within `P99_MARGIN` of the block wins. The search starts at the declared block
and walks down while it passes, up while it fails; `AutoBlock.summary()` says what was picked and why.
"""

import time
from dataclasses import dataclass, field, replace

import numpy as np

from rtsvc.dsp.audio import HOP_LENGTH
from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voice import Voice

# whole mel frames: 23.2, 34.8, 46.4, 69.7, 104.5, 150.9, 209.0, 301.9, 406.3, 603.7, 998.4 ms at 44.1 kHz
CANDIDATE_FRAMES = (2, 3, 4, 6, 9, 13, 18, 26, 35, 52, 86)
P99_MARGIN = 0.7  # p99 compute at most 0.7 of the block: 30% left for the audio thread and load spikes
MEASURED_BLOCKS = 8  # timed blocks per candidate (after the warm-up); p99 of 8 is about their max
WARMUP_BLOCKS = 2


@dataclass
class AutoBlock:
    """The picked block and every candidate measured: (block ms, p99 ms, mean ms)."""

    block_ms: float
    measured: list[tuple[float, float, float]] = field(default_factory=list)
    fits: bool = True  # False: even the longest candidate missed the margin
    pipelined: bool = False  # the times are of the slower pipeline stage (`--pipeline`)

    @property
    def headroom_ms(self) -> float:
        """Block minus mean compute at the picked block: how much later than usual a block may be
        computed before the engine falls behind (what `rtsvc live --jitter-ms auto` buffers)."""
        mean = {b: m for b, _, m in self.measured}[self.block_ms]
        return max(0.0, self.block_ms - mean)

    def summary(self) -> str:
        rows = {b: (p99, mean) for b, p99, mean in self.measured}
        p99, mean = rows[self.block_ms]
        others = ", ".join(f"{b:.1f} ms: p99 {p:.0f} ms = {p / b:.2f}" for b, p, _ in sorted(self.measured)
                           if b != self.block_ms)
        what = "p99 of the slower pipeline stage" if self.pipelined else "p99 compute"
        head = (f"auto block: {self.block_ms:.1f} ms (measured here: {what} {p99:.0f} ms = "
                f"{p99 / self.block_ms:.2f} of the block, mean {mean:.0f} ms; margin {P99_MARGIN:g})")
        if not self.fits:
            head += "; no candidate fits the margin: expect underruns, try a smaller model or --f0 fcpe"
        return head + (f"; also tried {others}" if others else "")


def frames_to_ms(frames: int, sample_rate: int) -> float:
    return frames * HOP_LENGTH * 1000.0 / sample_rate


def measure_pipelined(voice: Voice, config: StreamConfig, knobs: Knobs,
                      blocks: int = MEASURED_BLOCKS) -> tuple[float, float]:
    """`measure_block` for `--pipeline`: (p99, mean) ms of the slower stage, each stage timed on its
    own (features; DiT + vocoder), since two threads overlap them."""
    from rtsvc.pipeline import PipelinedAdapter

    engine = StreamingConverter(voice, RuntimeSettings(replace(knobs, gate_db=-120.0)), config)
    block = engine.layout.block
    audio = sung_tone((WARMUP_BLOCKS + blocks + 1) * block / voice.sample_rate, voice.sample_rate)
    piped = PipelinedAdapter(engine, voice.sample_rate, lambda out: None, threaded=False)
    piped.process(audio[: WARMUP_BLOCKS * block])
    piped.prepare_ms.clear()
    piped.run_ms.clear()
    for i in range(blocks):
        piped.process(audio[(WARMUP_BLOCKS + i) * block:(WARMUP_BLOCKS + i + 1) * block])
    stages = piped.stage_stats()
    slower = "prepare" if stages["prepare_ms_mean"] >= stages["run_ms_mean"] else "run"
    return (max(stages["prepare_ms_p99"], stages["run_ms_p99"]), stages[f"{slower}_ms_mean"])


def measure_block(voice: Voice, config: StreamConfig, knobs: Knobs,
                  blocks: int = MEASURED_BLOCKS, pipelined: bool = False) -> tuple[float, float]:
    """(p99 ms, mean ms) of compute per block for `voice` streaming a sung tone at `config` (with
    `pipelined`, of the slower pipeline stage: `measure_pipelined`)."""
    if pipelined:
        return measure_pipelined(voice, config, knobs, blocks)
    engine = StreamingConverter(voice, RuntimeSettings(replace(knobs, gate_db=-120.0)), config)
    block = engine.layout.block
    audio = sung_tone((WARMUP_BLOCKS + blocks + 1) * block / voice.sample_rate, voice.sample_rate)
    engine.process(audio[: WARMUP_BLOCKS * block])
    engine.reset_stats()
    times = []
    for i in range(blocks):  # one block per call, so each time is one block's compute
        chunk = audio[(WARMUP_BLOCKS + i) * block:(WARMUP_BLOCKS + i + 1) * block]
        started = time.perf_counter()
        engine.process(chunk)
        times.append((time.perf_counter() - started) * 1000.0)
    return float(np.percentile(times, 99)), float(np.mean(times))


def pick_block(voice: Voice, config: StreamConfig, knobs: Knobs | None = None,
               candidates: tuple[int, ...] = CANDIDATE_FRAMES, margin: float = P99_MARGIN,
               blocks: int = MEASURED_BLOCKS, pipelined: bool = False) -> AutoBlock:
    """Measure candidates (in mel frames) around the voice's declared block; the shortest that fits."""
    knobs = knobs or Knobs()
    config = config.with_defaults(voice.stream_defaults)
    config.for_voice(voice)  # the declared block must suit the other lengths (crossfade), as before
    probe = voice.fork() if hasattr(voice, "fork") else voice  # its own stream state, same weights
    rate = voice.sample_rate
    sizes = [frames_to_ms(f, rate) for f in candidates if frames_to_ms(f, rate) >= config.crossfade_ms]
    declared = min(range(len(sizes)), key=lambda i: abs(sizes[i] - voice.stream_defaults.block_ms))
    results: dict[int, tuple[float, float]] = {}

    def fits(i: int) -> bool:
        if i not in results:
            probe.reset()
            results[i] = measure_block(probe, replace(config, block_ms=sizes[i]), knobs, blocks, pipelined)
        return results[i][0] <= margin * sizes[i]

    i = declared
    if fits(i):
        while i > 0 and fits(i - 1):
            i -= 1
        chosen, ok = i, True
    else:
        while i + 1 < len(sizes) and not fits(i + 1):
            i += 1
        chosen = i + 1 if i + 1 < len(sizes) else i
        ok = fits(chosen)
    probe.reset()
    voice.reset()
    measured = [(sizes[j], p99, mean) for j, (p99, mean) in sorted(results.items())]
    return AutoBlock(sizes[chosen], measured, ok, pipelined)


def resolve_block(voice: Voice, config: StreamConfig, knobs: Knobs | None = None,
                  say=None) -> StreamConfig:
    """`config` for `voice`: a given block as it is; an auto block measured here (`pick_block`),
    with the choice passed to `say` (e.g. print)."""
    return resolve_block_choice(voice, config, knobs, say)[0]


def resolve_block_choice(voice: Voice, config: StreamConfig, knobs: Knobs | None = None,
                         say=None, pipelined: bool = False) -> tuple[StreamConfig, AutoBlock | None]:
    """`resolve_block`, and the measurement behind an auto block (None for a given block)."""
    if config.block_ms is not None:
        return config.for_voice(voice), None
    choice = pick_block(voice, config, knobs, pipelined=True) if pipelined else \
        pick_block(voice, config, knobs)
    if say is not None:
        say(choice.summary())
    return replace(config, block_ms=choice.block_ms).for_voice(voice), choice


def start_voice(spec, knobs: Knobs, requested_steps: int | None, config: StreamConfig | None = None,
                say=None, pipelined: bool = False
                ) -> tuple[Voice, Knobs, StreamConfig | None, AutoBlock | None]:
    """How live, serve and convert start: open `spec` (a `VoiceSpec`), take the steps it runs
    (`--steps` as `requested_steps`, else a student's own), fit the block (auto: measured here;
    `config` None: not streaming), then say which voice. Returns (voice, knobs, config, the auto
    block's measurement or None)."""
    from rtsvc.voices.spec import describe_voice, open_voice, sampling_steps

    voice = open_voice(spec)
    knobs = sampling_steps(knobs, voice, requested_steps)
    choice = None
    if config is not None:  # first: a block that does not fit is a mistake, said alone
        config, choice = resolve_block_choice(voice, config, knobs, say, pipelined=pipelined)
    if say is not None:
        say(describe_voice(voice, spec.model, knobs.speaker))
    return voice, knobs, config, choice
