"""`rtsvc live` through PortAudio's JACK host API on a private PipeWire server (PipeWire's JACK, as a
desktop with PipeWire offers it): the null sinks are JACK devices, live's callback follows JACK's
period, and the converted tone comes out an octave up (benchmarks/pipewire_rig.py measures it)."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from benchmarks.pipewire_rig import MIC, SPEAKER, PipeWireServer
from rtsvc.dsp.signals import sung_tone
from tests.test_live import SR, TONE_F0, VOICED_MIN, median_f0, play_tone_into_live

ROOT = Path(__file__).resolve().parents[1]


def test_live_through_portaudio_jack_on_pipewire(tmp_path):
    tone, log, captured = tmp_path / "tone.wav", tmp_path / "live.log", tmp_path / "speaker.raw"
    sf.write(tone, sung_tone(3.0, f0=TONE_F0), SR)
    with PipeWireServer() as server:
        devices = subprocess.run([sys.executable, "-m", "rtsvc.commands.cli", "devices"], env=server.jack_env(
            "256/44100"), capture_output=True, text=True, cwd=str(ROOT), check=True).stdout
        assert f"{MIC}\n    JACK Audio Connection Kit, in 1 out 1" in devices, devices
        with open(captured, "wb") as sink:
            parec = subprocess.Popen(["parec", "-d", "speaker.monitor", "--raw", "--format=float32le",
                                      "--channels=1", f"--rate={SR}"], env=server.env, stdout=sink)
        with open(log, "w") as stream:
            live = subprocess.Popen([sys.executable, "-m", "rtsvc.commands.cli", "live", "--input", MIC,
                                     "--output", SPEAKER, "--pitch", "12", "--duration", "5", "--gate", "-60",
                                     "--block-ms", "50", "--jitter-ms", "150"],
                                    env=server.jack_env("256/44100"), stdin=subprocess.DEVNULL, stdout=stream,
                                    stderr=subprocess.STDOUT, cwd=str(ROOT))
        try:
            play_tone_into_live(live, log, server.env, tone)
        finally:
            for proc in (live, parec):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)
    text = log.read_text()
    print("\n" + "\n".join(line for line in text.splitlines() if line.startswith(("live:", "stopped"))))
    # PortAudio's JACK host API misreports the streams' latency (97391 s): live says it does not know
    assert f"live: {MIC} (44100 Hz) -> {SPEAKER}" in text and "device buffers ? ms (portaudio)" in text
    f0_out, voiced = median_f0(np.fromfile(captured, dtype=np.float32))
    print(f"speaker: F0 {f0_out:.1f} Hz, {voiced / 100:.2f} s voiced")
    assert voiced >= VOICED_MIN
    assert f0_out == pytest.approx(2 * TONE_F0, rel=0.03)
