"""Benchmarks (`rtsvc bench`): engine compute time per block, and end-to-end loopback latency.

Compute: each configuration streams a synthetic sung tone through `StreamingConverter` and
reports per-block compute time (mean, p50, p99), real-time factor (compute / block length) and the
engine's algorithmic latency. Nothing here asserts on time; it prints tables.

Loopback: a private PulseAudio server with two null sinks ("mic", "speaker") stands in for a
sound card. A measuring process plays tone bursts into "mic" and records "speaker.monitor" in one
full-duplex stream while `rtsvc live` runs between them; the same rig recording "mic.monitor"
directly gives the rig's own delay, which is subtracted.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from rtsvc.engine import StreamConfig, StreamingConverter
from rtsvc.errors import UserError
from rtsvc.settings import Knobs, RuntimeSettings
from rtsvc.voice import Voice

SAMPLE_RATE = 44100
WARMUP_BLOCKS = 2  # first blocks pay for lazy initialisation; not timed
BURST_EVERY_S = 0.5
BURST_S = 0.06


def sung_tone(seconds: float, sample_rate: int = SAMPLE_RATE, f0: float = 180.0, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: harmonics with vibrato, and a breathy noise gap every second."""
    t = np.arange(int(seconds * sample_rate)) / sample_rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.02 * np.sin(2 * np.pi * 5 * t))) / sample_rate
    x = sum(0.15 / k * np.sin(k * phase) for k in range(1, 15))
    noise = 0.02 * np.random.default_rng(seed).standard_normal(t.shape[0])
    gap = (t % 1.0) > 0.85
    return np.where(gap, noise, x).astype(np.float32)


@dataclass
class BenchCase:
    label: str  # e.g. "dsp" or "model.ckpt torch"
    device: str  # "cpu" / "cuda"
    voice: Voice
    config: StreamConfig
    steps: int | None = None  # model voices: sampling steps


def parse_list(text: str, kind: type, option: str) -> list:
    """A comma-separated option value (`--block-ms 50,100`) -> a non-empty list of `kind`."""
    try:
        values = [kind(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"{option} must be a comma-separated list of numbers, got {text!r}") from None
    if not values:
        raise UserError(f"{option} needs at least one value")
    return values


def parse_blocks(text: str) -> list[float | None]:
    """`--block-ms 50,auto,150` -> [50.0, None, 150.0] (None: the voice's auto block)."""
    def block(part: str) -> float | None:
        return None if part.strip().lower() == "auto" else float(part)

    return parse_list(text, block, "--block-ms")


def resolve_configs(configs: list[StreamConfig], voice: Voice) -> list[StreamConfig]:
    """`configs` with auto blocks resolved for `voice`, duplicates dropped (order kept)."""
    resolved = [c.for_voice(voice) for c in configs]
    return [c for i, c in enumerate(resolved) if c not in resolved[:i]]


def dsp_configs(configs: list[StreamConfig]) -> list[StreamConfig]:
    """`configs` as the DSP voice runs them (`rtsvc bench --loopback` measures each)."""
    from rtsvc.dsp_voice import DspVoice

    return resolve_configs(configs, DspVoice())


def bench_devices(spec: str) -> list[str]:
    """--device: `all` is cpu plus cuda when torch sees a GPU; else a comma list as given."""
    if spec != "all":
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        for device in devices:
            if device not in ("cpu", "auto") and not device.startswith("cuda"):
                raise UserError(f"unknown --device {device!r}: use all or a comma list of cpu, cuda")
        return devices or ["cpu"]
    import torch

    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_cases(configs: list[StreamConfig], model: str | Path | None = None, steps: list[int] = (),
               backends: list[str] = ("auto",), devices: list[str] = ("cpu",),
               **open_args) -> list[BenchCase]:
    """The DSP voice at every config, then (with a model) every device x backend x config x steps;
    `open_args` go to `rtsvc.live.open_voice` (pretrained dir, component overrides, f0, providers...)."""
    from rtsvc.live import open_voice
    from rtsvc.settings import validate_knobs

    for count in steps:
        validate_knobs(Knobs(steps=count))  # before any model loads
    dsp_args = {k: v for k, v in open_args.items() if k in ("f0", "providers", "dit_context_ms")}  # checked
    dsp = open_voice(None, **dsp_args)
    cases = [BenchCase("dsp", "cpu", dsp, c) for c in resolve_configs(configs, dsp)]
    if model is None:
        return cases
    for device in devices:
        for backend in backends:
            voice = open_voice(model, backend=backend, device=device, streaming=True, **open_args)
            cases += [BenchCase(f"{Path(model).name} {backend}", device, voice, c, s)
                      for c in resolve_configs(configs, voice) for s in steps]
    return cases


def gap_grid(configs: list[StreamConfig], crossfades: list[float],
             searches: list[float]) -> list[StreamConfig]:
    """`rtsvc bench --gap`: every block length (and context) x crossfade x SOLA search, validated."""
    return [StreamConfig(block_ms=c.block_ms, context_ms=c.context_ms, crossfade_ms=x,
                         sola_search_ms=s).validate() for c in configs for x in crossfades for s in searches]


def bench_case(case: BenchCase, seconds: float = 5.0) -> dict:
    """Stream `seconds` of the test signal through one configuration; compute-time statistics."""
    knobs = Knobs(gate_db=-120.0, steps=case.steps or Knobs().steps)  # gate off: every block is timed
    engine = StreamingConverter(case.voice, RuntimeSettings(knobs), case.config)
    block = engine.layout.block
    audio = sung_tone(seconds + (WARMUP_BLOCKS + 1) * block / engine.sample_rate, engine.sample_rate)
    engine.process(audio[: WARMUP_BLOCKS * block])
    engine.reset_stats()  # drop warm-up timings
    cpu = time.process_time()  # CPU seconds of this process: meaningful on a shared, busy machine
    engine.process(audio[WARMUP_BLOCKS * block:])
    cpu = time.process_time() - cpu
    st = engine.stats()
    return {"voice": case.label, "device": case.device, "steps": case.steps, "block_ms": st["block_ms"],
            "blocks": st["blocks"], "mean_ms": st["compute_ms_mean"], "p50_ms": st["compute_ms_p50"],
            "p99_ms": st["compute_ms_p99"], "cpu_ms": cpu * 1000.0 / max(st["blocks"], 1), "rtf": st["rtf"],
            "p99_block": st["compute_ms_p99"] / st["block_ms"], "latency_ms": st["latency_ms"]}


def bench_table(rows: list[dict], title: str = "rtsvc bench: streaming engine, per-block compute"):
    from rich.table import Table

    table = Table(title=title, caption="ms = wall-clock compute per block; CPU ms = process CPU time per "
                  "block; RTF = mean / block length (< 1 keeps up); p99/block = the real-time margin "
                  "(keep it well under 1: docs/streaming.md chose blocks at <= 0.6)")
    for name in ("voice", "device", "steps", "block ms", "blocks", "mean ms", "p50 ms", "p99 ms",
                 "CPU ms", "RTF", "p99/block", "algo latency ms"):
        table.add_column(name, justify="left" if name in ("voice", "device") else "right")
    for r in rows:
        table.add_row(r["voice"], r["device"], "-" if r["steps"] is None else str(r["steps"]),
                      f"{r['block_ms']:.1f}", str(r["blocks"]), f"{r['mean_ms']:.1f}", f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", f"{r['cpu_ms']:.1f}", f"{r['rtf']:.3f}", f"{r['p99_block']:.2f}",
                      f"{r['latency_ms']:.1f}")
    return table


def run_bench(cases: list[BenchCase], seconds: float = 5.0, console=None) -> list[dict]:
    """Run every case (with a progress bar) and print one table; returns the rows."""
    from rich.console import Console
    from rich.progress import Progress

    if seconds <= 0:
        raise UserError(f"--seconds must be positive, got {seconds:g}")
    console = console or Console()
    rows = []
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("benchmarking", total=len(cases))
        for case in cases:
            progress.update(task, description=f"{case.label} {case.device} block {case.config.block_ms:g} ms")
            rows.append(bench_case(case, seconds))
            progress.advance(task)
    console.print(bench_table(rows))
    return rows


# --- streaming vs offline: how the stream settings change the output ---------------------------

def log_spectral_distance(a: np.ndarray, b: np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Mean over STFT frames of the RMS difference of the two power spectra, in dB."""
    from scipy.signal import stft

    _, _, sa = stft(a, sample_rate, nperseg=2048, noverlap=1536)
    _, _, sb = stft(b, sample_rate, nperseg=2048, noverlap=1536)
    la, lb = (10 * np.log10(np.abs(s) ** 2 + 1e-8) for s in (sa, sb))
    return float(np.mean(np.sqrt(np.mean((la - lb) ** 2, axis=0))))


def streaming_gap(voice: Voice, configs: list[StreamConfig], knobs: Knobs | None = None,
                  seconds: float = 4.0) -> list[dict]:
    """LSD between `convert_stream` and the offline conversion of the same test signal, per config
    (how docs/streaming.md chose the default block, crossfade and SOLA search).

    `voice` is the offline reference: the DSP voice, or `open_model(..., streaming=False)` (whose
    `for_streaming()` variant, same weights, is what gets streamed). A streaming model voice as the
    reference would compare the stream against itself."""
    from rtsvc.engine import StreamLayout, convert_stream

    if getattr(voice, "streaming", False):
        raise ValueError("streaming_gap needs the offline voice as its reference: "
                         "open_model(..., streaming=False)")
    streamed_voice = voice.for_streaming() if hasattr(voice, "for_streaming") else voice
    knobs = knobs or Knobs(pitch_shift=5, gate_db=-70.0)
    audio = sung_tone(seconds, voice.sample_rate)
    voice.reset()
    offline = voice.convert(audio, knobs)
    rows = []
    for config in configs:
        config = config.for_voice(streamed_voice)  # an auto block: this voice's
        streamed = convert_stream(streamed_voice, audio, knobs, config)
        latency = StreamLayout.from_config(config, voice.sample_rate).latency
        rows.append({"block_ms": config.block_ms, "context_ms": config.context_ms,
                     "crossfade_ms": config.crossfade_ms, "sola_search_ms": config.sola_search_ms,
                     "lsd_db": log_spectral_distance(streamed, offline),
                     "latency_ms": latency * 1000.0 / voice.sample_rate})
    return rows


def run_gap(grid: list[StreamConfig], model: str | Path | None = None, console=None,
            **open_args) -> dict[str, list[dict]]:
    """`rtsvc bench --gap`: `streaming_gap` of the DSP voice and, with a model, of its offline voice
    (`open_voice(..., streaming=False)`, so the reference is the upstream offline conversion);
    prints one table per voice, returns the rows by voice."""
    from rich.console import Console
    from rich.progress import Progress

    from rtsvc.live import open_voice

    console = console or Console()
    labels = ["dsp"] + ([Path(model).name] if model is not None else [])
    results = {}
    for label in labels:
        with Progress(console=console, transient=True) as progress:
            progress.add_task(f"{label}: streaming vs offline", total=None)
            voice = open_voice(None) if label == "dsp" else open_voice(model, streaming=False, **open_args)
            results[label] = streaming_gap(voice, grid)
        console.print(gap_table(results[label], title=f"{label}: streaming vs offline "
                                "(log-spectral distance, lower = closer)"))
    return results


def gap_table(rows: list[dict], title: str = "streaming vs offline (log-spectral distance, lower = closer)"):
    from rich.table import Table

    table = Table(title=title)
    for name in ("block ms", "context ms", "crossfade ms", "SOLA search ms", "LSD dB", "algo latency ms"):
        table.add_column(name, justify="right")
    for r in rows:
        table.add_row(f"{r['block_ms']:g}", f"{r['context_ms']:g}", f"{r['crossfade_ms']:g}",
                      f"{r['sola_search_ms']:g}", f"{r['lsd_db']:.2f}", f"{r['latency_ms']:.1f}")
    return table


# --- loopback through PulseAudio null sinks ---------------------------------------------------

class PulseServer:
    """A private PulseAudio daemon with null sinks, for tests and the loopback benchmark.

    `env` points clients (pactl, paplay, PortAudio's `pulse` device) at it. Started as a child
    process (no daemonising), so it is stopped by its own pid.
    """

    def __init__(self, sinks: tuple[str, ...] = ("mic", "speaker")):
        if shutil.which("pulseaudio") is None:
            raise UserError("pulseaudio is not installed (apt-get install pulseaudio libasound2-plugins)")
        self.sinks = sinks
        self.runtime_dir = tempfile.mkdtemp(prefix="rtsvc-pulse-")
        os.chmod(self.runtime_dir, 0o700)
        self.env = dict(os.environ, XDG_RUNTIME_DIR=self.runtime_dir, PULSE_RUNTIME_PATH=self.runtime_dir)
        for name in ("PULSE_SERVER", "PULSE_SINK", "PULSE_SOURCE"):
            self.env.pop(name, None)
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> "PulseServer":
        args = ["pulseaudio", "--daemonize=no", "--exit-idle-time=-1", "-n", "--disallow-exit",
                "--log-target=stderr", "--load=module-native-protocol-unix"]
        args += [f"--load=module-null-sink sink_name={name} rate={SAMPLE_RATE}" for name in self.sinks]
        self.process = subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"pulseaudio failed to start: {self.process.stderr.read().decode()[-500:]}")
            if subprocess.run(["pactl", "info"], env=self.env, capture_output=True).returncode == 0:
                return self
            time.sleep(0.1)
        self.__exit__()
        raise UserError("pulseaudio did not come up within 15 s")

    def __exit__(self, *exc) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    def client_env(self, sink: str | None = None, source: str | None = None) -> dict:
        env = dict(self.env)
        if sink:
            env["PULSE_SINK"] = sink
        if source:
            env["PULSE_SOURCE"] = source
        return env


def burst_train(seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Hann-windowed harmonic bursts (voiced, so any voice passes them) at irregular intervals
    around BURST_EVERY_S, so that only the true delay lines the recording up with the bursts."""
    n = int(BURST_S * sample_rate)
    t = np.arange(n) / sample_rate
    burst = np.hanning(n) * sum(0.2 / k * np.sin(2 * np.pi * 220 * k * t) for k in range(1, 8))
    out = np.zeros(int(seconds * sample_rate), dtype=np.float32)
    rng = np.random.default_rng(7)
    start = int(0.2 * sample_rate)
    while start + n < out.shape[0]:
        out[start: start + n] = burst
        start += int(BURST_EVERY_S * rng.uniform(0.6, 1.4) * sample_rate)
    return out


def envelope(x: np.ndarray, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Amplitude envelope (|x| smoothed over 5 ms), robust to a voice changing the waveform."""
    width = int(0.005 * sample_rate)
    return np.convolve(np.abs(x), np.ones(width) / width, mode="same")


def delay_of(played: np.ndarray, recorded: np.ndarray, max_delay_s: float = 2.0,
             sample_rate: int = SAMPLE_RATE) -> float:
    """Seconds by which `recorded` lags `played` (envelope cross-correlation)."""
    from scipy.signal import correlate

    a, b = envelope(played, sample_rate), envelope(recorded, sample_rate)
    a, b = a - a.mean(), b - b.mean()
    corr = correlate(b, a, mode="full", method="fft")[a.shape[0] - 1:]  # lags >= 0
    corr = corr[: int(max_delay_s * sample_rate)]
    return float(np.argmax(corr)) / sample_rate


def playrec_main(argv: list[str] | None = None) -> None:
    """Child process of the loopback rig: `python -c ... OUT.npy SECONDS` plays bursts, records, saves.

    A separate process because PortAudio reads PULSE_SINK / PULSE_SOURCE when it starts.
    """
    import sounddevice as sd

    out_path, seconds = (argv or sys.argv[1:])[:2]
    played = burst_train(float(seconds))
    recorded = sd.playrec(played, samplerate=SAMPLE_RATE, channels=1, device="pulse", blocking=True)
    np.save(out_path, np.stack((played, recorded[:, 0])))


def _rig(server: PulseServer, source: str, seconds: float, workdir: Path, attempts: int = 3) -> float:
    """Play bursts into "mic" while recording `source`; the delay in seconds (retried: a PulseAudio
    stream sometimes starts late on a busy machine and hears nothing)."""
    out = workdir / f"rig-{source}.npy"
    code = "import sys; from rtsvc.bench import playrec_main; playrec_main(sys.argv[1:])"
    for _ in range(attempts):
        subprocess.run([sys.executable, "-c", code, str(out), str(seconds)], check=True,
                       timeout=seconds + 30, env=server.client_env(sink="mic", source=source),
                       capture_output=True)
        played, recorded = np.load(out)
        if np.max(np.abs(recorded)) >= 1e-3:
            return delay_of(played, recorded)
    raise UserError(f"loopback: nothing came back on {source} (is `rtsvc live` passing audio?)")


def measure_loopback(live_args: list[str], seconds: float = 6.0, startup_timeout: float = 60.0) -> dict:
    """End-to-end latency of `rtsvc live LIVE_ARGS` between two PulseAudio null sinks, in ms."""
    with PulseServer() as server, tempfile.TemporaryDirectory() as tmp:
        rig_ms = _rig(server, "mic.monitor", seconds, Path(tmp)) * 1000
        log = Path(tmp) / "live.log"
        live = start_live(server, ["--duration", str(seconds + 15), *live_args], log)
        try:
            wait_for_start(live, log, startup_timeout)
            time.sleep(1.0)  # let the streams settle
            total_ms = _rig(server, "speaker.monitor", seconds, Path(tmp)) * 1000
        finally:
            live.send_signal(signal.SIGINT)  # a clean Ctrl-C: live prints its counters
            try:
                live.wait(timeout=10)
            except subprocess.TimeoutExpired:
                live.kill()
                live.wait()
        text = log.read_text(errors="replace")
        summary = text[text.rindex("stopped after"):].strip() if "stopped after" in text else ""
    return {"rig_ms": rig_ms, "total_ms": total_ms, "live_ms": total_ms - rig_ms, "live_summary": summary}


def loopback_report(config: StreamConfig, live_args: list[str] = ()) -> str:
    """`rtsvc bench --loopback`: measure `rtsvc live` (DSP voice) at `config`; a printable summary."""
    args = ["--block-ms", str(config.block_ms), "--context-ms", str(config.context_ms), "--crossfade-ms",
            str(config.crossfade_ms), "--sola-search-ms", str(config.sola_search_ms), "--gate", "-70",
            *live_args]
    res = measure_loopback(args)
    return (f"loopback end-to-end latency of `rtsvc live` (block {config.block_ms:g} ms): "
            f"{res['live_ms']:.0f} ms (rig total {res['total_ms']:.0f} ms, rig alone {res['rig_ms']:.0f} ms)"
            f"\n  live: {res['live_summary']}")


def start_live(server: PulseServer, args: list[str], log: Path) -> subprocess.Popen:
    """`rtsvc live --input pulse --output pulse ARGS` reading mic.monitor and playing into "speaker"."""
    exe = shutil.which("rtsvc")
    cmd = [exe] if exe else [sys.executable, "-m", "cli"]
    with open(log, "w") as stream:  # a file, not a pipe: a pipe nobody drains can block the child
        return subprocess.Popen([*cmd, "live", "--input", "pulse", "--output", "pulse", *args],
                                env=server.client_env(sink="speaker", source="mic.monitor"),
                                stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT,
                                cwd=str(Path(__file__).resolve().parent.parent))


def wait_for_start(process: subprocess.Popen, log: Path, timeout: float) -> None:
    """Wait for live's start-up line ("live: IN -> OUT ..."); a UserError with its output if it exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        if "live:" in text:
            return
        if process.poll() is not None:
            raise UserError(f"`rtsvc live` exited early (code {process.returncode}): {text[-800:]}")
        time.sleep(0.1)
    raise UserError(f"`rtsvc live` did not start within {timeout:.0f} s")
