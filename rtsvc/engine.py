"""THE streaming engine: any voice, block by block, with SOLA joins and exact sample accounting.

Shared by `rtsvc live`, `rtsvc serve`, `rtsvc convert --stream` and `rtsvc bench`. Per block:

    ring buffer  [ left context | ... block + crossfade + SOLA search (the "tail") ]   <- new block
    voice.convert(window, knobs, start_sample, tail)       -> tail samples
    SOLA: best offset of the tail's head against the previous block's kept tail
    output = tail[offset : offset + block], its head crossfaded with the kept tail
    kept tail = tail[offset + block : offset + block + crossfade]

Algorithmic latency (what `latency_samples` reports; exact for a voice that does not move
waveforms in time, i.e. when SOLA settles on the centre of its search range):
    block        (a block must be complete before it is converted)
  + crossfade    (the kept tail that the next block fades into)
  + SOLA search - centre  (the output is cut `centre` samples into the search range)
  + the denoiser's delay   (when the `denoise` knob is on: rtsvc.dsp.denoise runs on the input first)
The gate (silence out, the voice skipped) closes on a quiet block (`gate_db`) or, with `vad` on, on a
block without speech (rtsvc.dsp.vad; it adds no delay: it judges the frames complete so far).
Output and input have the same length at every call: the output is the input delayed by that.
"""

import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

import numpy as np

from rtsvc.dsp.audio import HOP_LENGTH, StreamResampler, db_to_gain
from rtsvc.dsp.denoise import make_denoiser  # the native libraries load only when one is made
from rtsvc.dsp.limiter import soft_limit
from rtsvc.dsp.sola import crossfade, find_sola_offset
from rtsvc.dsp.vad import StreamVad  # onnxruntime loads only when `vad` is on
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voice import StreamDefaults, Voice

GATE_FRAME_MS = 10.0  # the gate opens when any 10 ms frame of the block's region is above threshold
STATS_WINDOW = 2000  # blocks kept for compute-time percentiles
RECENT_BLOCKS = 8  # compute_ms_recent: the mean of the last few blocks (what `live` watches for overload)


def auto_block_ms(voice: Voice) -> float:
    """The block length for `block_ms=None` ("auto"): the one the voice declares."""
    return float(voice.stream_defaults.block_ms)


def parse_block_ms(text: str, option: str = "--block-ms") -> float | None:
    """A block length option: "auto" -> None (see `auto_block_ms`), else milliseconds."""
    if text.strip().lower() == "auto":
        return None
    try:
        return float(text)
    except ValueError:
        raise UserError(f"{option} must be a number of ms or auto, got {text!r}") from None


@dataclass
class StreamConfig:
    """Lengths in milliseconds. Block and context are rounded to whole mel frames (512 samples)
    so every window starts on the model's frame grid; defaults come from docs/streaming.md.
    None is the voice's own (`Voice.stream_defaults`): `block_ms=None` is "auto" (`auto_block_ms`),
    crossfade and search the voice's; `for_voice` resolves them (the engine does)."""

    block_ms: float | None = None
    context_ms: float = 300.0
    crossfade_ms: float | None = None
    sola_search_ms: float | None = None

    def validate(self) -> "StreamConfig":
        """Check the ranges (of what is given: the voice's own lengths are checked by for_voice)."""
        if self.block_ms is not None and not 10.0 <= self.block_ms <= 2000.0:
            raise UserError(f"block must be between 10 and 2000 ms, got {self.block_ms:g}")
        if not 0.0 <= self.context_ms <= 10000.0:
            raise UserError(f"context must be between 0 and 10000 ms, got {self.context_ms:g}")
        block_ms = 2000.0 if self.block_ms is None else self.block_ms  # auto: checked by for_voice
        if self.crossfade_ms is not None and not 0.0 <= self.crossfade_ms <= block_ms:
            raise UserError(f"crossfade must be between 0 and the block length, got {self.crossfade_ms:g} ms")
        if self.sola_search_ms is not None and not 0.0 <= self.sola_search_ms <= 100.0:
            raise UserError(f"SOLA search must be between 0 and 100 ms, got {self.sola_search_ms:g}")
        return self

    def with_defaults(self, defaults: StreamDefaults) -> "StreamConfig":
        """This config with crossfade and search not given taken from `defaults`; the block stays."""
        pick = lambda own, default: default if own is None else own  # noqa: E731
        return replace(self, crossfade_ms=pick(self.crossfade_ms, defaults.crossfade_ms),
                       sola_search_ms=pick(self.sola_search_ms, defaults.sola_search_ms)).validate()

    def for_voice(self, voice: Voice) -> "StreamConfig":
        """This config with the voice's lengths where none are given and an auto block resolved for
        `voice` (see `auto_block_ms`), validated."""
        config = self.with_defaults(voice.stream_defaults)
        block_ms = auto_block_ms(voice) if config.block_ms is None else config.block_ms
        return replace(config, block_ms=block_ms).validate()


@dataclass(frozen=True)
class StreamLayout:
    """The config in samples at the voice's rate."""

    block: int
    context: int
    crossfade: int
    search: int
    window: int  # samples handed to the voice each block
    tail: int  # output samples asked of the voice: block + crossfade + search
    centre: int  # nominal SOLA offset

    @classmethod
    def from_config(cls, config: StreamConfig, sample_rate: int) -> "StreamLayout":
        if None in (config.block_ms, config.crossfade_ms, config.sola_search_ms):
            raise ValueError("a config with the voice's own lengths (None) needs the voice: use "
                             "config.for_voice(voice)")

        def to_samples(ms: float) -> int:
            return int(round(ms * sample_rate / 1000.0))

        block = max(HOP_LENGTH, int(round(to_samples(config.block_ms) / HOP_LENGTH)) * HOP_LENGTH)
        crossfade_len, search = to_samples(config.crossfade_ms), to_samples(config.sola_search_ms)
        tail = block + crossfade_len + search
        # round the whole window up to whole frames; the extra goes to the left context
        window = -(-(to_samples(config.context_ms) + tail) // HOP_LENGTH) * HOP_LENGTH
        return cls(block, window - tail, crossfade_len, search, window, tail, search // 2)

    @property
    def latency(self) -> int:
        return self.block + self.crossfade + self.search - self.centre


class StreamingConverter:
    """Streams audio at `voice.sample_rate` through `voice`; see the module docstring."""

    def __init__(self, voice: Voice, settings: RuntimeSettings | None = None,
                 config: StreamConfig | None = None):
        self.voice = voice
        self.settings = settings or RuntimeSettings()
        self.config = (config or StreamConfig()).for_voice(voice)
        self.sample_rate = int(voice.sample_rate)
        self.layout = StreamLayout.from_config(self.config, self.sample_rate)
        self._denoiser, self._denoise_name, self._denoise_ms = None, "off", 0.0
        self._switch_denoiser(self.settings.snapshot().denoise)
        self._gate_frame = max(1, int(GATE_FRAME_MS * self.sample_rate / 1000))
        # the detector (~1 s to load on a busy CPU) is made at start when `vad` is on, else when first
        # switched on; switched off it is kept, and starts afresh when switched on again
        self._vad = StreamVad(self.sample_rate) if self.settings.snapshot().vad == "on" else None
        self._vad_on = False
        self._lock = threading.Lock()  # guards the counters read by stats() from other threads
        self.reset()

    @property
    def latency_samples(self) -> int:
        """Input-to-output delay in samples at `sample_rate` (the denoiser's included when on)."""
        return self.layout.latency + (self._denoiser.latency_samples if self._denoiser is not None else 0)

    @property
    def latency_ms(self) -> float:
        return self.latency_samples * 1000.0 / self.sample_rate

    def _switch_denoiser(self, name: str) -> None:
        """Follow the `denoise` knob. Switching on delays the output by the denoiser's latency (it
        starts with that much silence); switching off drops the audio it held. DeepFilterNet takes
        ~0.3 s to load, so this runs on the engine's thread, never in an audio callback."""
        if self._denoiser is not None:
            self._denoiser.close()
        self._denoiser = make_denoiser(name, self.sample_rate)
        self._denoise_name = name

    def reset(self) -> None:
        """Start a new stream: silence in every buffer, counters at zero, the voice's caches cleared."""
        lay = self.layout
        self._ring = np.zeros(lay.window, dtype=np.float32)
        self._pending = np.zeros(0, dtype=np.float32)
        self._out = deque([np.zeros(lay.block, dtype=np.float32)])  # the block of output delay
        self._out_len = lay.block
        self._kept_tail = np.zeros(lay.crossfade, dtype=np.float32)
        self._kept_silent = True
        # the window of the first block starts at 0: the stream's first sample sits at window - block
        self._window_start = 0
        self._in_gain = self._out_gain = None
        with self._lock:
            self._samples_in = self._samples_out = 0
            self._last_offset = lay.centre
            self._input_db = -120.0
            self._speech_prob = 0.0
        self.reset_stats()
        if self._denoiser is not None:
            self._denoiser.reset()
        if self._vad is not None:
            self._vad.reset()
        self.voice.reset()

    def reset_stats(self) -> None:
        """Zero the block counters and compute times (e.g. after warm-up blocks in a benchmark)."""
        with self._lock:
            self._blocks = self._gated = self._vad_gated = self._limited = 0
            self._compute_ms: deque[float] = deque(maxlen=STATS_WINDOW)
            self._compute_total = 0.0

    # --- public streaming API ---
    def process(self, samples: np.ndarray) -> np.ndarray:
        """Feed any number of samples; get as many back, delayed by `latency_samples`."""
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        count = samples.shape[0]
        for new in self.split_blocks(samples):
            out = self._process_block(new)
            self._out.append(out)
            self._out_len += out.shape[0]
        result = self._take(count)
        with self._lock:
            self._samples_in += count
            self._samples_out += result.shape[0]
        return result

    def split_blocks(self, samples: np.ndarray) -> list[np.ndarray]:
        """The input side of `process`: the denoiser (when on), then the blocks these samples complete."""
        denoise = self.settings.snapshot().denoise
        if denoise != self._denoise_name:
            self._switch_denoiser(denoise)
        if self._denoiser is not None:
            started = time.perf_counter()
            samples = self._denoiser.process(samples)
            self._denoise_ms += (time.perf_counter() - started) * 1000.0  # counted in the next block
        self._pending = np.concatenate((self._pending, samples)) if self._pending.size else samples.copy()
        block, blocks = self.layout.block, []
        while self._pending.shape[0] >= block:
            new, self._pending = self._pending[:block], self._pending[block:]
            blocks.append(new)
        return blocks

    def flush(self) -> np.ndarray:
        """The `latency_samples` still held back (the end of the stream); then a fresh stream starts."""
        out = self.process(np.zeros(self.latency_samples, dtype=np.float32))
        self.reset()
        return out

    def stats(self) -> dict:
        with self._lock:
            times = np.array(self._compute_ms, dtype=np.float64)
            blocks = self._blocks
            mean = self._compute_total / max(blocks - self._gated, 1)
            block_ms = self.layout.block * 1000.0 / self.sample_rate
            return {
                "blocks": blocks,
                "gated_blocks": self._gated,
                "vad_gated_blocks": self._vad_gated,
                "speech_prob": self._speech_prob,
                "samples_in": self._samples_in,
                "samples_out": self._samples_out,
                "compute_ms_mean": mean,
                "compute_ms_p50": float(np.percentile(times, 50)) if times.size else 0.0,
                "compute_ms_p99": float(np.percentile(times, 99)) if times.size else 0.0,
                "compute_ms_last": float(times[-1]) if times.size else 0.0,
                "compute_ms_recent": float(times[-RECENT_BLOCKS:].mean()) if times.size else 0.0,
                "block_ms": block_ms,
                "rtf": mean / block_ms,
                "latency_ms": self.latency_ms,
                "latency_samples": self.latency_samples,
                "denoise": self._denoise_name,
                "sola_offset": self._last_offset,
                "input_db": self._input_db,
                "limited_samples": self._limited,
                "auto_pitch": getattr(self.voice, "auto_pitch", None),  # semitones chosen by --pitch auto
            }

    # --- internals ---
    def _take(self, count: int) -> np.ndarray:
        parts, need = [], count
        while need > 0:
            head = self._out[0]
            if head.shape[0] <= need:
                parts.append(self._out.popleft())
                need -= head.shape[0]
            else:
                parts.append(head[:need])
                self._out[0] = head[need:]
                need = 0
        self._out_len -= count
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)

    def _gain_ramp(self, previous: float | None, target: float, length: int) -> np.ndarray | float:
        """A gain change ramps over one block instead of stepping (a step would click)."""
        if previous is None or previous == target:
            return target
        return np.linspace(previous, target, length, endpoint=False, dtype=np.float32)

    def _is_gated(self, region: np.ndarray, gate_db: float) -> tuple[bool, float]:
        """Gate closed when every 10 ms frame of the region is below the threshold."""
        size = self._gate_frame
        frames = region[: region.shape[0] // size * size].reshape(-1, size)
        power = np.mean(np.square(frames, dtype=np.float64), axis=1)
        loudest_db = 10.0 * np.log10(max(float(power.max()) if power.size else 0.0, 1e-12))
        return loudest_db < gate_db, loudest_db

    def _voice_activity(self, new: np.ndarray, knobs: Knobs) -> tuple[float, bool]:
        """With `vad` on: the speech probability around the block's region, and whether that closes
        the gate. The detector hears every block (gated ones too), so its state stays current."""
        if knobs.vad == "off":
            self._vad_on = False
            return 0.0, False
        if self._vad is None:
            self._vad = StreamVad(self.sample_rate)
        elif not self._vad_on:
            self._vad.reset()
        self._vad_on = True
        self._vad.feed(new)
        prob = self._vad.speech_prob(self.layout.tail)
        return prob, prob < knobs.vad_threshold

    def _process_block(self, new: np.ndarray) -> np.ndarray:
        block = self.begin_block(new)
        converted = None if block.window is None else self.voice.convert(
            block.window, block.knobs, start_sample=block.start_sample, tail=self.layout.tail)
        return self.finish_block(block, converted)

    def begin_block(self, new: np.ndarray) -> "BlockStart":
        """A block's first half: input gain, the ring buffer and the gate; the window to convert (None
        when gated). `finish_block` takes the voice's output for it. `rtsvc.pipeline` runs the two
        halves (and a model voice's stages between them) on different threads; the order of the
        blocks through each half is the stream's."""
        lay = self.layout
        knobs: Knobs = self.settings.snapshot()  # one snapshot per block
        started = time.perf_counter()
        in_gain = db_to_gain(knobs.input_gain_db)
        new = new * self._gain_ramp(self._in_gain, in_gain, lay.block)
        self._in_gain = in_gain
        self._ring = np.concatenate((self._ring[lay.block:], new.astype(np.float32)))
        self._window_start += lay.block
        gated, level_db = self._is_gated(self._ring[-lay.tail:], knobs.gate_db)
        speech_prob, vad_gated = self._voice_activity(new, knobs)
        gated = gated or vad_gated
        elapsed = (time.perf_counter() - started) * 1000.0 + self._denoise_ms
        self._denoise_ms = 0.0
        return BlockStart(knobs, None if gated else self._ring.copy(), self._window_start - lay.block,
                          level_db, elapsed, speech_prob, vad_gated)

    def finish_block(self, block: "BlockStart", converted: np.ndarray | None,
                     compute_ms: float | None = None) -> np.ndarray:
        """A block's second half: SOLA against the kept tail, crossfade, output gain, counters.
        `converted`: the voice's `tail` samples (None: gated). `compute_ms`: the voice's time when
        it ran elsewhere (default: since `begin_block`)."""
        lay, knobs = self.layout, block.knobs
        started = time.perf_counter()
        gated = converted is None
        if gated:
            converted = np.zeros(lay.tail, dtype=np.float32)
        converted = np.asarray(converted, dtype=np.float32)
        if converted.shape != (lay.tail,):
            raise RuntimeError(f"voice returned {converted.shape[0]} samples, the engine asked for "
                               f"{lay.tail}")

        silent_head = gated or not np.any(converted[: lay.crossfade + lay.search])
        if self._kept_silent or silent_head or lay.crossfade == 0:
            offset = lay.centre  # nothing to align with: keep the nominal timeline
        else:
            offset = find_sola_offset(converted[: lay.crossfade + lay.search], self._kept_tail, lay.centre)
        out = converted[offset: offset + lay.block].copy()
        if lay.crossfade:
            out[: lay.crossfade] = crossfade(self._kept_tail, out[: lay.crossfade])
        self._kept_tail = converted[offset + lay.block: offset + lay.block + lay.crossfade].copy()
        self._kept_silent = gated or not np.any(self._kept_tail)

        out_gain = db_to_gain(knobs.output_gain_db)
        out *= self._gain_ramp(self._out_gain, out_gain, lay.block)
        self._out_gain = out_gain
        out, limited = soft_limit(out)
        now = time.perf_counter()
        if compute_ms is None:  # ran inline: everything since begin_block
            elapsed_ms = (now - block.started) * 1000.0 + block.begin_ms
        else:
            elapsed_ms = block.begin_ms + compute_ms + (now - started) * 1000.0
        with self._lock:
            self._blocks += 1
            self._input_db = block.level_db
            self._last_offset = offset
            self._speech_prob = block.speech_prob
            self._vad_gated += int(block.vad_gated)
            self._limited += limited
            if gated:
                self._gated += 1
            else:
                self._compute_ms.append(elapsed_ms)
                self._compute_total += elapsed_ms
        return out


@dataclass
class BlockStart:
    """What `begin_block` hands to `finish_block`: the block's knobs, the window to convert (None:
    gated) and its stream position, the gate's level and the time spent so far."""

    knobs: Knobs
    window: np.ndarray | None
    start_sample: int
    level_db: float
    begin_ms: float
    speech_prob: float = 0.0  # the voice-activity detector's, `vad` on
    vad_gated: bool = False  # the voice-activity gate closed this block
    started: float = field(default_factory=time.perf_counter)


class RateAdapter:
    """The engine at another sample rate (a device or a websocket client), with exact accounting.

    `output_rate` (default: `rate`) lets input and output run at different rates (two devices).

    Input is resampled to the engine's rate and output back, both with streaming soxr; the
    output of `process` may be a few samples shorter or longer than its input (resampler
    hold-back), but over a whole stream `sum(process) + flush` equals the samples fed in (scaled
    by output_rate / rate), and the output timeline is the input's delayed by the engine's latency.
    """

    def __init__(self, engine: StreamingConverter, rate: int, output_rate: int | None = None):
        output_rate = rate if output_rate is None else output_rate
        if rate <= 0 or output_rate <= 0:
            raise UserError(f"sample rates must be positive, got {rate} and {output_rate}")
        self.engine = engine
        self.rate, self.output_rate = int(rate), int(output_rate)
        self.reset(reset_engine=False)

    @property
    def latency_ms(self) -> float:
        return self.engine.latency_ms

    def reset(self, reset_engine: bool = True) -> None:
        if reset_engine:
            self.engine.reset()
        self._to_engine = StreamResampler(self.rate, self.engine.sample_rate)
        self._from_engine = StreamResampler(self.engine.sample_rate, self.output_rate)
        self.samples_in = self.samples_out = 0
        self._held = np.zeros(0, dtype=np.float32)

    def _owed(self) -> int:
        """Output samples that the input so far entitles (equal to samples_in at one rate)."""
        return self.samples_in * self.output_rate // self.rate - self.samples_out

    def process(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.float32).reshape(-1)
        self.samples_in += samples.shape[0]
        out = self._from_engine.process(self.engine.process(self._to_engine.process(samples)))
        if self._held.size:
            out = np.concatenate((self._held, out))
        room = max(0, self._owed())  # never run ahead of the input
        out, self._held = out[:room], out[room:]
        self.samples_out += out.shape[0]
        return out

    def flush(self) -> np.ndarray:
        """Everything still held back, so that total out == total in; then a fresh stream starts."""
        tail_in = self._to_engine.process(np.zeros(0, dtype=np.float32), last=True)
        engine_out = np.concatenate((self.engine.process(tail_in), self.engine.flush()))
        out = np.concatenate((self._held, self._from_engine.process(engine_out, last=True)))
        missing = self._owed()
        out = out[:missing] if out.shape[0] >= missing else np.pad(out, (0, missing - out.shape[0]))
        self.reset(reset_engine=False)  # the engine's flush already reset it
        return out.astype(np.float32)


def convert_stream(voice: Voice, audio: np.ndarray, knobs: Knobs | RuntimeSettings | None = None,
                   config: StreamConfig | None = None, progress=None) -> np.ndarray:
    """A whole clip through the engine block by block; returned aligned with the input (latency removed).

    `progress(done, total)` is called after each chunk when given (e.g. a rich progress bar).
    """
    settings = knobs if isinstance(knobs, RuntimeSettings) else RuntimeSettings(knobs or Knobs())
    engine = StreamingConverter(voice, settings, config)
    audio = np.asarray(audio, dtype=np.float32).reshape(-1)
    chunk = engine.layout.block
    parts = []
    for begin in range(0, audio.shape[0], chunk):
        parts.append(engine.process(audio[begin: begin + chunk]))
        if progress is not None:
            progress(min(begin + chunk, audio.shape[0]), audio.shape[0])
    parts.append(engine.flush())
    out = np.concatenate(parts)
    return out[engine.latency_samples: engine.latency_samples + audio.shape[0]]
