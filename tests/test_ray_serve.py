"""`rtsvc serve --ray auto --replicas 2` for real: a private local Ray instance (loopback, no
dashboard, usage stats off) started by the command under test, two replicas of a tiny student model
with batching on, clients through the Serve proxy. Conversion equals the plain server's; killing one
replica mid-stream closes only its clients (1012, or 1006 if the proxy lost them first) while the
other replica's clients finish; a new client is served; SIGTERM stops everything it started.
"""

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]
if importlib.util.find_spec("ray") is None or importlib.util.find_spec("fastapi") is None:
    pytest.skip("Ray Serve is not installed (pip install 'rtsvc[ray]')", allow_module_level=True)

from websockets.asyncio.client import connect  # noqa: E402
from websockets.exceptions import ConnectionClosed  # noqa: E402

from rtsvc.dsp.signals import sung_tone  # noqa: E402
from rtsvc.engine import StreamConfig  # noqa: E402
from rtsvc.serve.server import ServerConfig, StreamServer, model_source  # noqa: E402
from rtsvc.settings import Knobs  # noqa: E402
from rtsvc.voices.spec import VoiceSpec, open_voice, sampling_steps  # noqa: E402
from tests.tiny_models import make_tiny_dit_checkpoint  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SR = 44100
START_S = 240.0  # Ray start + two replicas loading the model, on a busy 2-core machine
CLIENTS = [{"pitch_shift": 0, "speaker": "alice"}, {"pitch_shift": 5, "speaker": "bob"},
           {"pitch_shift": -3, "speaker": "alice"}, {"pitch_shift": 7, "speaker": "bob"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> set[int]:
    rows = [line.split() for line in subprocess.run(["ps", "-eo", "pid,ppid"], capture_output=True,
                                                    text=True).stdout.splitlines()[1:]]
    found, grew = {pid}, True
    while grew:
        kids = {int(p) for p, pp in rows if int(pp) in found} - found
        grew = bool(kids)
        found |= kids
    return found - {pid}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]


def healthz(port: int) -> dict:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def model(tmp_path_factory, tiny_pretrained):
    """A tiny one-evaluation student: each replica must run its own count (2 grid points), not the
    teacher default of 4, as the plain server does."""
    root = tmp_path_factory.mktemp("ray_model")
    return (make_tiny_dit_checkpoint(root / "tiny-student.ckpt", student_nfe=1),
            tiny_pretrained)


@pytest.fixture(scope="module")
def ray_server(model):
    ckpt, pretrained = model
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "rtsvc.commands.cli",
           "serve", "--ray", "auto", "--replicas", "2", "--port", str(port),
           "--model", str(ckpt), "--pretrained-dir", str(pretrained), "--device", "cpu", "--max-batch", "4"]
    log = open(ckpt.parent / "serve.log", "w+")  # noqa: SIM115 - read back at the end
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + START_S
    while "rtsvc serving on Ray Serve" not in (text := Path(log.name).read_text()):
        assert proc.poll() is None, text[-3000:]
        assert time.monotonic() < deadline, "no replicas running in time:\n" + text[-3000:]
        time.sleep(0.5)
    try:
        yield port, proc
    finally:
        children = descendants(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(90)
            except subprocess.TimeoutExpired:
                for pid in children | {proc.pid}:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                raise
        print(Path(log.name).read_text()[-1500:])
        log.close()
        assert proc.returncode == 0
        left = [pid for pid in children if alive(pid)]
        assert not left, f"Ray processes left after SIGTERM: {left}"


async def client(port: int, i: int, audio: np.ndarray, pace_s: float = 0.0, started=None) -> dict:
    """Stream `audio` in engine blocks (f32le, 44.1 kHz) and flush; the outcome either way."""
    block = 6656
    result = {"parts": [], "close": None, "replica": None}
    try:
        async with connect(f"ws://127.0.0.1:{port}/v1/stream", max_size=None, open_timeout=30) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": SR, "format": "f32le", **CLIENTS[i]}))
            ready = json.loads(await asyncio.wait_for(ws.recv(), 60))
            assert ready["type"] == "ready", ready
            result["replica"] = ready.get("replica")  # only under Ray
            if started is not None:  # an asyncio.Event, told which replica took the stream
                started.replica = result["replica"]
                started.set()
            for begin in range(0, len(audio), block):
                await ws.send(audio[begin:begin + block].astype("<f4").tobytes())
                result["parts"].append(np.frombuffer(await asyncio.wait_for(ws.recv(), 60), "<f4"))
                await asyncio.sleep(pace_s)
            await ws.send(json.dumps({"type": "flush"}))
            result["parts"].append(np.frombuffer(await asyncio.wait_for(ws.recv(), 60), "<f4"))
            result["flushed"] = json.loads(await asyncio.wait_for(ws.recv(), 60))
    except ConnectionClosed as err:
        result["close"] = err.rcvd.code if err.rcvd is not None else 1006
    result["out"] = np.concatenate(result["parts"]) if result["parts"] else np.zeros(0, np.float32)
    return result


def plain_server_outputs(model, audios) -> list[np.ndarray]:
    """The same clients through the one-process server (what `rtsvc serve` without --ray runs)."""
    ckpt, pretrained = model
    voice = open_voice(VoiceSpec(model=ckpt, pretrained_dir=pretrained, device="cpu", streaming=True))

    async def main():
        server = StreamServer(ServerConfig(port=0), model_source(voice, ckpt.name),
                              sampling_steps(Knobs(), voice, None), StreamConfig().for_voice(voice))
        await server.start()
        try:
            return await asyncio.gather(*[client(server.port, i, a) for i, a in enumerate(audios)])
        finally:
            await server.close()

    return [r["out"] for r in asyncio.run(main())]


def test_ray_front_end_applies_the_plain_servers_admission_rules(ray_server):
    """Host, Origin, duplicate Host: the same answers as the plain server (one check for both)."""
    from tests.test_server_safety import check_admission

    port, _ = ray_server
    results = check_admission(port)
    # without the ASGI denial extension a refused handshake can only be a 403
    wrong = {name: got for name, got in results.items()
             if got[0] != got[1] and not (name == "duplicate_host_handshake" and got[0] == 403)}
    assert not wrong, wrong


def test_two_replicas_convert_like_the_plain_server_and_survive_a_replica_kill(ray_server, model):
    port, proc = ray_server
    audios = [sung_tone(0.8, SR, f0=140.0 + 40 * i, seed=i) for i in range(len(CLIENTS))]

    async def together():
        return await asyncio.gather(*[client(port, i, a) for i, a in enumerate(audios)])

    first = asyncio.run(together())
    reference = plain_server_outputs(model, audios)
    for result, ref in zip(first, reference, strict=True):
        assert result["close"] is None and result["flushed"]["samples_out"] == len(ref) == len(result["out"])
        assert np.abs(ref).max() > 1e-3
        np.testing.assert_allclose(result["out"], ref, atol=1e-4)
    replicas = {r["replica"] for r in first}
    assert len(replicas) == 2, replicas  # connections were spread over both replicas

    # which pid serves which replica (GETs are spread over replicas too)
    pids, deadline = {}, time.monotonic() + 30
    while len(pids) < 2 and time.monotonic() < deadline:
        h = healthz(port)
        pids[h["replica"]] = h["pid"]
    assert set(pids) == replicas
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/info", timeout=10) as response:  # the page's
        assert json.loads(response.read())["speakers"] == ["alice", "bob"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=10) as response:
        assert b"<html" in response.read().lower()

    async def main():
        long_audio = sung_tone(3.0, SR, f0=200.0)
        for _ in range(3):  # Serve may route every stream of a round to one replica: then start again
            started = [asyncio.Event() for _ in CLIENTS]
            tasks = [asyncio.create_task(client(port, i, long_audio, pace_s=0.05, started=started[i]))
                     for i in range(len(CLIENTS))]
            for event in started:
                await asyncio.wait_for(event.wait(), 60)
            if len({event.replica for event in started}) == 2:  # set by `client` when ready
                break
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(0.5)  # every client is mid-stream now: kill one replica's process
        victim = sorted(pids)[0]
        os.kill(pids[victim], signal.SIGKILL)
        return await asyncio.wait_for(asyncio.gather(*tasks), 180), victim

    results, victim = asyncio.run(main())
    victims = [r for r in results if r["replica"] == victim]
    survivors = [r for r in results if r["replica"] != victim]
    assert victims and survivors, [r["replica"] for r in results]
    for r in victims:  # closed with a code that tells the client to reconnect
        assert r["close"] in (1012, 1006), r["close"]
    for r in survivors:  # the other replica's clients never noticed
        assert r["close"] is None and r["flushed"]["samples_in"] == r["flushed"]["samples_out"]
        assert r["flushed"]["samples_in"] == len(sung_tone(3.0, SR))
    # a reconnecting client is served (by the survivor or the replacement Serve starts)
    again = asyncio.run(client(port, 0, audios[0]))
    assert again["close"] is None and len(again["out"]) == len(audios[0])
    assert proc.poll() is None
