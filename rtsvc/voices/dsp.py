"""The built-in DSP voice: WORLD analysis/resynthesis with pitch and formant shift, no weights.

WORLD splits speech into F0 (dio + stonemask, or harvest), a smooth spectral envelope
(cheaptrick) and a band aperiodicity (d4c), and resynthesises from them. Pitch shift scales F0;
formant shift stretches the envelope along frequency. The aperiodicity is kept as analysed, so
breathy and unvoiced sounds stay noise instead of turning into a metallic buzz.

Streaming: the engine passes a window [left context | tail]; F0 is tracked over the whole window
(cheap, and it needs the context), the expensive envelope/aperiodicity analysis and the synthesis
run only on the frames that cover the requested tail.

Phase: WORLD starts each synthesis with its pulse clock at phase 0, so two windows would place their
glottal pulses anywhere relative to each other and the engine's SOLA would need a whole output period
of search (20 ms at 50 Hz) to line them up: 10 ms of latency. Instead each window after the first is
synthesised with PHASE_LEAD_FRAMES frames before it whose F0 is chosen so that the clock reaches the
phase the previous window's clock had at that sample (`world_phase_steps` follows synthesis.cpp's
time base); the pulses then continue where the last window put them and a short crossfade joins them.
"""

import warnings

import numpy as np

with warnings.catch_warnings():  # pyworld 0.3.5 imports the deprecated pkg_resources
    warnings.simplefilter("ignore")
    import pyworld

from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.errors import UserError
from rtsvc.features.f0_methods import DSP_F0
from rtsvc.features.f0_methods import f0_method as f0_row
from rtsvc.settings import Knobs
from rtsvc.voices.defaults import DSP_STREAM

FRAME_HOP = 256  # analysis hop in samples (5.8 ms); 512-aligned windows land on the same frame grid
F0_FLOOR = 50.0
F0_CEIL = 1100.0
SILENCE_PEAK = 1e-5  # a window quieter than this everywhere is returned as digital silence
MARGIN_FRAMES = 2  # extra frames synthesised before the tail so the first tail samples are settled
F0_CONTEXT = 16 * FRAME_HOP  # left context (93 ms) F0 tracking uses before the tail; more changed nothing
# dio analyses at fs / DIO_SPEED: 3 is 1.8-3.7x faster than 1 and, after stonemask, agrees on 99.6-100%
# of voicing decisions with a median 0 cents (espeak speech, docs/benchmarks.md "DSP voice")
DIO_SPEED = 3
# d4c costs ~1 ms a frame (58% of a 23.2 ms block, 12 frames); aperiodicity moves slowly, so it is
# analysed every APERIODICITY_EVERY frames (and the last) and interpolated between: 0.05-0.38 dB LSD
# from every frame offline, no change in the streaming-vs-offline distance (docs/benchmarks.md)
APERIODICITY_EVERY = 4
# frames synthesised (and dropped) before a streaming window, their F0 chosen to continue the pulse
# clock: 2 frames (11.6 ms) reach any phase with the F0 at most 58 Hz from the first real frame's;
# 4 cost 1.5 ms more a block (+15%) for 0.04 dB closer to offline
PHASE_LEAD_FRAMES = 2
WORLD_DEFAULT_F0 = 500.0  # synthesis.cpp: unvoiced samples' pulse clock (kDefaultF0)
LEAD_F0_FLOOR = 40.0  # a lead F0 below this is raised a cycle (WORLD treats < fs/fft_size + 1 as unvoiced)


def shift_envelope(envelope: np.ndarray, factor: float) -> np.ndarray:
    """Stretch a [frames, bins] spectral envelope along frequency: factor > 1 moves formants up.

    New bin b takes the old envelope at b / factor (log-domain linear interpolation); bins past
    the top of the old envelope reuse its last value.
    """
    if abs(factor - 1.0) < 1e-6:
        return envelope
    bins = envelope.shape[1]
    source = np.minimum(np.arange(bins) / factor, bins - 1)
    lo = np.floor(source).astype(np.int64)
    hi = np.minimum(lo + 1, bins - 1)
    frac = source - lo
    log_env = np.log(np.maximum(envelope, 1e-16))
    shifted = log_env[:, lo] * (1.0 - frac) + log_env[:, hi] * frac
    return np.ascontiguousarray(np.exp(shifted))


def sparse_aperiodicity(x: np.ndarray, f0: np.ndarray, times: np.ndarray, fs: int,
                        every: int = APERIODICITY_EVERY) -> np.ndarray:
    """WORLD's d4c at every `every`-th frame (and the last), linearly interpolated between them."""
    n = f0.shape[0]
    if every <= 1 or n < 3:
        return pyworld.d4c(x, f0, times, fs)
    analysed = np.unique(np.r_[np.arange(0, n, every), n - 1])
    sparse = pyworld.d4c(x, np.ascontiguousarray(f0[analysed]), np.ascontiguousarray(times[analysed]), fs)
    right = np.searchsorted(analysed, np.arange(n)).clip(1, len(analysed) - 1)  # first analysed >= frame
    left = right - 1
    weight = ((np.arange(n) - analysed[left]) / (analysed[right] - analysed[left]))[:, None]
    return sparse[left] * (1.0 - weight) + sparse[right] * weight


def world_phase_steps(f0: np.ndarray, fs: int, hop: int, fft_size: int) -> np.ndarray:
    """Per-sample steps (radians) of WORLD's pulse clock for a synthesis of `f0` (frames `hop`
    samples apart), as synthesis.cpp's time base: F0 under fs / fft_size + 1 is unvoiced; F0 and
    voicing are linear between frames (one more extrapolated past the last); voicing is a 0.5
    threshold, and unvoiced samples tick at kDefaultF0. Pulses fall where the sum crosses 2 pi."""
    f0 = np.where(f0 < fs / fft_size + 1.0, 0.0, f0)
    voiced = (f0 != 0.0).astype(np.float64)
    if f0.shape[0] > 1:
        f0, voiced = np.r_[f0, 2 * f0[-1] - f0[-2]], np.r_[voiced, 2 * voiced[-1] - voiced[-2]]
    frames = np.arange(f0.shape[0]) * hop
    samples = np.arange((f0.shape[0] - (f0.shape[0] > 1)) * hop)
    step = np.interp(samples, frames, f0)
    step[np.interp(samples, frames, voiced) <= 0.5] = WORLD_DEFAULT_F0
    return 2.0 * np.pi * step / fs


def lead_f0(f0: np.ndarray, target: float, fs: int, hop: int, fft_size: int,
            lead: int = PHASE_LEAD_FRAMES) -> float:
    """The F0 of `lead` frames put before `f0` so that WORLD's pulse clock stands at `target`
    (radians, mod 2 pi) where `f0` begins: the nearest to its first F0 (200 Hz if unvoiced)."""
    start = float(f0[0]) if f0[0] >= LEAD_F0_FLOOR else 200.0

    def clock(g: float) -> float:  # the clock's phase where the real frames start
        steps = world_phase_steps(np.r_[np.full(lead, g), f0[:2]], fs, hop, fft_size)
        return float(np.sum(steps[:lead * hop]))

    at_start = clock(start)
    per_hz = clock(start + 1.0) - at_start  # the clock is affine in the lead F0
    delta = (target - at_start + np.pi) % (2.0 * np.pi) - np.pi
    g = start + delta / per_hz
    return g + 2.0 * np.pi / per_hz if g < LEAD_F0_FLOOR else g


class DspVoice:
    """A `Voice` that needs no model: WORLD pitch shift (semitones) and formant shift (factor)."""

    speakers = ["dsp"]
    stream_defaults = DSP_STREAM
    uses_formant = True  # the formant knob applies (model voices too: rtsvc.dsp.formant_warp)

    def __init__(self, f0_method: str = "dio", sample_rate: int = SAMPLE_RATE,
                 aperiodicity_every: int = APERIODICITY_EVERY, continue_phase: bool = True):
        self.f0_method = f0_row(f0_method, DSP_F0, option="DSP F0 method").name
        self.aperiodicity_every = aperiodicity_every
        self.continue_phase = continue_phase  # False: each window's pulses start afresh (SOLA aligns them)
        self.sample_rate = sample_rate
        self.frame_period_ms = FRAME_HOP / sample_rate * 1000.0
        self.reset()

    def reset(self) -> None:
        """A new stream: no pulse clock to continue."""
        self._clock: tuple[int, np.ndarray] | None = None  # (stream sample, clock from there on)

    def _f0(self, x: np.ndarray, first: int) -> tuple[np.ndarray, np.ndarray]:
        """F0 and frame times of `x` from frame `first` on (tracked over all of `x`)."""
        fs, fp = self.sample_rate, self.frame_period_ms
        if self.f0_method == "harvest":
            f0, times = pyworld.harvest(x, fs, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL, frame_period=fp)
            return np.ascontiguousarray(f0[first:]), np.ascontiguousarray(times[first:])
        f0, times = pyworld.dio(x, fs, f0_floor=F0_FLOOR, f0_ceil=F0_CEIL, frame_period=fp, speed=DIO_SPEED)
        f0, times = np.ascontiguousarray(f0[first:]), np.ascontiguousarray(times[first:])
        return pyworld.stonemask(x, f0, times, fs), times  # per frame: refining only these is exact

    def convert(self, audio: np.ndarray, knobs: Knobs, start_sample: int = 0,
                tail: int | None = None) -> np.ndarray:
        """Convert `audio`; with `tail`, return only its last `tail` samples (analysed with context)."""
        if knobs.pitch_mode != "fixed":  # auto pitch needs a target speaker's statistics
            raise UserError("--pitch auto needs a model voice (--model); the DSP voice takes --pitch in "
                            "semitones")
        audio = np.asarray(audio, dtype=np.float32)
        n = audio.shape[0]
        need = n if tail is None else int(tail)
        if not 0 <= need <= n:
            raise ValueError(f"tail {tail} must be between 0 and the window length {n}")
        if need == 0:
            return np.zeros(0, dtype=np.float32)
        if n < 2 * FRAME_HOP or float(np.max(np.abs(audio))) < SILENCE_PEAK:
            return np.zeros(need, dtype=np.float32)
        # analyse from a frame-grid point F0_CONTEXT before the tail (the rest of the window is
        # context that a model needs but WORLD does not), so frame k of `x` is frame skip + k of `audio`
        skip = max(0, (n - need - F0_CONTEXT) // FRAME_HOP) * FRAME_HOP
        x = audio[skip:].astype(np.float64)
        n -= skip
        first = max(0, (n - need) // FRAME_HOP - MARGIN_FRAMES)
        f0, times = self._f0(x, first)
        envelope = pyworld.cheaptrick(x, f0, times, self.sample_rate)
        aperiodicity = sparse_aperiodicity(x, f0, times, self.sample_rate, self.aperiodicity_every)
        f0 = f0 * 2.0 ** (knobs.pitch_shift / 12.0)  # unvoiced frames stay 0
        envelope = shift_envelope(envelope, knobs.formant_shift)
        at = None if tail is None else start_sample + skip + first * FRAME_HOP  # offline: nothing to continue
        y = self._synthesize(f0, envelope, aperiodicity, at)
        # y[0] sits at window sample first * FRAME_HOP; pyworld returns len(f0) * hop samples
        begin = n - need - first * FRAME_HOP
        out = y[begin:begin + need]
        if out.shape[0] < need:  # never expected (synthesis covers past the window end); be safe
            out = np.pad(out, (0, need - out.shape[0]))
        return np.nan_to_num(out).astype(np.float32)

    def _synthesize(self, f0: np.ndarray, envelope: np.ndarray, aperiodicity: np.ndarray,
                    at: int | None) -> np.ndarray:
        """WORLD synthesis of frames starting at stream sample `at`, its pulse clock continuing the
        previous window's when that one covered `at` (see the module docstring); `at` None: a whole
        clip, synthesised as WORLD does."""
        fs, fft_size = self.sample_rate, (envelope.shape[1] - 1) * 2
        lead = 0
        streaming = self.continue_phase and at is not None
        previous = self._clock if streaming else None
        if previous is not None and 0 <= at - previous[0] < previous[1].shape[0]:
            lead = PHASE_LEAD_FRAMES
            g = lead_f0(f0, float(previous[1][at - previous[0]]), fs, FRAME_HOP, fft_size)
            f0 = np.r_[np.full(lead, g), f0]
            envelope = np.concatenate((np.repeat(envelope[:1], lead, axis=0), envelope))
            aperiodicity = np.concatenate((np.repeat(aperiodicity[:1], lead, axis=0), aperiodicity))
        y = pyworld.synthesize(f0, envelope, aperiodicity, fs, self.frame_period_ms)
        if streaming:  # the clock the next window continues
            clock = np.cumsum(np.r_[0.0, world_phase_steps(f0, fs, FRAME_HOP, fft_size)])  # phase before each
            self._clock = (at, clock[lead * FRAME_HOP:])
        return y[lead * FRAME_HOP:]
