"""The voice-activity gate measured (docs/benchmarks.md, "Voice-activity gate"; a measurement, not a test).

    python -m benchmarks.vad_cost [--block-ms 150.9] [--repeats 3]

A scene of espeak-ng sentences with breaths (band-passed noise swells) and typing (clusters of
high-passed clicks) in the pauses, all loud enough to open the level gate (-50 dBFS), over a
-65 dBFS hiss (below it), streamed
through the engine with a voice that returns its input. Per 10 ms frame of the output (latency
removed): passed (not silent) or gated, against the known speech segments (each espeak sentence,
first to last sample above -50 dB). False accepts: frames without speech that passed (over the
frames that hold a breath or a key press, and over all non-speech frames); false rejects: speech frames
gated; onset: from a sentence's start to its first passed frame. Detectors: the level gate alone,
Silero VAD (rtsvc.dsp.vad) at thresholds, and webrtcvad (webrtcvad-wheels, modes 1-3) in its place.
Cost per block: the engine with the gate on vs off, alternated, on the same blocks. The webrtcvad rows
need `pip install webrtcvad-wheels` (not a dependency: it lost; docs/benchmarks.md, "Voice-activity gate").
"""

import argparse
import time
from dataclasses import replace

import numpy as np
from scipy import signal

import rtsvc.engine as engine_module
from rtsvc.dsp.audio import StreamResampler
from rtsvc.dsp.vad import HANGOVER_MS
from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voices.defaults import MODEL_STREAM
from tests.noisy_speech import speech

SR = 44100
FRAME = SR // 100  # 10 ms
FLOOR_DB = -65.0  # the room's hiss under everything (RMS dBFS), below the level gate
SENTENCES = ("Hello everyone, welcome back to the stream.", "Today we are trying a new voice.",
             "Let me type the settings in first.", "Can you hear the difference now?",
             "Thanks for watching, see you next time.")


class IdentityVoice:
    sample_rate, speakers, stream_defaults = SR, ["x"], replace(MODEL_STREAM, block_ms=150.9)

    def convert(self, audio, knobs, start_sample=0, tail=None):
        return audio[-tail:].copy() if tail else audio.copy()

    def reset(self):
        pass


def breath(seconds: float, rng) -> np.ndarray:
    """A breath: noise band-passed to 400-2500 Hz under a slow swell, about -30 dBFS RMS."""
    n = int(seconds * SR)
    sos = signal.butter(2, (400, 2500), "band", fs=SR, output="sos")
    x = signal.sosfilt(sos, rng.standard_normal(n)) * np.hanning(n) ** 0.7
    return (x / np.sqrt(np.mean(x ** 2)) * 10 ** (-27 / 20)).astype(np.float32)


def typing(seconds: float, rng) -> np.ndarray:
    """Key presses: 6-10 per second, each an 8 ms high-passed click with a softer release 60-120 ms later."""
    n = int(seconds * SR)
    out = np.zeros(n)
    sos = signal.butter(2, 1500, "high", fs=SR, output="sos")
    click = int(0.008 * SR)
    env = np.exp(-np.arange(click) / (0.0015 * SR))
    t = 0.05
    while t < seconds - 0.2:
        press, release = (0.0, rng.uniform(0.15, 0.4)), (rng.uniform(0.06, 0.12), rng.uniform(0.05, 0.15))
        for offset, level in (press, release):
            start = int((t + offset) * SR)
            out[start:start + click] += signal.sosfilt(sos, rng.standard_normal(click)) * env * level
        t += rng.uniform(0.1, 0.17)
    return out.astype(np.float32)


def scene(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(audio, speech mask, noise mask) per sample: noise, then sentence / breath or typing / ..."""
    rng = np.random.default_rng(seed)
    parts, is_speech, is_noise = [], [], []

    def add(x, sp, nz):  # nz None: noise where x is not silent (a key press, not the pause after it)
        parts.append(x)
        is_speech.append(np.full(x.size, sp))
        is_noise.append(x != 0 if nz is None else np.full(x.size, nz))

    add(typing(2.0, rng), False, None)
    for i, text in enumerate(SENTENCES):
        utt = speech(SR, text, lead_s=0.0)
        loud = np.flatnonzero(np.abs(utt) > 10 ** (-50 / 20))
        utt = utt[loud[0]: loud[-1] + 1]
        add(np.zeros(int(0.3 * SR), np.float32), False, False)
        add(utt, True, False)
        add(np.zeros(int(0.3 * SR), np.float32), False, False)
        add(breath(0.7, rng) if i % 2 == 0 else typing(1.5, rng), False, None)
    audio = np.concatenate(parts)
    floor = rng.standard_normal(audio.size).astype(np.float32) * 10 ** (FLOOR_DB / 20)  # a quiet room
    return audio + floor, np.concatenate(is_speech), np.concatenate(is_noise)


class WebrtcStreamVad:
    """webrtcvad (30 ms frames at 16 kHz, 0/1 per frame) behind the interface of rtsvc.dsp.vad.StreamVad."""

    mode = 2

    def __init__(self, sample_rate: int, hangover_ms: float = HANGOVER_MS):
        import webrtcvad

        self.sample_rate, self.hangover = sample_rate, int(hangover_ms * sample_rate / 1000)
        self._vad = webrtcvad.Vad(self.mode)
        self.reset()

    def reset(self):
        self._resampler = StreamResampler(self.sample_rate, 16000)
        self._pending = np.zeros(0, np.float32)
        self._done, self._fed, self._probs = 0, 0, []

    def feed(self, samples):
        self._fed += samples.size
        self._pending = np.concatenate((self._pending, self._resampler.process(samples)))
        while self._pending.size >= 480:
            pcm = (np.clip(self._pending[:480], -1, 1) * 32767).astype(np.int16).tobytes()
            self._pending = self._pending[480:]
            self._done += 1
            self._probs.append((self._done * 480 * self.sample_rate // 16000,
                                float(self._vad.is_speech(pcm, 16000))))
            self._probs = self._probs[-256:]

    def speech_prob(self, last):
        start, frame = self._fed - last - self.hangover, 480 * self.sample_rate // 16000
        return max((p for end, p in self._probs if end > start and end - frame < self._fed), default=0.0)


def run(audio: np.ndarray, knobs: Knobs, block_ms: float) -> tuple[np.ndarray, dict, float]:
    """The scene through the engine; (output aligned with the input, stats, seconds)."""
    eng = StreamingConverter(IdentityVoice(), RuntimeSettings(knobs), StreamConfig(block_ms=block_ms))
    block = eng.layout.block
    eng.process(np.zeros(block, np.float32))  # the detector loaded and warm: not timed
    eng.reset()
    started = time.perf_counter()
    out = np.concatenate([eng.process(audio[i:i + block]) for i in range(0, audio.size, block)]
                         + [eng.process(np.zeros(eng.latency_samples, np.float32))])
    seconds = time.perf_counter() - started
    return out[eng.latency_samples: eng.latency_samples + audio.size], eng.stats(), seconds


def frame_table(audio, sp, nz, out):
    """Per 10 ms frame: (truth speech, noise present, passed)."""
    n = audio.size // FRAME
    frames = lambda x: x[: n * FRAME].reshape(n, FRAME)  # noqa: E731
    return frames(sp).any(1), frames(nz).any(1) & ~frames(sp).any(1), np.abs(frames(out)).max(1) > 0


def onsets_ms(sp: np.ndarray, passed: np.ndarray) -> list[float]:
    """Per sentence: ms from its first frame to its first passed frame."""
    n = passed.size
    truth = sp[: n * FRAME].reshape(n, FRAME).any(1)
    starts = np.flatnonzero(truth & ~np.concatenate(([False], truth[:-1])))
    result = []
    for s in starts:
        first = s
        while first < n and truth[first] and not passed[first]:
            first += 1
        result.append(10.0 * (first - s))
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--block-ms", type=float, default=150.9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    audio, sp, nz = scene()
    print(f"scene: {audio.size / SR:.1f} s, speech {sp.mean() * 100:.0f} %, breath/typing "
          f"{nz.mean() * 100:.0f} %; block {args.block_ms:g} ms, hangover {HANGOVER_MS:g} ms")
    print("| detector | false accepts, breath/typing frames | false accepts, all non-speech | false rejects, "
          "speech frames | onset (ms, mean / max) | gated blocks |\n|---|---|---|---|---|---|")
    silero = engine_module.StreamVad
    configs = [("level gate only (-50 dBFS)", Knobs(), silero, None)]
    configs += [(f"Silero VAD, threshold {t:g}", Knobs(vad="on", vad_threshold=t), silero, None)
                for t in (0.3, 0.5, 0.7)]
    configs += [(f"webrtcvad mode {m}", Knobs(vad="on", vad_threshold=0.5), WebrtcStreamVad, m)
                for m in (1, 2, 3)]
    for label, knobs, vad_class, mode in configs:
        engine_module.StreamVad = vad_class
        WebrtcStreamVad.mode = mode if mode is not None else 2
        out, stats, _ = run(audio, knobs, args.block_ms)
        truth, noise, passed = frame_table(audio, sp, nz, out)
        fa_noise = passed[noise].mean() * 100
        fa_all = passed[~truth].mean() * 100
        fr = (~passed[truth]).mean() * 100
        on = onsets_ms(sp, passed)
        print(f"| {label} | {fa_noise:.1f} % | {fa_all:.1f} % | {fr:.1f} % | {np.mean(on):.0f} / "
              f"{np.max(on):.0f} | {stats['gated_blocks']}/{stats['blocks']} |")
    engine_module.StreamVad = silero

    # cost: the same scene with the gate off and on (Silero, webrtcvad), alternated `repeats` times;
    # the level gate off (-120 dBFS) so every block reaches the detector and the (identity) voice
    times = {"off": [], "silero": [], "webrtcvad": []}
    blocks = 0
    for _ in range(args.repeats):
        for name, knobs, cls in (("off", Knobs(gate_db=-120.0), silero),
                                 ("silero", Knobs(gate_db=-120.0, vad="on", vad_threshold=0.0), silero),
                                 ("webrtcvad", Knobs(gate_db=-120.0, vad="on", vad_threshold=0.0),
                                  WebrtcStreamVad)):
            engine_module.StreamVad = cls
            _, stats, seconds = run(audio, knobs, args.block_ms)
            times[name].append(seconds)
            blocks = stats["blocks"]
    engine_module.StreamVad = silero
    base = np.median(times["off"]) * 1000 / blocks
    print(f"\ncost per {args.block_ms:g} ms block ({blocks} blocks, median of {args.repeats} alternated "
          f"runs): engine without a detector {base:.2f} ms")
    block = int(round(args.block_ms * SR / 1000))
    for name, cls in (("silero", silero), ("webrtcvad", WebrtcStreamVad)):
        per = np.median(times[name]) * 1000 / blocks
        detector, each = cls(SR), []
        for _ in range(args.repeats):
            detector.reset()
            for i in range(0, audio.size - block, block):  # the detector alone, block by block
                started = time.perf_counter()
                detector.feed(audio[i:i + block])
                detector.speech_prob(block)
                each.append((time.perf_counter() - started) * 1000)
        print(f"  {name}: {per:.2f} ms (+{per - base:.2f} ms, {(per - base) / args.block_ms * 100:.2f} % of "
              f"the block); the detector alone per block: median {np.median(each):.2f} ms, p90 "
              f"{np.percentile(each, 90):.2f} ms, p99 {np.percentile(each, 99):.2f} ms")


if __name__ == "__main__":
    main()
