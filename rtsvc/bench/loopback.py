"""End-to-end latency of `rtsvc live` (`rtsvc bench --loopback`) through PulseAudio null sinks.

A private PulseAudio server with two null sinks ("mic", "speaker") stands in for a sound card. A
measuring process plays tone bursts into "mic" and records "speaker.monitor" in one full-duplex
stream while `rtsvc live` runs between them; the same rig recording "mic.monitor" directly gives
the rig's own delay, which is subtracted. The tests drive live audio through the same rig.
"""

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.engine import StreamConfig
from rtsvc.errors import UserError

BURST_EVERY_S = 0.5
BURST_S = 0.06


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
    code = "import sys; from rtsvc.bench.loopback import playrec_main; playrec_main(sys.argv[1:])"
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
