"""End-to-end latency of `rtsvc live` (`rtsvc bench --loopback`) through PulseAudio null sinks.

A private PulseAudio server with two null sinks ("mic", "speaker") stands in for a sound card:
audio reaches "mic.monitor" when the microphone would have captured it, and "speaker.monitor" when
the speaker would play it. A measuring process plays tone bursts into "mic" and records both monitors
at once, stamping each fragment on the server's clock (`monitor_delays`), so each burst's delay from
one monitor to the other is what `rtsvc live` adds between microphone and ear, with no rig delay to
subtract. (The first rig recorded through PortAudio and subtracted its own delay measured in a
separate run; that delay moved by 10-40 ms between runs and overstated live's figure by 30-40 ms:
`benchmarks/rig_floor.py` keeps it and compares the two.) The tests drive live audio through the same server.
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
                "--log-target=stderr", "--load=module-native-protocol-unix",
                "--realtime=yes", "--high-priority=yes"]  # as a desktop sound server runs (rtkit)
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


def burst_onsets(seconds: float, sample_rate: int = SAMPLE_RATE) -> list[int]:
    """Where `burst_train` starts its bursts (samples): irregular intervals around BURST_EVERY_S."""
    n, total = int(BURST_S * sample_rate), int(seconds * sample_rate)
    rng = np.random.default_rng(7)
    onsets, start = [], int(0.2 * sample_rate)
    while start + n < total:
        onsets.append(start)
        start += int(BURST_EVERY_S * rng.uniform(0.6, 1.4) * sample_rate)
    return onsets


def burst_train(seconds: float, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Hann-windowed harmonic bursts (voiced, so any voice passes them) at irregular intervals
    around BURST_EVERY_S, so that only the true delay lines the recording up with the bursts."""
    n = int(BURST_S * sample_rate)
    t = np.arange(n) / sample_rate
    burst = np.hanning(n) * sum(0.2 / k * np.sin(2 * np.pi * 220 * k * t) for k in range(1, 8))
    out = np.zeros(int(seconds * sample_rate), dtype=np.float32)
    for start in burst_onsets(seconds, sample_rate):
        out[start: start + n] = burst
    return out


def burst_delays(played: np.ndarray, recorded: np.ndarray, around: float, search_s: float = 0.1,
                 sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Each burst's own delay in seconds, searched within `search_s` of the overall delay `around`
    (so a long delay never matches the next burst); bursts that came back silent are left out."""
    env_p, env_r = envelope(played, sample_rate), envelope(recorded, sample_rate)
    n, reach = int(BURST_S * sample_rate), int(search_s * sample_rate)
    centre = int(around * sample_rate)
    floor = 0.1 * float(env_r.max()) if env_r.size else 0.0
    delays = []
    for onset in burst_onsets(played.shape[0] / sample_rate, sample_rate):
        pattern = env_p[onset: onset + n]
        lo, hi = onset + centre - reach, onset + centre + reach + n
        if lo < 0 or hi > env_r.shape[0]:
            continue
        window = env_r[lo:hi]
        if window.max() < floor:
            continue
        scores = np.correlate(window - window.mean(), pattern - pattern.mean(), mode="valid")
        delays.append((lo + int(np.argmax(scores)) - onset) / sample_rate)
    return np.array(delays)


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


MONITOR_FRAGMENT_MS = 5.0  # record fragments of the two-monitor clock: its timestamps are this fine


def monitors_main(argv: list[str] | None = None) -> None:
    """Child process of the two-monitor clock: `python -c ... OUT.npz SECONDS` plays bursts into "mic"
    and records "mic.monitor" and "speaker.monitor" at once (pasimple), stamping every fragment with
    the monotonic time its last sample reached the server's monitor: now - the stream's latency."""
    import threading

    import pasimple

    out_path, seconds = (argv or sys.argv[1:])[:2]
    played = burst_train(float(seconds))
    fragment = int(MONITOR_FRAGMENT_MS * SAMPLE_RATE / 1000)
    fragment_bytes = fragment * np.dtype(np.float32).itemsize
    flt = pasimple.PA_SAMPLE_FLOAT32LE

    def open_record(source: str):
        return pasimple.PaSimple(pasimple.PA_STREAM_RECORD, flt, 1, SAMPLE_RATE, app_name="rtsvc-clock",
                                 stream_name=source, device_name=source, fragsize=fragment_bytes,
                                 maxlength=SAMPLE_RATE * 4)

    streams = {name: open_record(name) for name in ("mic.monitor", "speaker.monitor")}
    chunks: dict[str, list] = {name: [] for name in streams}
    stop = threading.Event()

    def record(name: str) -> None:
        stream = streams[name]
        while not stop.is_set():
            data = np.frombuffer(stream.read(fragment_bytes), dtype=np.float32)
            chunks[name].append((time.monotonic() - stream.get_latency() / 1e6, data))

    threads = [threading.Thread(target=record, args=(name,), daemon=True) for name in streams]
    for thread in threads:
        thread.start()
    player = pasimple.PaSimple(pasimple.PA_STREAM_PLAYBACK, flt, 1, SAMPLE_RATE, app_name="rtsvc-clock",
                               stream_name="bursts", device_name="mic")
    player.write(played.astype(np.float32).tobytes())
    player.drain()
    time.sleep(1.0)  # the last bursts' way through live
    stop.set()
    for thread in threads:
        thread.join(timeout=2.0)
    saved = {}
    for name, parts in chunks.items():
        audio = np.concatenate([data for _, data in parts])
        ends = np.cumsum([data.shape[0] for _, data in parts])  # sample index after each fragment
        # the stream's clock: sample i reached the monitor at start + i / rate; the median over all
        # fragments of (stamp - index / rate) is robust to a late wake-up of the reading thread
        starts = [stamp - end / SAMPLE_RATE for (stamp, _), end in zip(parts, ends, strict=True)]
        start = float(np.median(starts))
        saved[name.replace(".", "_")] = audio
        saved[name.replace(".", "_") + "_start"] = np.array(start)
    np.savez(out_path, **saved)


def monitor_delays(server: PulseServer, seconds: float, workdir: Path) -> np.ndarray:
    """Each burst's delay in seconds from "mic.monitor" to "speaker.monitor" (what `rtsvc live` adds
    between them: its input buffering, conversion, output buffer and playback stream, and the
    speaker sink), on the sound server's own clock: no rig delay to subtract."""
    out = workdir / "monitors.npz"
    code = "import sys; from rtsvc.bench.loopback import monitors_main; monitors_main(sys.argv[1:])"
    subprocess.run([sys.executable, "-c", code, str(out), str(seconds)], check=True, timeout=seconds + 60,
                   env=server.client_env(), capture_output=True)
    rec = np.load(out)
    mic, speaker = rec["mic_monitor"], rec["speaker_monitor"]
    if np.max(np.abs(speaker), initial=0.0) < 1e-3:
        raise UserError("loopback: nothing came back on speaker.monitor (is `rtsvc live` passing audio?)")
    # put the speaker recording on the mic recording's timeline: index + (its start - mic's start)
    shift = int(round((float(rec["speaker_monitor_start"]) - float(rec["mic_monitor_start"])) * SAMPLE_RATE))
    if shift >= 0:
        speaker = np.concatenate((np.zeros(shift, np.float32), speaker))
    else:
        speaker = speaker[-shift:]
    return pair_delays(mic, speaker, seconds)


def pair_delays(mic: np.ndarray, speaker: np.ndarray, seconds: float) -> np.ndarray:
    """Each burst's delay in seconds from `mic` to `speaker`, two recordings on one timeline of a
    `seconds` burst train played into the mic."""
    # where the burst train starts in the mic recording, so burst_delays finds every onset
    train = burst_train(seconds)
    lead = int(round(delay_of(train, mic, max_delay_s=5.0) * SAMPLE_RATE))
    n = min(train.shape[0], mic.shape[0] - lead, speaker.shape[0] - lead)
    mic, speaker = mic[lead:lead + n], speaker[lead:lead + n]
    return burst_delays(mic, speaker, delay_of(mic, speaker))


def measure_loopback(live_args: list[str], seconds: float = 6.0, startup_timeout: float = 600.0) -> dict:
    """End-to-end latency of `rtsvc live LIVE_ARGS` between two PulseAudio null sinks: per-burst delays
    (ms) from "mic.monitor" to "speaker.monitor" on the server's clock (`monitor_delays`), and live's
    summary line."""
    with PulseServer() as server, tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "live.log"
        live = start_live(server, ["--duration", str(seconds + 30), *live_args], log)
        try:
            wait_for_start(live, log, startup_timeout)
            time.sleep(1.0)  # let the streams settle
            try:
                live_ms = monitor_delays(server, seconds, Path(tmp)) * 1000
            except UserError as err:  # say what live said
                said = log.read_text(errors="replace")[-600:]
                raise UserError(f"{err}; live's last lines: {said}") from None
        finally:
            stop_live(live)
        text = log.read_text(errors="replace")
    if not live_ms.size:
        raise UserError(f"loopback: no burst came back through `rtsvc live`; its last lines: {text[-600:]}")
    summary = next((line.strip() for line in text.splitlines() if line.startswith("stopped after")), "")
    started = next((line.strip() for line in text.splitlines() if line.startswith("live:")), "")
    return {"live_ms": float(np.mean(live_ms)), "live_p95_ms": float(np.percentile(live_ms, 95)),
            "bursts": int(live_ms.size),
            "live_summary": summary, "live_start": started, "split": summary_split(summary),
            "log_tail": text[-2000:]}


SPLIT_PATTERNS = {
    "underruns": r"underruns (\d+)", "overruns": r"overruns (\d+)", "trims": r"trims (\d+)",
    "block_ms": r"of ([\d.]+) ms, compute", "compute_ms": r"compute ([\d.]+) ms/block",
    "compute_p99_ms": r"\(p99 ([\d.]+)\)", "e2e_estimate_ms": r"e2e estimate (\d+) ms",
    "algorithmic_ms": r"algorithmic (\d+)", "buffer_ms": r"\+ buffer (\d+)", "device_ms": r"\+ device (\d+)",
}


def summary_split(summary: str) -> dict:
    """The numbers in live's summary line (`rtsvc.live.live_summary`) by name; missing ones are absent."""
    import re

    found = {}
    for name, pattern in SPLIT_PATTERNS.items():
        match = re.search(pattern, summary)
        if match:
            found[name] = float(match.group(1))
    return found


LOOPBACK_COLUMNS = ("voice / options", "e2e mean", "e2e p95", "under", "over", "block", "algo", "compute",
                    "buffer", "device", "bursts")


def loopback_row(label: str, res: dict) -> tuple[str, ...]:
    sp = res["split"]

    def ms(name: str) -> str:
        return f"{sp[name]:.0f}" if name in sp else "?"

    return (label, f"{res['live_ms']:.0f}", f"{res['live_p95_ms']:.0f}", ms("underruns"), ms("overruns"),
            f"{sp['block_ms']:.1f}" if "block_ms" in sp else "?", ms("algorithmic_ms"),
            f"{ms('compute_ms')} (p99 {ms('compute_p99_ms')})", ms("buffer_ms"), ms("device_ms"),
            str(res["bursts"]))


def loopback_args(config: StreamConfig, model_args: list[str] = ()) -> list[str]:
    """`rtsvc live` options for one loopback row: the block (auto allowed) and lengths of `config`
    (None: the voice's own)."""
    block = "auto" if config.block_ms is None else f"{config.block_ms:g}"
    lengths = (("--crossfade-ms", config.crossfade_ms), ("--sola-search-ms", config.sola_search_ms))
    given = [arg for flag, value in lengths if value is not None for arg in (flag, f"{value:g}")]
    return ["--block-ms", block, "--context-ms", f"{config.context_ms:g}", *given, "--gate", "-70",
            *model_args]


def loopback_report(config: StreamConfig, live_args: list[str] = (), seconds: float = 6.0) -> tuple[str, ...]:
    """`rtsvc bench --loopback`: one row (see LOOPBACK_COLUMNS) for `rtsvc live` at `config` with
    `live_args` (e.g. --model, --audio-api)."""
    res = measure_loopback(loopback_args(config, list(live_args)), seconds=seconds)
    label = " ".join(live_args) or "DSP voice"
    return loopback_row(label, res)


def start_live(server: PulseServer, args: list[str], log: Path) -> subprocess.Popen:
    """`rtsvc live --input pulse --output pulse ARGS` reading mic.monitor and playing into "speaker"."""
    exe = shutil.which("rtsvc")
    cmd = [exe] if exe else [sys.executable, "-m", "rtsvc.commands.cli"]
    with open(log, "w") as stream:  # a file, not a pipe: a pipe nobody drains can block the child
        return subprocess.Popen([*cmd, "live", "--input", "pulse", "--output", "pulse", *args],
                                env=server.client_env(sink="speaker", source="mic.monitor"),
                                stdin=subprocess.DEVNULL, stdout=stream, stderr=subprocess.STDOUT,
                                cwd=str(Path(__file__).resolve().parent.parent))


def stop_live(process: subprocess.Popen) -> None:
    """A clean Ctrl-C (live prints its counters), killed if it has not stopped within 30 s."""
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


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


def loopback_rows(dsp_configs: list, model_configs: list, model: Path | None, pretrained_dir: Path,
                  f0: str | None, providers: str | None, live_options: str, seconds: float, say) -> list:
    """`rtsvc bench --loopback`: one row per `rtsvc live` run through the rig, the DSP voice at each
    of `dsp_configs`, then `model` (when given) at each of `model_configs` as given (auto: live
    measures it); `live_options` are more `rtsvc live` options for every row."""
    import shlex

    extra = shlex.split(live_options)
    runs = [(c, extra) for c in dsp_configs]
    if model is not None:
        model_args = ["--model", str(model), "--pretrained-dir", str(pretrained_dir)]
        model_args += ["--f0", f0] if f0 else []
        model_args += ["--providers", providers] if providers else []
        runs += [(c, model_args + extra) for c in model_configs]
    rows = []
    for config, args in runs:
        block = "auto" if config.block_ms is None else f"{config.block_ms:g} ms"
        say(f"loopback: PulseAudio and `rtsvc live {' '.join(args)}` (block {block})")
        rows.append(loopback_report(config, args, seconds=seconds))
    return rows
