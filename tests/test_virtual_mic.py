"""`rtsvc live --virtual-mic NAME` through a private PulseAudio: a recording client opens NAME as its
microphone and hears the converted tone; nothing is left after Ctrl-C-like ends, SIGTERM, a failing
voice, and a SIGKILLed run's leftovers are cleaned at the next start."""

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtsvc.bench.loopback import wait_for_start
from rtsvc.dsp.signals import sung_tone
from rtsvc.errors import UserError
from rtsvc.live.virtual_mic import VirtualMic, check_virtual_mic, owned_modules
from tests.test_live import SR, TONE_F0, VOICED_MIN, median_f0

ROOT = Path(__file__).resolve().parents[1]
NAME = "rtsvc_test_mic"




def pactl(pulse, *args: str) -> str:
    return subprocess.run(["pactl", *args], env=pulse.env, capture_output=True, text=True, check=True).stdout


def traces(pulse) -> list[str]:
    """Lines of `pactl list` (modules, sinks, sources and their properties) that mention the mic."""
    return [line for line in pactl(pulse, "list").splitlines() if NAME in line or "rtsvc" in line]


def sources(pulse) -> list[str]:
    return [line.split("\t")[1] for line in pactl(pulse, "list", "short", "sources").splitlines()]


def start(pulse, args: list[str], log: Path) -> subprocess.Popen:
    """`rtsvc live --input pulse --virtual-mic NAME ARGS` reading "mic.monitor"."""
    with open(log, "w") as stream:
        return subprocess.Popen([sys.executable, "-m", "rtsvc.commands.cli",
                                 "live", "--input", "pulse", "--virtual-mic",
                                 NAME, "--block-ms", "50", "--gate", "-60",
                                 "--jitter-ms", "150",  # slack for a busy machine, as in test_live.py
                                 *args],
                                env=pulse.client_env(source="mic.monitor"), stdin=subprocess.DEVNULL,
                                stdout=stream, stderr=subprocess.STDOUT, cwd=str(ROOT))


def record(pulse, source: str, path: Path) -> subprocess.Popen:
    with open(path, "wb") as sink:
        return subprocess.Popen(["parec", "-d", source, "--raw", "--format=float32le", "--channels=1",
                                 f"--rate={SR}"], env=pulse.env, stdout=sink)


def stop(*procs: subprocess.Popen) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_a_client_hears_the_converted_voice_on_the_virtual_mic_and_nothing_is_left(pulse, tmp_path):
    tone, log = tmp_path / "tone.wav", tmp_path / "live.log"
    sf.write(tone, sung_tone(3.0, f0=TONE_F0), SR)
    live = start(pulse, ["--pitch", "12", "--duration", "6", "--monitor", "speaker"], log)
    try:
        wait_for_start(live, log, timeout=60)
        assert NAME in sources(pulse)  # listed as a source: what Discord/OBS offer as a microphone
        mic_rec = record(pulse, NAME, tmp_path / "mic.raw")  # a client opens NAME as its input
        mon_rec = record(pulse, "speaker.monitor", tmp_path / "monitor.raw")
        time.sleep(0.5)
        subprocess.run(["paplay", "-d", "mic", str(tone)], env=pulse.env, check=True, timeout=30)
        assert live.wait(timeout=60) == 0, log.read_text()
    finally:
        stop(live, *(p for p in (locals().get("mic_rec"), locals().get("mon_rec")) if p is not None))
    text = log.read_text()
    assert f"virtual microphone {NAME}" in text and "monitor speaker" in text
    f0_in = median_f0(sung_tone(3.0, f0=TONE_F0))[0]
    for captured in (tmp_path / "mic.raw", tmp_path / "monitor.raw"):
        out = np.fromfile(captured, dtype=np.float32)
        f0_out, voiced = median_f0(out)
        print(f"\n{captured.name}: F0 {f0_out:.1f} Hz (input {f0_in:.1f}), {voiced / 100:.2f} s voiced")
        assert voiced >= VOICED_MIN
        assert f0_out == pytest.approx(2 * f0_in, rel=0.03)  # the converted voice, an octave up
    assert traces(pulse) == [] and NAME not in sources(pulse)


def test_a_name_in_use_is_refused_and_sigterm_removes_the_virtual_mic(pulse, tmp_path):
    log = tmp_path / "live.log"
    live = start(pulse, [], log)
    try:
        wait_for_start(live, log, timeout=60)
        assert NAME in sources(pulse)
        second = start(pulse, ["--duration", "1"], tmp_path / "second.log")
        assert second.wait(timeout=60) == 2  # a UserError: the running one keeps its microphone
        assert f"virtual microphone {NAME} is in use by rtsvc (pid {live.pid})" in \
            (tmp_path / "second.log").read_text()
        assert len(owned_modules(NAME, pactl(pulse, "list", "short", "modules"))) == 2
        live.send_signal(signal.SIGTERM)
        assert live.wait(timeout=20) == 0, log.read_text()
    finally:
        stop(live)
    assert traces(pulse) == [], log.read_text()


def test_a_killed_runs_virtual_mic_is_cleaned_at_the_next_start(pulse, tmp_path):
    log = tmp_path / "live.log"
    live = start(pulse, [], log)
    try:
        wait_for_start(live, log, timeout=60)
        live.kill()  # SIGKILL: no chance to clean
        live.wait(timeout=10)
    finally:
        stop(live)
    stale = owned_modules(NAME, pactl(pulse, "list", "short", "modules"))
    assert len(stale) == 2 and {pid for _, pid in stale} == {live.pid}  # left behind, marked
    again = start(pulse, ["--duration", "3"], log)
    try:
        wait_for_start(again, log, timeout=60)
        now = owned_modules(NAME, pactl(pulse, "list", "short", "modules"))
        assert len(now) == 2 and {pid for _, pid in now} == {again.pid}  # the stale pair is gone
        assert sources(pulse).count(NAME) == 1
        assert again.wait(timeout=30) == 0, log.read_text()
    finally:
        stop(again)
    assert traces(pulse) == []


CRASHING_LIVE = """
import sys
from rtsvc.engine import StreamConfig
from rtsvc.live import run_live
from rtsvc.settings import Knobs, RuntimeSettings
from dataclasses import replace
from rtsvc.voices.defaults import MODEL_STREAM

class CrashingVoice:
    sample_rate, speakers, stream_defaults = 44100, ["x"], replace(MODEL_STREAM, block_ms=50.0)
    calls = 0
    def convert(self, audio, knobs, start_sample=0, tail=None):
        self.calls += 1
        if self.calls == 20:
            print("live: crashing now", flush=True)
            raise ValueError("the voice broke")
        return audio[-tail:].copy()
    def reset(self):
        pass

run_live(CrashingVoice(), RuntimeSettings(Knobs(gate_db=-120.0)), StreamConfig(block_ms=50),
         input_device="pulse", output_device="pulse", keys=False, duration=30, virtual_mic=sys.argv[1])
"""


def test_a_crash_of_the_voice_removes_the_virtual_mic(pulse, tmp_path):
    log = tmp_path / "live.log"
    with open(log, "w") as stream:
        crash = subprocess.run([sys.executable, "-c", CRASHING_LIVE, NAME],
                               env=pulse.client_env(source="mic.monitor"), stdout=stream,
                               stderr=subprocess.STDOUT, cwd=str(ROOT), timeout=60)
    text = log.read_text()
    assert crash.returncode != 0 and "the voice broke" in text and "crashing now" in text, text
    assert traces(pulse) == [], text


def test_virtual_mic_options_are_checked_before_anything_loads():
    with pytest.raises(UserError, match="leave out --output"):
        check_virtual_mic("discord_mic", "speaker")
    with pytest.raises(UserError, match="--virtual-mic must be a name"):
        check_virtual_mic("my mic")
    check_virtual_mic(None, "speaker")
    assert VirtualMic("OBS-mic.1").sink == "rtsvc-OBS-mic.1-sink"


def test_owned_modules_reads_the_marks_of_one_name_only():
    listing = ("0\tmodule-native-protocol-unix\t\t\n"
               "7\tmodule-null-sink\tsink_name=rtsvc-a-sink "
               "sink_properties='device.description=\"rtsvc a feed\" rtsvc.virtual_mic=a rtsvc.pid=41'\t\n"
               "8\tmodule-remap-source\tmaster=rtsvc-a-sink.monitor source_name=a "
               "source_properties='device.description=\"a\" rtsvc.virtual_mic=a rtsvc.pid=41'\t\n"
               "9\tmodule-remap-source\tsource_name=ab "
               "source_properties='rtsvc.virtual_mic=ab rtsvc.pid=5'\t\n")
    assert owned_modules("a", listing) == [(7, 41), (8, 41)]
    assert owned_modules("ab", listing) == [(9, 5)]
    assert owned_modules("b", listing) == []
