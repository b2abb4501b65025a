"""`rtsvc live` for real through PulseAudio null sinks: the block it picks and its underruns.

    python -m benchmarks.live_pulse --seconds 60 -- --model student.rtsvc --pretrained-dir P --f0 fcpe

starts a private PulseAudio daemon (null sinks "mic" and "speaker"), runs `rtsvc live --input pulse
--output pulse --duration SECONDS` with the given live options (default `--block-ms auto`), plays
espeak-ng speech and a sung tone into "mic" in a loop while it runs, and prints live's own lines:
the auto block it picked (and what it measured), the auto jitter buffer and its summary (blocks,
compute p99, underruns, overruns). Needs pulseaudio, paplay and espeak-ng (docs/benchmarks.md).
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import soundfile as sf

from rtsvc.bench.loopback import PulseServer, start_live, wait_for_start
from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.dsp.signals import sung_tone

SPEECH = "The quick brown fox jumps over the lazy dog. She sells sea shells by the sea shore."
START_TIMEOUT_S = 600.0  # a real-size model loads and measures its auto block before "live:" appears


def input_clip(folder: Path) -> Path:
    """Speech then a sung tone, 44.1 kHz mono: what is played into the mic, over and over."""
    import numpy as np

    from rtsvc.dsp.audio import load_audio

    speech = folder / "speech.wav"
    subprocess.run(["espeak-ng", "-w", str(speech), SPEECH], check=True)
    voice = load_audio(speech)[0]
    voice = 0.5 * voice / max(float(np.abs(voice).max()), 1e-6)
    clip = folder / "input.wav"
    sf.write(clip, np.concatenate((voice, sung_tone(4.0))).astype("float32"), SAMPLE_RATE)
    return clip


def run(seconds: float, live_args: list[str]) -> str:
    with tempfile.TemporaryDirectory(prefix="rtsvc-live-") as tmp, PulseServer(("mic", "speaker")) as pulse:
        folder = Path(tmp)
        clip, log = input_clip(folder), folder / "live.log"
        if "--block-ms" not in live_args:
            live_args = [*live_args, "--block-ms", "auto"]
        live = start_live(pulse, [*live_args, "--duration", f"{seconds:g}", "--gate", "-60"], log)
        try:
            wait_for_start(live, log, timeout=START_TIMEOUT_S)
            deadline = time.monotonic() + seconds + 5.0
            while live.poll() is None and time.monotonic() < deadline:
                subprocess.run(["paplay", "-d", "mic", str(clip)], env=pulse.env, timeout=60)
            live.wait(timeout=120)
        finally:
            if live.poll() is None:
                live.terminate()
                live.wait(timeout=10)
        return log.read_text(errors="replace")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="how long live runs (default 60)")
    ap.add_argument("live_args", nargs="*", help="options for `rtsvc live` (after --)")
    args = ap.parse_args()
    text = run(args.seconds, args.live_args)
    heads = ("auto block", "auto jitter", "voice:", "live:", "stopped")
    lines = [line for line in text.splitlines() if line.startswith(heads) or "error" in line]
    print("\n".join(lines) if lines else text[-3000:])
    sys.exit(0 if any(line.startswith("stopped") for line in lines) else 1)


if __name__ == "__main__":
    main()
