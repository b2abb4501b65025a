"""`rtsvc live` end to end through a private PipeWire server, each way of reaching it: PortAudio's
JACK host API on PipeWire's JACK (at several graph quanta), PortAudio's ALSA `pulse` device and the
native pulse client (both through pipewire-pulse). Rows alternate, round after round, so a shared
machine's noise falls on every variant alike.

The clock is one JACK client: it plays the burst train into "mic" and records "mic"'s monitor and
"speaker"'s monitor in the same process callback, so the two recordings share one sample clock and
a burst's offset between them is what live added, with no timestamps to trust. (The PulseAudio rig's
two-monitor clock stamps fragments with pa_simple latencies, which pipewire-pulse reports too
loosely: it gave means below live's own algorithmic + buffer parts.)

Needs Debian's pipewire, pipewire-pulse, pipewire-jack, wireplumber and dbus, and JACK-Client
(`pip install JACK-Client`):

    python -m benchmarks.pipewire_rig --seconds 60 --rounds 2 --block-ms 23.2
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rtsvc.bench.loopback import burst_train, pair_delays, stop_live, summary_split, wait_for_start
from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.errors import UserError

JACK_LIBS = "/usr/lib/x86_64-linux-gnu/pipewire-0.3/jack"  # pw-jack's libjack (Debian's pipewire-jack)
CLOCK_QUANTUM = "1024/44100"  # the clock asks for the largest quantum: live's request sets the graph's
MIC, SPEAKER = "mic Audio/Sink sink", "speaker Audio/Sink sink"  # the null sinks as JACK clients


class PipeWireServer:
    """dbus + pipewire + wireplumber + pipewire-pulse in a private runtime dir, null sinks "mic" and
    "speaker" at 44.1 kHz (the graph forced to that rate: PortAudio's JACK streams run at it)."""

    def __init__(self):
        missing = [tool for tool in ("pipewire", "wireplumber", "pipewire-pulse", "dbus-daemon", "pactl")
                   if shutil.which(tool) is None]
        if missing or not Path(JACK_LIBS).is_dir():
            raise UserError(f"needs {', '.join(missing) or 'pipewire-jack'} (apt-get install pipewire "
                            "pipewire-pulse pipewire-jack wireplumber dbus)")
        self.runtime_dir = tempfile.mkdtemp(prefix="rtsvc-pipewire-")
        os.chmod(self.runtime_dir, 0o700)
        bus = f"unix:path={self.runtime_dir}/bus"
        self.env = dict(os.environ, XDG_RUNTIME_DIR=self.runtime_dir, DBUS_SESSION_BUS_ADDRESS=bus)
        for name in ("PULSE_SERVER", "PULSE_SINK", "PULSE_SOURCE", "PIPEWIRE_REMOTE", "PIPEWIRE_QUANTUM"):
            self.env.pop(name, None)
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> "PipeWireServer":
        try:
            bus = f"--address={self.env['DBUS_SESSION_BUS_ADDRESS']}"
            for args in (["dbus-daemon", "--session", "--nofork", bus], ["pipewire"], ["wireplumber"],
                         ["pipewire-pulse"]):
                self.processes.append(subprocess.Popen(args, env=self.env, stdout=subprocess.DEVNULL,
                                                       stderr=subprocess.DEVNULL))
                time.sleep(0.5)
            self._wait(["pactl", "info"], "pipewire-pulse")
            for name in ("mic", "speaker"):
                self.run("pactl", "load-module", "module-null-sink", f"sink_name={name}",
                         f"rate={SAMPLE_RATE}", "channels=1")
            self.run("pw-metadata", "-n", "settings", "0", "clock.force-rate", str(SAMPLE_RATE))
            self._wait(["pw-link", "-o"], "the null sinks' ports", want="speaker")
        except BaseException:
            self.__exit__()
            raise
        return self

    def run(self, *args: str) -> str:
        return subprocess.run(args, env=self.env, capture_output=True, text=True, check=True).stdout

    def _wait(self, args: list[str], what: str, want: str = "") -> None:
        deadline = time.monotonic() + 15.0
        while time.monotonic() < deadline:
            done = subprocess.run(args, env=self.env, capture_output=True, text=True)
            if done.returncode == 0 and want in done.stdout:
                return
            time.sleep(0.2)
        raise UserError(f"{what} did not come up within 15 s")

    def jack_env(self, quantum: str) -> dict:
        return dict(self.env, LD_LIBRARY_PATH=JACK_LIBS, PIPEWIRE_QUANTUM=quantum)

    def __exit__(self, *exc) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
        self.processes = []
        shutil.rmtree(self.runtime_dir, ignore_errors=True)


def clock_main(out_path: str, seconds: float) -> None:
    """The JACK clock (a child process started with pw-jack's libjack): plays the bursts into mic,
    records both monitors in one callback, saves them to OUT_PATH."""
    import jack

    played = burst_train(seconds).astype(np.float32)
    total = played.shape[0] + SAMPLE_RATE * 2  # 2 s more for the last bursts' way through live
    mic, speaker = np.zeros(total, np.float32), np.zeros(total, np.float32)
    at = [0]
    client = jack.Client("rtsvc-clock")
    out = client.outports.register("bursts")
    ins = client.inports.register("mic"), client.inports.register("speaker")

    @client.set_process_callback
    def process(frames: int) -> None:
        i = at[0]
        n = max(0, min(frames, total - i))
        chunk = np.zeros(frames, np.float32)
        play = max(0, min(frames, played.shape[0] - i))
        chunk[:play] = played[i:i + play]
        out.get_array()[:] = chunk
        mic[i:i + n] = ins[0].get_array()[:n]
        speaker[i:i + n] = ins[1].get_array()[:n]
        at[0] = i + frames

    with client:
        client.connect(out, f"{MIC}:playback_MONO")
        client.connect(f"{MIC}:monitor_MONO", ins[0])
        client.connect(f"{SPEAKER}:monitor_MONO", ins[1])
        while at[0] < total:
            time.sleep(0.05)
    np.savez(out_path, mic=mic, speaker=speaker)


PULSE_NAMES = ["--input", "mic.monitor", "--output", "speaker"]
VARIANTS = {  # name: (live's device options, the JACK quantum it runs at, or None: not a JACK client)
    "portaudio JACK, quantum 256": (["--input", MIC, "--output", SPEAKER], "256/44100"),
    "portaudio JACK, quantum 128": (["--input", MIC, "--output", SPEAKER], "128/44100"),
    "portaudio ALSA pulse plugin": ([*PULSE_NAMES, "--audio-api", "portaudio"], None),
    "native pulse (pasimple)": ([*PULSE_NAMES, "--audio-api", "pulse"], None),
}


def measure(server: PipeWireServer, variant: str, seconds: float, live_args: list[str]) -> dict:
    devices, quantum = VARIANTS[variant]
    env = server.jack_env(quantum) if quantum else server.env
    with tempfile.TemporaryDirectory() as tmp:
        log, rec = Path(tmp) / "live.log", Path(tmp) / "clock.npz"
        with open(log, "w") as stream:
            live = subprocess.Popen([sys.executable, "-m", "rtsvc.commands.cli", "live", "--duration",
                                     str(seconds + 30), *devices, *live_args], env=env, stdout=stream,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        try:
            wait_for_start(live, log, 120)
            time.sleep(1.0)
            code = ("import sys; from benchmarks.pipewire_rig import clock_main; "
                    "clock_main(sys.argv[1], float(sys.argv[2]))")
            subprocess.run([sys.executable, "-c", code, str(rec), str(seconds)], check=True,
                           timeout=seconds + 60, env=server.jack_env(CLOCK_QUANTUM), capture_output=True)
        finally:
            stop_live(live)
        text = log.read_text(errors="replace")
        data = np.load(rec)
        delays = pair_delays(data["mic"], data["speaker"], seconds) * 1000
    summary = next((line for line in text.splitlines() if line.startswith("stopped after")), "")
    if not delays.size:
        raise UserError(f"{variant}: no burst came back; live said: {text[-600:]}")
    return {"mean": float(delays.mean()), "p95": float(np.percentile(delays, 95)), "bursts": int(delays.size),
            "split": summary_split(summary), "summary": summary}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="burst train per row (s), default 60")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of all variants, alternated; default 1")
    parser.add_argument("--block-ms", default="23.2", help="live's --block-ms, default 23.2")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), help="which rows (names as listed)")
    parser.add_argument("--live", default="", help="more `rtsvc live` options for every row")
    args = parser.parse_args(argv)
    live_args = ["--block-ms", args.block_ms, *args.live.split()]
    print("| way to the server | e2e mean ms | p95 | underruns | compute ms | buffer (live's estimate) "
          "| bursts |")
    print("|---|---|---|---|---|---|---|")
    with PipeWireServer() as server:
        for _ in range(args.rounds):
            for variant in args.variants:
                row = measure(server, variant, args.seconds, live_args)
                part = {name: row["split"].get(name, float("nan"))
                        for name in ("underruns", "compute_ms", "buffer_ms")}
                print(f"| {variant} | {row['mean']:.1f} | {row['p95']:.1f} | {part['underruns']:.0f} | "
                      f"{part['compute_ms']:.1f} | {part['buffer_ms']:.0f} | {row['bursts']} |", flush=True)


if __name__ == "__main__":
    main()
