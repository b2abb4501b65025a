"""Live audio for real: `rtsvc live` between two PulseAudio null sinks, plus device lookup units."""

import importlib.util
import os
import pty
import shutil
import subprocess
import sys
import termios
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from rtsvc.bench.loopback import PulseServer, start_live, wait_for_start
from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig
from rtsvc.errors import UserError
from rtsvc.live import KeyReader, LiveState, OutputFifo, find_device
from rtsvc.live.devices import parse_pactl_short, pulse_devices, pulse_routing
from rtsvc.live.keys import split_keys
from rtsvc.settings import RuntimeSettings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pyworld

SR = 44100
TONE_F0 = 180.0
# voiced 10 ms frames the 3 s tone must keep: dio finds 252 in the tone and 250 in its offline
# conversion; a live run that cut its first second (an output stalled at start) kept 127-178
VOICED_MIN = 200


def median_f0(x: np.ndarray, rate: int = SR) -> tuple[float, int]:
    """Median F0 (dio + stonemask: robust on steady synthetic tones) and the number of voiced frames."""
    x = x.astype(np.float64)
    f0, t = pyworld.dio(x, rate, f0_floor=80, f0_ceil=800, frame_period=10)
    f0 = pyworld.stonemask(x, f0, t, rate)
    voiced = f0[f0 > 0]
    return (float(np.median(voiced)) if voiced.size else 0.0), int(voiced.size)




def play_tone_into_live(live: subprocess.Popen, log: Path, env: dict, tone: Path,
                        start_timeout: float = 60, end_timeout: float = 60) -> None:
    """Once live has started, play TONE into "mic" and wait for live to end (by --duration) cleanly."""
    wait_for_start(live, log, timeout=start_timeout)
    time.sleep(0.5)
    subprocess.run(["paplay", "-d", "mic", str(tone)], env=env, check=True, timeout=30)
    assert live.wait(timeout=end_timeout) == 0, log.read_text()


def live_with_tone(pulse, args: list[str], tmp_path: Path, start_timeout: float = 60,
                   end_timeout: float = 60) -> tuple[np.ndarray, str]:
    """`rtsvc live ARGS` through the null sinks while a 3 s sung tone plays into "mic": what came
    out of "speaker" (float32 at 44.1 kHz) and live's log."""
    tone = tmp_path / "tone.wav"
    sf.write(tone, sung_tone(3.0, f0=TONE_F0), SR)
    captured, log = tmp_path / "speaker.raw", tmp_path / "live.log"
    with open(captured, "wb") as sink:
        parec = subprocess.Popen(["parec", "-d", "speaker.monitor", "--raw", "--format=float32le",
                                  "--channels=1", f"--rate={SR}"], env=pulse.env, stdout=sink)
    live = start_live(pulse, args, log)
    try:
        play_tone_into_live(live, log, pulse.env, tone, start_timeout, end_timeout)
    finally:
        for proc in (live, parec):
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    return np.fromfile(captured, dtype=np.float32), log.read_text()


def test_live_pitch_up_an_octave_through_pulseaudio(pulse, tmp_path):
    record = tmp_path / "record.wav"
    # a fixed block: auto measures this machine, and on a busy one picks up to 1 s blocks, whose
    # latency would push the tone's end past --duration (auto itself: tests/test_cpu_cost.py)
    args = ["--pitch", "12", "--duration", "5", "--gate", "-60", "--record", str(record), "--block-ms", "50",
            "--jitter-ms", "150"]  # slack for a busy machine: late blocks wait instead of being cut
    out, text = live_with_tone(pulse, args, tmp_path)
    f0_in, _ = median_f0(sung_tone(3.0, f0=TONE_F0))
    f0_out, voiced = median_f0(out)
    print(f"\nlive via PulseAudio: input F0 {f0_in:.1f} Hz, output F0 {f0_out:.1f} Hz, "
          f"{voiced / 100:.2f} s voiced of {out.size / SR:.2f} s captured\n{text.strip().splitlines()[-1]}")
    assert voiced >= VOICED_MIN
    assert f0_out == pytest.approx(2 * f0_in, rel=0.03)
    assert "stopped after" in text and "underruns" in text
    if importlib.util.find_spec("pasimple") is not None:  # --audio-api auto on a PulseAudio server
        assert "(pulse)" in text, text
    rec, rate = sf.read(record, dtype="float32")
    assert rate == SR and 2.0 * SR < rec.size <= 5.5 * SR  # input-driven: PulseAudio starts late
    assert median_f0(rec)[0] == pytest.approx(2 * f0_in, rel=0.03)


@pytest.mark.slow
def test_live_runs_a_v3_student_bundle_at_its_auto_block(pulse, tmp_path, tiny_pretrained):
    """Issue 14's CPU voice, tiny: a V3 one-evaluation student exported with its encoders. `rtsvc
    live --model` measures and names its block, extracts F0 beside ContentVec (the default), plays
    audio out and reports its underruns (counted, not asserted: CI shares its cores)."""
    from rtsvc.export.onnx_export import export_bundle

    from benchmarks.real_size_student import write_student

    pretrained = tiny_pretrained
    ckpt = write_student(tmp_path / "student.ckpt", dim=64, depth=2)
    result = export_bundle(ckpt, tmp_path / "student.rtsvc", pretrained, with_encoders=True)
    assert result.ok
    args = ["--model", str(result.path), "--pretrained-dir", str(pretrained), "--f0", "fcpe",
            "--duration", "8", "--gate", "-60"]
    out, text = live_with_tone(pulse, args, tmp_path, start_timeout=180, end_timeout=120)
    picked = [line for line in text.splitlines() if line.startswith("auto block:")]
    summary = [line for line in text.splitlines() if line.startswith("stopped after")]
    print(f"\n{picked[0] if picked else text[-800:]}\n{summary[0] if summary else ''}")
    assert picked and "measured here: p99 compute" in picked[0]
    assert summary and "underruns" in summary[0]
    assert out.size > SR and np.sqrt(np.mean(out ** 2)) > 1e-3  # the converted tone came out


def test_live_unknown_device_is_a_clear_error(pulse):
    env = pulse.client_env()
    cmd = [sys.executable, "-m", "rtsvc.commands.cli", "live", "--input", "no-such-mic", "--duration", "1"]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert "no input device matches 'no-such-mic'" in result.stderr


def _device(index, name, inputs, outputs, default_in=False, default_out=False):
    return {"index": index, "name": name, "inputs": inputs, "outputs": outputs,
            "default_input": default_in, "default_output": default_out}


DEVICES = [_device(0, "pulse", 32, 32), _device(1, "USB Mic pulse-ish", 1, 0, default_in=True),
           _device(2, "HDMI out 1", 0, 2, default_out=True), _device(3, "HDMI out 2", 0, 2)]


def test_find_device_by_index_name_and_default():
    assert find_device(None, "input", DEVICES)["index"] == 1
    assert find_device(None, "output", DEVICES)["index"] == 2
    assert find_device("3", "output", DEVICES)["name"] == "HDMI out 2"
    assert find_device("PULSE", "input", DEVICES)["index"] == 0  # an exact name wins over substrings
    assert find_device("usb", "input", DEVICES)["index"] == 1
    with pytest.raises(UserError, match="matches several output devices"):
        find_device("hdmi", "output", DEVICES)
    with pytest.raises(UserError, match="no output device matches 'usb'"):
        find_device("usb", "output", DEVICES)
    with pytest.raises(UserError, match="no audio device with index 9"):
        find_device("9", "input", DEVICES)
    with pytest.raises(UserError, match="has no input channels"):
        find_device("2", "input", DEVICES)


def test_output_fifo_primes_counts_underruns_and_caps_growth():
    fifo = OutputFifo(prime=100, max_level=1000)
    assert not fifo.pop(50).any() and fifo.underruns == 0  # silence before any audio, not an underrun
    fifo.push(np.zeros(300, np.float32))  # a gated block before any sound: the schedule waits for sound
    assert fifo.level == 0 and not fifo.started and not fifo.pop(50).any() and fifo.underruns == 0
    fifo.push(np.ones(300, np.float32))
    first = fifo.pop(150)
    assert not first[:100].any() and first[100:].all()  # primed with 100 samples of silence
    assert fifo.pop(250)[:250].sum() == 250 and fifo.level == 0
    fifo.pop(10)
    assert fifo.underruns == 1 and not fifo.primed
    pushes = 0
    while fifo.overruns == 0:
        fifo.push(np.ones(100, np.float32))
        pushes += 1
    assert pushes == 10  # 100 primed + 10 * 100 > 1000
    assert fifo.level == fifo.target  # an overrun cuts back to the target, not just under the cap


def test_output_fifo_waits_as_long_as_the_late_block_took_up_to_its_cap():
    fifo = OutputFifo(prime=100, max_level=1000, max_prime=180)
    fifo.push(np.ones(200, np.float32))
    assert fifo.pop(300)[100:].all()  # prime + block, on time
    fifo.pop(30)
    fifo.pop(20)  # the next block is 50 samples late
    assert fifo.underruns == 1 and fifo.dry == 50
    fifo.push(np.ones(200, np.float32))
    out = fifo.pop(350)
    assert not out[:150].any() and out[150:].all()  # primed 100 + 50: a block as late is now on time
    assert fifo.prime == 150 and fifo.max_level == 1050 and fifo.dry == 0
    fifo.pop(100)  # 100 late: the prime grows only to its cap
    fifo.push(np.ones(10, np.float32))
    assert fifo.underruns == 2 and fifo.prime == 180 and fifo.level == 190


def simulate_live(fifo: OutputFifo, ticks: int, stall: range, chunk: int = 441, block_chunks: int = 4,
                  compute_ticks: int = 2) -> list[tuple[int, int]]:
    """A worker and an output device at 10 ms ticks: input arrives one chunk a tick; the chunk that
    completes a block costs `compute_ticks`; during `stall` the worker gets no time at all. Returns
    (fifo total, target) per tick. The output is a continuous sine, so a seam would show as a jump."""
    inbox, budget, done, played = 0, 0, 0, []
    totals = []
    t = np.arange(ticks * chunk)
    sine = (0.5 * np.sin(2 * np.pi * 441 / 44100 * t)).astype(np.float32)
    for tick in range(ticks):
        inbox += 1
        budget += 0 if tick in stall else 1
        while inbox and budget >= (cost := compute_ticks if done % block_chunks == block_chunks - 1 else 0):
            budget -= cost
            inbox -= 1
            fifo.push(sine[done * chunk:(done + 1) * chunk], queued=inbox * chunk)
            done += 1
        budget = min(budget, compute_ticks)  # an idle worker banks no more than one block's compute
        played.append(fifo.pop(chunk))
        totals.append((fifo.level + inbox * chunk, fifo.target))
    return totals


def test_output_fifo_returns_to_its_target_after_a_stall_and_counts_the_trim():
    """Issue 23: a 0.5 s stall (underrun, then a burst of backlog) must not leave its delay behind."""
    fifo = OutputFifo(prime=1764, max_level=44100, max_prime=1764 + 1764, tolerance=441)
    totals = simulate_live(fifo, 600, stall=range(200, 250))
    first_target = totals[100][1]
    assert fifo.underruns >= 1 and fifo.trims >= 1 and fifo.trimmed > 0
    assert fifo.target - first_target <= 1764  # the target grew by at most the prime's cap
    after = totals[350:]  # 1 s after the stall ended (the backlog takes 0.5 s to convert)
    assert max(abs(total - target) for total, target in after) <= 882  # within 20 ms of the target
    assert max(total for total, _ in totals[200:260]) > fifo.target + 20000  # the stall really piled up


def test_output_fifo_settles_to_what_the_output_needed_and_not_after_an_underrun():
    """`settle(margin)`: the first block's target (its compute and the whole prime) is cut to the
    lowest level the output reached plus `margin`; a window with an underrun is not settled on."""
    fifo = OutputFifo(prime=1764, max_level=44100, max_prime=3528, tolerance=441)
    totals = simulate_live(fifo, 300, stall=range(0))  # 2 ticks (20 ms) of compute every 4 chunks
    first_target, low = fifo.target, fifo.low_water
    assert low is not None and low > 441 + 882  # the slack the output never needed
    assert fifo.settle(882) == low - 882 and fifo.target == first_target - (low - 882)
    totals = simulate_live(fifo, 300, stall=range(0))  # the same FIFO, the stream going on
    assert fifo.underruns == 0 and fifo.trims >= 1  # the excess was cut, and the output kept up
    assert max(abs(total - target) for total, target in totals[-100:]) <= 441
    assert 882 <= fifo.low_water <= 882 + 441  # settled: the margin left, within one chunk
    fifo.pop(10 ** 5)  # an underrun: that window tells nothing
    assert fifo.underruns == 1 and fifo.low_water is None and fifo.settle(0) == 0


def test_output_fifo_without_trimming_would_have_drifted():
    """The same stall with trimming off (a huge tolerance): the delay stays (the drift live used to have)."""
    fifo = OutputFifo(prime=1764, max_level=441000, max_prime=1764 + 1764, tolerance=10 ** 9)
    totals = simulate_live(fifo, 600, stall=range(200, 250))
    assert fifo.trims == 0 and totals[-1][0] > totals[-1][1] + 10000


def test_output_fifo_target_ignores_a_first_block_slowed_by_warm_up():
    fifo = OutputFifo(prime=100, max_level=10 ** 6, max_prime=300)
    fifo.push(np.ones(50, np.float32), queued=5000)  # the first block took 5000 samples to compute
    assert fifo.target == 100 + 50 + 200  # prime + push + at most what the prime may grow by


def test_output_fifo_trim_crossfades_the_seam():
    fifo = OutputFifo(prime=0, max_level=10 ** 6, tolerance=100, crossfade=64, settle=1)
    fifo.push(np.ones(200, np.float32))  # target: 200
    fifo.push(np.full(1000, 0.5, np.float32))  # 1000 over the target: trimmed at once
    assert fifo.trims == 1 and fifo.trimmed == 1000 and fifo.level == 200
    out = fifo.pop(200)
    assert out[0] == 1.0 and np.all(np.diff(out[:64]) <= 0) and out[-1] == 0.5  # faded 1 -> 0.5


def test_key_reader_reads_arrow_keys_from_a_terminal(monkeypatch):
    """The reader thread on a real pty: an arrow key arrives as one 3-byte write (as terminals send it)."""
    master, slave = pty.openpty()
    settings, state = RuntimeSettings(), LiveState()
    with open(slave) as tty_in:
        monkeypatch.setattr(sys, "stdin", tty_in)
        keys = KeyReader(settings, state)
        keys.start()
        try:
            deadline = time.monotonic() + 5
            while termios.tcgetattr(slave)[3] & termios.ICANON and time.monotonic() < deadline:
                time.sleep(0.01)  # type only once the reader has put the terminal in cbreak mode
            os.write(master, b"\x1b[A\x1b[A\x1bOBf")
            while settings.snapshot().formant_shift == 1.0 and time.monotonic() < deadline:
                time.sleep(0.02)
            knobs = settings.snapshot()
            assert knobs.pitch_shift == 1 and knobs.formant_shift == pytest.approx(0.95)
            os.write(master, b"q")
            keys.join()
            assert state.stop.is_set()
        finally:
            state.stop.set()
            keys.join()
    os.close(master)
    assert split_keys("+\x1b[Bq") == ["+", "\x1b[B", "q"]


def test_keys_change_knobs_and_quit():
    settings, state = RuntimeSettings(), LiveState()
    keys = KeyReader(settings, state)
    for key in ("+", "+", "\x1b[A", "-", "g", "F", "O"):
        keys.apply(key)
    knobs = settings.snapshot()
    assert knobs.pitch_shift == 2 and knobs.gate_db == -55 and knobs.formant_shift == pytest.approx(1.05)
    assert knobs.output_gain_db == 1
    keys.apply("0")
    assert settings.snapshot().pitch_shift == 0
    for _ in range(20):
        keys.apply("G")  # past 0 dBFS: refused with a message, the knob keeps its last valid value
    assert settings.snapshot().gate_db == 0 and "gate_db" in keys.message
    assert not state.stop.is_set()
    keys.apply("q")
    assert state.stop.is_set() and isinstance(state.stop, threading.Event)


PACTL_SOURCES = ("0\tmic.monitor\tmodule-null-sink.c\ts16le 2ch 44100Hz\tIDLE\n"
                 "1\talsa_input.usb-Yeti-00.mono-fallback\tmodule-alsa-card.c\ts16le 1ch 48000Hz\tRUNNING\n")


def test_pactl_listing_becomes_devices_opened_through_pulse():
    found = parse_pactl_short(PACTL_SOURCES, "sources", via=4)
    assert [(d["name"], d["inputs"], d["outputs"], d["default_rate"], d["index"]) for d in found] == [
        ("mic.monitor", 2, 0, 44100, 4), ("alsa_input.usb-Yeti-00.mono-fallback", 1, 0, 48000, 4)]
    assert all(d["pulse"] == d["name"] and d["hostapi"] == "PulseAudio" for d in found)
    sinks = parse_pactl_short("3\tmic_feed\tmodule-null-sink.c\tfloat32le 2ch 48000Hz\tIDLE\n", "sinks", 4)
    devices = [_device(4, "pulse", 32, 32), *found, *sinks]
    for d in devices:
        d.setdefault("pulse", None)
    assert find_device("mic", "input", devices)["pulse"] == "mic.monitor"
    assert find_device("mic_feed", "output", devices)["pulse"] == "mic_feed"
    assert find_device("4", "input", devices)["name"] == "pulse"  # an index is never a pulse entry
    with pytest.raises(UserError, match="matches several input devices"):
        find_device("mon", "input", devices)


def test_pulse_sources_and_sinks_are_listed_by_name(pulse, monkeypatch):
    for name, value in pulse.env.items():
        monkeypatch.setenv(name, value)
    names = {(d["name"], d["inputs"] > 0, d["outputs"] > 0) for d in pulse_devices(via=0)}
    assert {("mic.monitor", True, False), ("speaker", False, True), ("mic", False, True)} <= names


def test_audio_api_auto_takes_the_native_pulse_client_only_where_every_device_is_on_the_server():
    from rtsvc.live.devices import choose_audio_api

    sink = {"index": 3, "name": "speaker", "pulse": "speaker"}
    default, hw = {"index": 0, "name": "default"}, {"index": 1, "name": "hw:0,0", "pulse": None}
    assert choose_audio_api("auto", [sink, default], server=True, native=True) == "pulse"
    assert choose_audio_api("auto", [sink, hw], server=True, native=True) == "portaudio"  # a card of its own
    assert choose_audio_api("auto", [sink, default], server=False, native=True) == "portaudio"
    assert choose_audio_api("auto", [sink, default], server=True, native=False) == "portaudio"  # no pasimple
    assert choose_audio_api("portaudio", [sink], server=True, native=True) == "portaudio"  # as asked
    assert choose_audio_api("pulse", [hw], server=False, native=False) == "pulse"  # opening it says why
    with pytest.raises(UserError, match="--audio-api must be one of auto, portaudio, pulse, got 'jack'"):
        choose_audio_api("jack", [sink])


def test_pulse_routing_sets_and_restores_the_stream_target(monkeypatch):
    monkeypatch.setenv("PULSE_SINK", "before")
    with pulse_routing({"pulse": "speaker"}, "output"):
        assert os.environ["PULSE_SINK"] == "speaker"
    assert os.environ["PULSE_SINK"] == "before"
    monkeypatch.delenv("PULSE_SOURCE", raising=False)
    with pulse_routing({"pulse": "mic.monitor"}, "input"):
        assert os.environ["PULSE_SOURCE"] == "mic.monitor"
    assert "PULSE_SOURCE" not in os.environ
    with pulse_routing({"pulse": None}, "input"):
        assert "PULSE_SOURCE" not in os.environ


@pytest.mark.slow
def test_live_by_pulse_names_with_a_monitor(tmp_path):
    """`rtsvc live --input mic --output speaker --monitor phones`: the converted voice reaches both sinks."""
    if shutil.which("pulseaudio") is None:
        pytest.skip("pulseaudio is not installed")
    tone = tmp_path / "tone.wav"
    sf.write(tone, sung_tone(3.0, f0=TONE_F0), SR)
    with PulseServer(("mic", "speaker", "phones")) as server:
        recorders, files = [], {}
        for sink in ("speaker", "phones"):
            files[sink] = tmp_path / f"{sink}.raw"
            with open(files[sink], "wb") as out:
                recorders.append(subprocess.Popen(["parec", "-d", f"{sink}.monitor", "--raw",
                                                   "--format=float32le", "--channels=1", f"--rate={SR}"],
                                                  env=server.env, stdout=out))
        log = tmp_path / "live.log"
        with open(log, "w") as stream:
            args = ["--input", "mic", "--output", "speaker", "--monitor", "phones", "--pitch", "12",
                    "--duration", "5", "--gate", "-60", "--block-ms", "50"]  # auto measures a busy machine
            live = subprocess.Popen([sys.executable, "-m", "rtsvc.commands.cli", "live", *args],
                                    env=server.client_env(), stdin=subprocess.DEVNULL, stdout=stream,
                                    stderr=subprocess.STDOUT)
        try:
            play_tone_into_live(live, log, server.env, tone)
        finally:
            for proc in (live, *recorders):
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(timeout=10)
    text = log.read_text()
    assert "live: mic.monitor" in text and "-> speaker" in text and "monitor phones" in text, text
    f0_in, _ = median_f0(sung_tone(3.0, f0=TONE_F0))
    for sink, path in files.items():
        f0_out, voiced = median_f0(np.fromfile(path, dtype=np.float32))
        print(f"\n{sink}: {voiced / 100:.2f} s voiced")
        assert voiced >= VOICED_MIN, (sink, voiced)
        assert f0_out == pytest.approx(2 * f0_in, rel=0.03), sink


def test_native_library_messages_print_above_the_status_line():
    """ALSA writes to fd 2 directly; while live runs those lines go through the console, whole."""
    import io

    from rich.console import Console

    from rtsvc.live.run import native_stderr_above

    sink = io.StringIO()
    console = Console(file=sink, force_terminal=True, width=120)
    before = os.fstat(2).st_ino
    with native_stderr_above(console):
        os.write(2, b"ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred\n")
        deadline = time.monotonic() + 5
        while "underrun occurred" not in sink.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
    assert "ALSA lib pcm.c:8570:(snd_pcm_recover) underrun occurred" in sink.getvalue()
    assert os.fstat(2).st_ino == before  # the real stderr is back


def test_key_help_lists_only_keys_that_apply():
    from rtsvc.live import key_help
    from rtsvc.voices.dsp import DspVoice

    class ModelLike:
        speakers = ["alice"]

    assert "f/F formant" in key_help(DspVoice()) and "f/F" not in key_help(ModelLike())
    from rtsvc.voices.model import ModelVoice

    assert ModelVoice.uses_formant  # model voices warp their mel (rtsvc.dsp.formant_warp): the key applies
    assert "lowercase lowers, uppercase raises" in key_help(ModelLike())
    settings, state = RuntimeSettings(), LiveState()
    keys = KeyReader(settings, state, ModelLike())
    keys.apply("F")
    assert settings.snapshot().formant_shift == 1.0  # no formant key for a model voice
    keys.apply("n")
    assert settings.snapshot().denoise == "deepfilternet"
    keys.apply("n")
    keys.apply("n")
    assert settings.snapshot().denoise == "off"


def test_status_lines_never_wrap_on_a_narrow_terminal():
    from rich.console import Console

    from rtsvc.live.run import status_lines

    conv, settings = FakeConversion({"compute_ms_recent": 5.0}), RuntimeSettings()
    text = status_lines(conv, OutputFifo(10, 100), LiveState(), settings, 20.0, None, width=60)
    console = Console(width=60, force_terminal=True, record=True)
    console.print(text)
    lines = console.export_text().splitlines()
    assert len(lines) == 3 and all(len(line) <= 60 for line in lines)  # cut, so rich Live redraws in place


def test_a_latency_the_host_api_cannot_have_reads_as_unknown_not_as_days():
    """PortAudio's JACK host API on PipeWire reports 97391 s per stream: the device part is "?" and
    e2e leaves it out, instead of a 194783175 ms estimate."""
    from types import SimpleNamespace

    from rtsvc.live.run import device_latency_ms, status_lines

    stream = SimpleNamespace
    assert device_latency_ms(stream(latency=0.012), stream(latency=0.008)) == pytest.approx(20.0)
    for bad in (97391.54, -0.01, float("nan")):
        assert device_latency_ms(stream(latency=0.012), stream(latency=bad)) is None
    conv = FakeConversion({"compute_ms_recent": 5.0})
    text = status_lines(conv, OutputFifo(10, 100), LiveState(), RuntimeSettings(), None, None).plain
    assert "+ device ?" in text and "e2e ~" in text


def test_device_block_zero_is_the_host_apis_own_size_and_only_portaudio_has_one():
    from rtsvc.live.run import check_device_block

    check_device_block(0.0, "portaudio")  # JACK's period
    check_device_block(5.0, "pulse")
    for block, api in ((0.0, "pulse"), (-1.0, "portaudio"), (float("nan"), "portaudio"), (250.0, "pulse")):
        with pytest.raises(UserError, match="--device-block-ms must be between"):
            check_device_block(block, api)


# --- what live says, how it stops, and that it never drifts ---------------------------

LONG_SOURCE = "alsa_output.usb-Focusrite_Scarlett_2i2_USB-00.analog-stereo.monitor"


def test_devices_print_every_name_whole_at_80_columns(capsys, monkeypatch):
    from tests.cli_helpers import run_cli

    found = [dict(_device(0, "pulse", 32, 32, True, True), hostapi="ALSA", default_rate=44100, pulse=None)]
    found += parse_pactl_short(f"3\t{LONG_SOURCE}\tmodule-alsa-card.c\ts16le 2ch 48000Hz\tIDLE\n"
                               "4\tmic_feed.monitor\tmodule-null-sink.c\tfloat32le 2ch 48000Hz\tIDLE\n",
                               "sources", 0)
    monkeypatch.setattr("rtsvc.live.list_devices", lambda: found)
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(["devices"], capsys, monkeypatch)
    assert code == 0
    lines = out.splitlines()
    assert LONG_SOURCE in lines and "mic_feed.monitor" in lines  # whole, each on its own line
    assert "0: pulse" in lines and "…" not in out


class FakeConversion:
    """What the status line reads of a `Conversion` (960 samples of input waiting)."""

    def __init__(self, stats: dict, block_ms: float = 46.4):
        from rtsvc.engine import StreamingConverter
        from rtsvc.voices.dsp import DspVoice

        self.engine = StreamingConverter(DspVoice())
        self.out_rate = 48000
        self.block_ms = block_ms
        self._stats = stats

    def bottleneck_ms(self) -> float:
        return self._stats["compute_ms_recent"]

    def inbox_samples(self) -> int:
        return 960

    def held(self) -> int:
        return 0


def test_status_fits_80_columns_with_every_field():
    from rich.console import Console

    from rtsvc.live.run import status_lines
    from rtsvc.settings import Knobs

    conv = FakeConversion({"compute_ms_recent": 123.4})
    fifo = OutputFifo(prime=4800, max_level=10 ** 6)
    fifo.push(np.ones(480, np.float32), queued=960)
    fifo.underruns, fifo.overruns, fifo.trims = 12, 345, 67
    state = LiveState(input_db=-23.4, input_overruns=8, seconds=1234.5)
    settings = RuntimeSettings(Knobs(pitch_shift=-12, formant_shift=1.25, gate_db=-55, input_gain_db=-12,
                                     output_gain_db=12, denoise="deepfilternet", vad="on"))
    text = status_lines(conv, fifo, state, settings, device_ms=47.0, keys=None, width=79)
    console = Console(width=80, record=True, force_terminal=True)
    console.print(text)
    lines = console.export_text().rstrip("\n").splitlines()
    plain = "\n".join(lines)
    assert all(len(line) <= 79 for line in lines) and "…" not in plain, plain
    e2e = conv.engine.latency_ms + (4800 + 480 + 960) / 48 + 47.0
    for part in (f"e2e ~{e2e:.0f} ms", f"algo {conv.engine.latency_ms:.0f}", "buffer 130", "device 47",
                 "under 12", "over 353",
                 "trim 67", "pitch -12", "formant 1.25", "gate -55 dB", "gain -12/+12 dB",
                 "denoise deepfilternet vad",
                 "1234.5 s", "compute 0/23 ms"):
        assert part in plain, (part, plain)


class GuardConversion:
    def __init__(self):
        self.requested = []
        self.block_ms = 46.4
        self.compute = 10.0
        self.inbox = 0
        self.out_rate = 44100

        class Engine:
            sample_rate = 44100

            @staticmethod
            def stats():
                return {"blocks": 100, "gated_blocks": 0}

        self.engine = Engine()

    def bottleneck_ms(self):
        return self.compute

    def inbox_samples(self):
        return self.inbox

    def request_block(self, block_ms):
        self.requested.append(block_ms)
        self.block_ms = block_ms


def test_overload_guard_lengthens_the_block_after_sustained_overload_and_shortens_it_when_calm():
    from rtsvc.live.chain import CALM_S, GRACE_S, OVERLOAD_S, OverloadGuard

    conv = GuardConversion()
    guard = OverloadGuard(conv)
    conv.compute = 60.0  # over a 46.4 ms block
    assert guard.check(100.0 - GRACE_S) is None  # the run starts: warm-up is no overload
    assert guard.check(100.0 - OVERLOAD_S - 1) is None and not conv.requested
    assert guard.check(100.0) is None
    assert guard.check(100.0 + OVERLOAD_S / 2) is None  # not yet sustained
    message = guard.check(100.0 + OVERLOAD_S)
    assert conv.requested == [pytest.approx(69.66, abs=0.01)]
    assert message.startswith("overload: compute 60 ms")
    assert "block 46 -> 70 ms" in message
    conv.compute = 10.0  # calm: under 0.4 of the 46.4 ms block
    t = 100.0 + OVERLOAD_S + 6.0
    assert guard.check(t) is None
    message = guard.check(t + CALM_S)
    assert conv.requested[-1] == pytest.approx(46.44, abs=0.01) and message.startswith("load eased")
    assert guard.check(t + 3 * CALM_S) is None  # never below the block it started with
    assert OverloadGuard(conv, enabled=False).check(1e6) is None


def test_conversion_skips_input_backlog_over_the_target_crossfaded():
    """After a stall the worker finds a second of input queued: what would only be trimmed from the
    output later is skipped before it is converted, and counted as a trim."""
    import queue

    from rtsvc.live.chain import Conversion
    from rtsvc.voices.dsp import DspVoice

    fifo = OutputFifo(prime=441, max_level=10 ** 6, tolerance=441)
    inbox: queue.Queue = queue.Queue()
    conv = Conversion(DspVoice(), RuntimeSettings(), StreamConfig(block_ms=46.4), 44100, 44100, [fifo],
                      inbox_samples=lambda: inbox.qsize() * 441)
    fifo.target = 441 * 5
    for i in range(100):
        inbox.put(np.full(441, i + 1, np.float32))
    chunk = conv.skip_backlog(np.zeros(441, np.float32), inbox)
    left = inbox.qsize()  # what is left: the target (5) + tolerance (1)
    assert 0 < left <= 6 and fifo.trims == 1 and fifo.trimmed == (100 - left) * 441
    assert chunk[0] == 0.0 and chunk[-1] == 100 - left  # faded from the skipped audio into the kept
    assert np.all(np.diff(chunk[:128]) >= 0)


def test_live_stops_on_sigterm_like_ctrl_c(pulse, tmp_path):
    """Issue 24: SIGTERM (a service manager, `kill`) printed nothing and exited 143."""
    import signal

    log = tmp_path / "live.log"
    live = start_live(pulse, ["--block-ms", "50", "--duration", "60"], log)
    try:
        wait_for_start(live, log, timeout=60)
        time.sleep(1.0)
        live.send_signal(signal.SIGTERM)
        code = live.wait(timeout=30)
    finally:
        if live.poll() is None:
            live.kill()
            live.wait()
    text = log.read_text()
    assert code == 0, text
    assert "stopping (SIGTERM)" in text and "stopped after" in text and "e2e estimate" in text


def test_live_through_the_native_pulse_api(pulse, tmp_path):
    """--audio-api pulse (libpulse via pasimple, explicit buffers) converts like PortAudio does."""
    pytest.importorskip("pasimple")
    args = ["--pitch", "12", "--duration", "5", "--gate", "-60", "--block-ms", "50", "--audio-api", "pulse",
            "--input", "mic.monitor", "--output", "speaker", "--jitter-ms", "150"]
    out, text = live_with_tone(pulse, args, tmp_path)
    f0_out, voiced = median_f0(out)
    print("\n" + "\n".join(line for line in text.splitlines() if line.startswith(("live:", "stopped"))))
    print(f"{voiced / 100:.2f} s voiced")
    assert "(pulse)" in text and voiced >= VOICED_MIN
    assert f0_out == pytest.approx(2 * TONE_F0, rel=0.03)


def cpu_hog(seconds: float) -> list[subprocess.Popen]:
    """One busy process per core for `seconds`."""
    code = f"import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass"
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(os.cpu_count() or 2)]


def parse_status(text: str) -> list[tuple[float, float, float]]:
    """(seconds, buffer ms, target ms) of each plain status line live writes to a log."""
    import re

    pattern = re.compile(r"\[\s*([\d.]+) s\] e2e ~\d+ ms = algo \d+ \+ buffer (\d+) \(target (\d+)\)")
    return [tuple(float(g) for g in m.groups()) for m in map(pattern.search, text.splitlines()) if m]


@pytest.mark.slow
def test_live_buffer_returns_to_its_target_after_a_cpu_hog(pulse, tmp_path):
    """Issue 23: a CPU hog for 10 s in the middle of a live run; within 5 s after it stops, the
    buffer is back within 20 ms of its target (before: it stayed 300-480 ms up)."""
    import shlex

    clip = tmp_path / "tone.wav"
    sf.write(clip, sung_tone(60.0, f0=TONE_F0), SR)
    log = tmp_path / "live.log"
    # RTSVC_HOG_LIVE_ARGS: the same check for another voice, e.g. the real-size student
    # (docs/benchmarks.md, "End-to-end latency"):
    # "--model student.rtsvc --pretrained-dir P --f0 fcpe --block-ms auto"
    args = shlex.split(os.environ.get("RTSVC_HOG_LIVE_ARGS", "--block-ms 69.7"))
    live = start_live(pulse, [*args, "--gate", "-60", "--duration", "34"], log)
    player = None
    try:
        wait_for_start(live, log, timeout=900)
        player = subprocess.Popen(["paplay", "-d", "mic", str(clip)], env=pulse.env)
        time.sleep(8.0)
        started = parse_status(log.read_text())[-1][0]
        hogs = cpu_hog(10.0)
        for hog in hogs:
            hog.wait(timeout=60)
        stopped = parse_status(log.read_text())[-1][0]
        assert live.wait(timeout=60) == 0, log.read_text()[-2000:]
    finally:
        for proc in (live, player):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)
    text = log.read_text()
    rows = parse_status(text)
    during = [buf - target for t, buf, target in rows if started <= t <= stopped]
    settled = [(t, buf - target) for t, buf, target in rows if stopped + 5.0 <= t <= stopped + 10.0]
    print(f"\nhog {started:.1f}-{stopped:.1f} s; most over target during it {max(during, default=0):.0f} ms; "
          f"after +5 s: {[round(d) for _, d in settled]}\n"
          + next((line for line in text.splitlines() if line.startswith("stopped")), ""))
    assert settled, text[-2000:]
    # no delay left over (the drift): never over the target by more than 20 ms. Under it is a late block
    # caught mid-compute (an underrun on a machine still busy with others), so it is bounded loosely
    assert all(d <= 20.0 for _, d in settled), text[-3000:]
    assert float(np.median([abs(d) for _, d in settled])) <= 20.0, text[-3000:]


@pytest.mark.slow
def test_the_two_monitor_clock_measures_a_known_delay_line():
    """`rtsvc bench --loopback`'s clock (mic.monitor -> speaker.monitor on the server's clock): a
    pass-through client with a 100 ms delay line measures 100 ms more than without it."""
    from benchmarks.rig_floor import floor_row

    plain = floor_row(5.0, 10.0, seconds=5.0)
    delayed = floor_row(5.0, 10.0, seconds=5.0, delay_ms=100.0)
    extra = delayed["clock_ms"] - plain["clock_ms"]
    held = delayed["held_ms"] - plain["held_ms"]
    print(f"\nclock: {plain['clock_ms']:.1f} ms plain, {delayed['clock_ms']:.1f} ms with 100 ms more; "
          f"the queues held {held:.1f} ms more")
    # the line is 100 ms when primed; start-up and any starved pop on a busy machine (CI) each eat a
    # 5 ms block of it, so the clock is held to what the client's queue really held
    assert 70.0 <= held <= 105.0, (plain, delayed)
    assert abs(extra - held) <= 8.0, (plain, delayed)
    # the pass-through alone: the server's record + playback buffers and at most two queued blocks
    assert 0.0 < plain["clock_ms"] <= plain["reported_in_ms"] + plain["reported_out_ms"] + 15.0, plain
