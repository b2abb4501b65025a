"""The loopback rig's device floor: a plain pass-through client between the null sinks, measured as
the first `rtsvc bench --loopback` rig measured `rtsvc live` (rig delay subtracted), and with the
two-monitor clock that replaced it.

What it answers: how much of live's end-to-end figure the sound-server path alone costs at given
PulseAudio buffer sizes, against what the server reports for the two streams (`pa_simple_get_latency`,
the "device" part of live's split). A reader thread records `mic.monitor` in `--block-ms` fragments
into a queue of at most two blocks; the main loop plays them into `speaker` (silence when the queue is
empty), so no voice, block or FIFO is involved.

    python -m benchmarks.rig_floor --seconds 8 --settings 5:10 10:20 23.2:40
(each setting: device block ms : playback buffer (tlength) ms; the record fragment is the block)
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from rtsvc.bench.loopback import PulseServer, burst_delays, burst_train, delay_of, monitor_delays
from rtsvc.dsp.audio import SAMPLE_RATE
from rtsvc.errors import UserError

PASS_THROUGH = r'''
import collections, sys, threading, time
import numpy as np, pasimple
block_ms, tlength_ms, seconds, delay_ms = map(float, sys.argv[1:5])
rate, frame = 44100, 4
block, tlength = int(rate * block_ms / 1000), int(rate * tlength_ms / 1000)
rec = pasimple.PaSimple(pasimple.PA_STREAM_RECORD, pasimple.PA_SAMPLE_FLOAT32LE, 1, rate, app_name="floor",
                        stream_name="in", fragsize=block * frame, maxlength=int(rate * 0.2) * frame)
play = pasimple.PaSimple(pasimple.PA_STREAM_PLAYBACK, pasimple.PA_SAMPLE_FLOAT32LE, 1, rate, app_name="floor",
                         stream_name="out", tlength=tlength * frame, minreq=block * frame,
                         prebuf=min(tlength, 2 * block) * frame)
delay_blocks = int(round(delay_ms / block_ms))  # a known delay line: this many blocks of silence first
queue, lock = collections.deque([bytes(block * frame)] * delay_blocks), threading.Lock()
def read():
    while True:
        data = rec.read(block * frame)
        with lock:
            queue.append(data)
            while len(queue) > delay_blocks + 2:
                queue.popleft()
threading.Thread(target=read, daemon=True).start()
print("started", flush=True)
silence, reported, held, end = bytes(block * frame), [], [], time.time() + seconds
while time.time() < end:
    with lock:  # the line's real length when each block is taken (a starved pop shortens it)
        held.append((time.time(), len(queue) * block_ms))
        data = queue.popleft() if queue else silence
    play.write(data)
    reported.append((rec.get_latency() / 1000, play.get_latency() / 1000))
print(" ".join(f"{v:.1f}" for v in np.mean(reported, axis=0)), flush=True)
print(" ".join(f"{t:.3f}:{ms:g}" for t, ms in held), flush=True)
'''


def playrec_main(argv: list[str] | None = None) -> None:
    """Child process of the first (PortAudio) rig: `python -c ... OUT.npy SECONDS` plays bursts,
    records, saves.

    A separate process because PortAudio reads PULSE_SINK / PULSE_SOURCE when it starts.
    """
    import sounddevice as sd

    out_path, seconds = (argv or sys.argv[1:])[:2]
    played = burst_train(float(seconds))
    recorded = sd.playrec(played, samplerate=SAMPLE_RATE, channels=1, device="pulse", blocking=True)
    np.save(out_path, np.stack((played, recorded[:, 0])))


def rig_delays(server: PulseServer, source: str, seconds: float, workdir: Path,
               attempts: int = 3) -> np.ndarray:
    """Play bursts into "mic" while recording `source`; each burst's delay in seconds (retried: a
    PulseAudio stream sometimes starts late on a busy machine and hears nothing)."""
    out = workdir / f"rig-{source}.npy"
    code = "import sys; from benchmarks.rig_floor import playrec_main; playrec_main(sys.argv[1:])"
    for _ in range(attempts):
        subprocess.run([sys.executable, "-c", code, str(out), str(seconds)], check=True,
                       timeout=seconds + 30, env=server.client_env(sink="mic", source=source),
                       capture_output=True, cwd=Path(__file__).resolve().parents[1])  # finds `benchmarks`
        played, recorded = np.load(out)
        if np.max(np.abs(recorded)) >= 1e-3:
            delays = burst_delays(played, recorded, delay_of(played, recorded))
            if delays.size:
                return delays
    raise UserError(f"loopback: nothing came back on {source} (is `rtsvc live` passing audio?)")


def floor_row(block_ms: float, tlength_ms: float, seconds: float, delay_ms: float = 0.0) -> dict:
    """One pass-through run (with a `delay_ms` delay line, rounded to blocks): the rig's own delay, the
    pass-through's delay over it (mean, p95), the two-monitor clock's figure, the record /
    playback latencies the server reported, and the audio the client's queue held on average while
    the clock measured (ms)."""
    with PulseServer() as server, tempfile.TemporaryDirectory() as tmp:
        rig = rig_delays(server, "mic.monitor", 6.0, Path(tmp)) * 1000
        env = server.client_env(sink="speaker", source="mic.monitor")
        client = subprocess.Popen([sys.executable, "-c", PASS_THROUGH, str(block_ms), str(tlength_ms),
                                   str(2 * seconds + 20), str(delay_ms)], env=env, stdout=subprocess.PIPE,
                                  text=True)
        try:
            client.stdout.readline()
            time.sleep(1.0)
            total = rig_delays(server, "speaker.monitor", seconds, Path(tmp)) * 1000
            clock_from = time.time()
            clock = monitor_delays(server, seconds, Path(tmp)) * 1000
            clock_to = time.time()
            reported_in, reported_out = map(float, client.stdout.readline().split())
            held = [tuple(map(float, pair.split(":"))) for pair in client.stdout.readline().split()]
        finally:
            client.kill()
            client.wait()
    over = total - rig.mean()
    return {"block_ms": block_ms, "tlength_ms": tlength_ms, "rig_ms": float(rig.mean()),
            "floor_ms": float(over.mean()), "floor_p95_ms": float(np.percentile(over, 95)),
            "clock_ms": float(clock.mean()), "clock_p95_ms": float(np.percentile(clock, 95)),
            "reported_in_ms": reported_in, "reported_out_ms": reported_out,
            "held_ms": float(np.mean([ms for t, ms in held if clock_from <= t <= clock_to]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seconds", type=float, default=8.0, help="seconds of bursts per setting (default 8)")
    p.add_argument("--settings", nargs="+", default=["5:10", "5:20", "10:20", "10:40", "23.2:40"],
                   help="BLOCK_MS:TLENGTH_MS pairs (default 5:10 5:20 10:20 10:40 23.2:40)")
    a = p.parse_args()
    print("| block ms | tlength ms | rig alone ms | pass-through over the rig, mean (p95) ms | "
          "two-monitor clock, mean (p95) ms | server-reported record + playback ms |")
    print("|---|---|---|---|---|---|")
    for setting in a.settings:
        block_ms, tlength_ms = map(float, setting.split(":"))
        r = floor_row(block_ms, tlength_ms, a.seconds)
        print(f"| {block_ms:g} | {tlength_ms:g} | {r['rig_ms']:.0f} | {r['floor_ms']:.0f} "
              f"({r['floor_p95_ms']:.0f}) | {r['clock_ms']:.0f} ({r['clock_p95_ms']:.0f}) | "
              f"{r['reported_in_ms']:.0f} + {r['reported_out_ms']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
