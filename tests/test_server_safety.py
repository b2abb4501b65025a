"""`rtsvc serve` against the attacks of issue 20's server section, over loopback only: one admission
check for both front ends, huge frames, clients that never read, half-open requests, settings the
voice cannot honour, and one log line per client. Every test bounds its sockets and its time.
"""

import asyncio
import contextlib
import importlib.util
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtsvc.serve.server import VoiceSource, dsp_source
from tests.test_server import (
    START,
    IdentityVoice,
    expect_error,
    identity_source,
    quick_round_trip,
    run,
    running,
    settled,
    to_bytes,
    tone,
    url,
)

ROOT = Path(__file__).parents[1]
UPGRADE = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
           "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]


# --- one admission check, two front ends ------------------------------------------------------------

def raw_status(port: int, method: str, path: str, headers: list[str]) -> int:
    request = "\r\n".join([f"{method} {path} HTTP/1.1", *headers]) + "\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port), timeout=20) as sock:
        sock.sendall(request.encode())
        data = b""
        while b"\r\n" not in data and (chunk := sock.recv(4096)):
            data += chunk
    return int(data.split()[1])


def admission_cases(port: int) -> dict[str, tuple[str, str, list[str], int]]:
    """name -> (method, path, headers, the status a server without --token must answer)."""
    good, evil = f"Host: 127.0.0.1:{port}", f"Host: evil.example:{port}"
    return {
        "healthz": ("GET", "/healthz", [good], 200),
        "healthz_foreign_host": ("GET", "/healthz", [evil], 403),
        "info_foreign_host": ("GET", "/v1/info", [evil], 403),
        "page_foreign_host": ("GET", "/", [evil], 403),
        "no_host": ("GET", "/healthz", [], 403),
        "duplicate_host": ("GET", "/healthz", [good, good], 400),
        "duplicate_host_handshake": ("GET", "/v1/stream", [good, good, *UPGRADE], 400),
        "handshake": ("GET", "/v1/stream", [good, f"Origin: http://127.0.0.1:{port}", *UPGRADE], 101),
        "handshake_foreign_host": ("GET", "/v1/stream", [evil, f"Origin: http://evil.example:{port}",
                                                         *UPGRADE], 403),
        "handshake_foreign_origin": ("GET", "/v1/stream", [good, "Origin: http://evil.example", *UPGRADE],
                                     403),
    }


def check_admission(port: int) -> dict[str, tuple[int, int]]:
    """name -> (status answered, status wanted), for every case."""
    return {name: (raw_status(port, method, path, headers), wanted)
            for name, (method, path, headers, wanted) in admission_cases(port).items()}


def wrong(results: dict[str, tuple[int, int]]) -> dict:
    return {name: got for name, got in results.items() if got[0] != got[1]}


def test_plain_server_applies_the_admission_rules():
    async def main():
        async with running(dsp_source()) as server:
            return await asyncio.to_thread(check_admission, server.port)

    assert not wrong(run(main()))


def test_the_ray_front_end_runs_the_same_admission_check_without_ray():
    """`AccessCheck` (the replica app's middleware) asked directly as ASGI: same answers."""
    pytest.importorskip("starlette")
    from rtsvc.serve.access import AccessRules
    from rtsvc.serve.ray_serve import AccessCheck

    async def app(scope, receive, send):  # what the replica would run: accept / 200
        if scope["type"] == "websocket":
            await send({"type": "websocket.accept"})
        else:
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"{}"})

    async def ask(method, path, headers, websocket):
        sent = []

        async def send(message):
            sent.append(message)

        async def receive():
            return {"type": "websocket.connect"} if websocket else {"type": "http.request", "body": b""}

        plain = [h for h in headers if not h.startswith(("Upgrade", "Connection", "Sec-"))]
        raw = [tuple(h.split(": ", 1)) for h in plain]
        scope = {"type": "websocket" if websocket else "http", "method": method, "path": path.split("?")[0],
                 "query_string": b"", "headers": [(k.lower().encode(), v.encode()) for k, v in raw]}
        await AccessCheck(app, AccessRules())(scope, receive, send)
        first = sent[0]
        if first["type"] == "websocket.accept":
            return 101
        return 403 if first["type"] == "websocket.close" else first["status"]

    async def main():
        out = {}
        for name, (method, path, headers, wanted) in admission_cases(8765).items():
            websocket = any(h.startswith("Upgrade") for h in headers)
            got = await ask(method, path, headers, websocket)
            out[name] = (got, 403 if websocket and wanted == 400 else wanted)  # no ASGI denial extension here
        return out

    assert not wrong(asyncio.run(main()))


# --- huge frames, shutdown, log lines (a real `rtsvc serve` process) ----------------------------------

@contextlib.contextmanager
def serve_process(*args: str, max_files: int | None = None):
    """`python -m cli serve --port 0 ARGS` (the DSP voice): yields (process, port, lines read so far)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONUNBUFFERED": "1"}

    def limit_files():
        if max_files is not None:
            hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
            resource.setrlimit(resource.RLIMIT_NOFILE, (max_files, hard))

    proc = subprocess.Popen([sys.executable, "-m", "rtsvc.commands.cli",
                             "serve", "--port", "0", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=limit_files)
    watchdog = threading.Timer(150, proc.kill)  # a hung server ends the test instead of CI
    watchdog.start()
    lines: list[str] = []
    try:
        line = proc.stdout.readline()
        while line and "rtsvc serving" not in line:
            lines.append(line)
            line = proc.stdout.readline()
        assert line, "the server exited before listening:\n" + "".join(lines)
        lines.append(line)
        reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
        reader.start()
        yield proc, int(line.split("http://127.0.0.1:")[1].split("/")[0]), lines
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
        proc.wait()


MIB_8K = to_bytes(tone(8000, 65.0, f0=150.0, level=0.3), "s16le")[: 1 << 20]  # 1 MiB: 65 s at 8 kHz


@pytest.mark.slow
def test_huge_8k_frames_neither_block_admission_nor_shutdown_and_clients_are_logged():
    # a fixed block: `auto` measures at start, and on a loaded machine picks blocks of a second
    with serve_process("--workers", "2", "--block-ms", "100") as (proc, port, lines):
        stream = f"ws://127.0.0.1:{port}/v1/stream"

        async def main():
            hostile = []
            for _ in range(2):  # each frame is 65 s of audio; sent as a file, so none of it is dropped
                ws = await connect(stream, max_size=None)
                await ws.send(json.dumps({**START, "sample_rate": 8000, "realtime": False}))
                assert json.loads(await ws.recv())["type"] == "ready"
                await ws.send(MIB_8K)
                await ws.send(MIB_8K)
                ws.transport.pause_reading()  # and reads nothing more, not even a close frame
                hostile.append(ws)
            await asyncio.sleep(1.0)  # both workers are converting now
            began = time.monotonic()
            try:
                async with connect(stream, open_timeout=10) as ws:
                    await ws.send(json.dumps(START))
                    reply = json.loads(await asyncio.wait_for(ws.recv(), 30))
            except (ConnectionClosed, TimeoutError) as err:
                reply = {"type": type(err).__name__}
            answered_s = time.monotonic() - began
            began = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            exit_code = await asyncio.to_thread(proc.wait, 60)
            exit_s = time.monotonic() - began
            for ws in hostile:
                ws.transport.abort()
            return reply, answered_s, exit_code, exit_s

        reply, answered_s, exit_code, exit_s = run(main(), timeout=120)
    print(f"new client answered in {answered_s:.2f} s ({reply['type']}); exit {exit_s:.2f} s after SIGTERM")
    assert reply["type"] == "ready" or reply.get("code") in ("too_many_clients", "overloaded"), reply
    assert answered_s < 2.0
    assert exit_code == 0 and exit_s < 2.0
    log = "".join(lines)
    assert log.count("client 127.0.0.1 connected: speaker dsp, 8000 Hz s16le (file)") == 2, log[-2000:]
    assert "client 127.0.0.1 connected: speaker dsp, 16000 Hz s16le" in log


class SlowVoice(IdentityVoice):
    """Half a block's duration per block, sleeping (no CPU)."""

    def convert(self, audio, knobs, start_sample=0, tail=None):
        time.sleep(0.5 * (tail or len(audio)) / self.sample_rate)
        return super().convert(audio, knobs, start_sample, tail)


def test_a_departed_clients_huge_frame_stops_converting_and_frees_its_worker():
    frame = to_bytes(tone(8000, 60.0), "s16le")  # 60 s at 8 kHz: 30 s of work for this voice

    async def main():
        async with running(VoiceSource("slow", ["echo"], SlowVoice), workers=1) as server:
            ws = await connect(url(server), max_size=None)
            await ws.send(json.dumps({**START, "sample_rate": 8000, "realtime": False}))
            await ws.recv()
            await ws.send(frame)
            await asyncio.sleep(0.5)  # converting now
            ws.transport.abort()  # gone without a word
            began = time.monotonic()
            await quick_round_trip(server)  # needs the only worker
            served_s = time.monotonic() - began
            await settled(server)
            return served_s, [h for h in server.state.history if h["sample_rate"] == 8000]

    served_s, (departed,) = run(main(), timeout=60)
    assert served_s < 3.0
    assert departed["samples_in"] < 8000 * 10  # stopped after a few pieces, not 60 s later


def test_live_pieces_of_a_huge_frame_that_fall_behind_are_answered_with_silence():
    """A live frame of 8 s through a voice that needs 1.5x real time: the pieces later than
    --max-lag-ms are silence, so the frame's answer comes in about real time, not 12 s."""

    class BehindVoice(IdentityVoice):
        def convert(self, audio, knobs, start_sample=0, tail=None):
            time.sleep(1.5 * (tail or len(audio)) / self.sample_rate)
            return super().convert(audio, knobs, start_sample, tail)

    async def main():
        async with running(VoiceSource("behind", ["echo"], BehindVoice), workers=1, max_lag_ms=300) as server:
            async with connect(url(server), max_size=None) as ws:
                await ws.send(json.dumps(START))  # 16 kHz, live
                await ws.recv()
                began = time.monotonic()
                await ws.send(to_bytes(tone(16000, 8.0), "s16le"))
                out = await asyncio.wait_for(ws.recv(), 30)
                took = time.monotonic() - began
                await ws.send(json.dumps({"type": "stats"}))
                stats = json.loads(await ws.recv())
            return took, len(out), stats

    took, size, stats = run(main(), timeout=60)
    assert took < 10.5 and stats["dropped_ms"] > 1000  # all converted: 12 s
    assert stats["samples_in"] == 8 * 16000 and size > 0


# --- slow readers ---------------------------------------------------------------------------------

def test_a_live_client_that_never_reads_is_dropped_after_the_send_timeout():
    """Paced in real time (not a flood), with a small receive buffer: what it leaves unread must be
    counted in the server's own layer, not hidden in a kernel send buffer grown to megabytes."""
    rate, frame_s = 48000, 0.1
    frame = to_bytes(tone(rate, frame_s), "s16le")

    async def main():
        async with running(identity_source(), send_timeout_s=1.0) as server:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
            sock.connect(("127.0.0.1", server.port))
            ws = await connect(url(server), sock=sock, max_size=None)
            await ws.send(json.dumps({**START, "sample_rate": rate}))
            await ws.recv()
            ws.transport.pause_reading()  # from now on this client reads nothing
            began = time.monotonic()
            i = 0
            while time.monotonic() - began < 15 and not server.state.history:
                await asyncio.sleep(max(0.0, began + i * frame_s - time.monotonic()))
                with contextlib.suppress(TimeoutError, ConnectionClosed):
                    await asyncio.wait_for(ws.send(frame), 0.2)
                i += 1
            dropped_after = time.monotonic() - began
            ws.transport.abort()
            await settled(server)
            return (server.state.history[-1] if server.state.history else None), dropped_after

    summary, dropped_after = run(main(), timeout=60)
    assert summary is not None and summary["error"] == "not_reading", summary
    print(f"dropped after {dropped_after:.1f} s")
    assert dropped_after < 6.0  # 1 s of send timeout after ~0.3 MB fill kernel buffers at 96 kB/s


# --- half-open requests ---------------------------------------------------------------------------

def half_open(port: int, count: int, source: str = "127.0.0.2") -> list[socket.socket]:
    """`count` connections from `source` that send part of a request and stop."""
    socks = []
    for _ in range(count):
        sock = socket.socket()
        sock.bind((source, 0))
        sock.settimeout(5)
        try:
            sock.connect(("127.0.0.1", port))
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: never complete
        except OSError:
            pass
        socks.append(sock)
    return socks


def closed_by_server(sock: socket.socket, wait: float) -> bool:
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except (TimeoutError, OSError):
        return False


def test_half_open_requests_are_limited_per_address_and_cut_by_the_handshake_timeout():
    async def main():
        async with running(dsp_source(), handshake_timeout_s=1.0, max_half_open_per_address=4) as server:
            socks = await asyncio.to_thread(half_open, server.port, 10)
            try:
                await asyncio.sleep(0.3)
                at_once = [await asyncio.to_thread(closed_by_server, s, 0.05) for s in socks]
                health = json.loads((await asyncio.to_thread(raw_get, server.port)).partition(b"\r\n\r\n")[2])
                began = time.monotonic()
                later = [await asyncio.to_thread(closed_by_server, s, 3.0) if not cut else True
                         for s, cut in zip(socks, at_once, strict=True)]
                return at_once, health, later, time.monotonic() - began
            finally:
                for s in socks:
                    s.close()

    at_once, health, later, waited = run(main(), timeout=60)
    assert sum(at_once) == 6  # past the 4 allowed from 127.0.0.2
    assert health["half_open"] == 4
    assert all(later) and waited < 2.0  # the other 4 end at the 1 s handshake timeout


def raw_get(port: int, path: str = "/healthz") -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return data


@pytest.mark.slow
def test_many_half_open_requests_cannot_exhaust_file_descriptors():
    """300 half-open requests against a process allowed 256 files: a normal client is still
    served at once (before: every descriptor was taken until the handshake timeout)."""
    with serve_process(max_files=256) as (proc, port, _):
        socks = half_open(port, 300)
        try:
            time.sleep(0.5)
            began = time.monotonic()
            answer = raw_get(port)
            served_s = time.monotonic() - began
        finally:
            for s in socks:
                s.close()
        assert proc.poll() is None
    assert answer.startswith(b"HTTP/1.1 200") and served_s < 1.0, (answer[:100], served_s)


# --- settings the voice cannot honour -------------------------------------------------------------

def hide_pyrnnoise(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a, **k: None if name.startswith("pyrnnoise") else real(name, *a, **k))


def test_rnnoise_without_pyrnnoise_is_a_bad_setting_and_is_not_offered(monkeypatch):
    hide_pyrnnoise(monkeypatch)

    async def main():
        async with running(dsp_source()) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps({**START, "denoise": "rnnoise"}))
                refused = await expect_error(ws, "bad_setting", 1003)
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                ready = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "set", "denoise": "rnnoise"}))
                answer = json.loads(await ws.recv())
                await ws.send(to_bytes(tone(16000, 0.3), "s16le"))
                audio = await ws.recv()
            info = (await asyncio.to_thread(raw_get, server.port, "/v1/info")).partition(b"\r\n\r\n")[2]
            info = json.loads(info)
            return refused, ready, answer, audio, info

    refused, ready, answer, audio, info = run(main())
    for error in (refused, answer):
        assert error["code"] == "bad_setting" and "pip install --no-deps pyrnnoise" in error["message"], error
    assert answer["fatal"] is False and isinstance(audio, bytes)  # the stream went on
    for supports in (ready["supports"], info["supports"]):
        assert supports["denoise"] == ["off", "deepfilternet"]
        assert "pyrnnoise" in supports["missing"]["denoise=rnnoise"]
        assert "formant_shift" in supports["knobs"] and "denoise" in supports["knobs"]


@pytest.fixture(scope="module")
def v3_bundle_without_skip(tmp_path_factory):
    import shutil

    from rtsvc.pretrained import LAYOUT
    from tests.cli_helpers import run_cli_captured
    from tests.tiny_encoders import make_tiny_pretrained_dir
    from tests.upstream.fixtures import make_v3_head

    root = tmp_path_factory.mktemp("v3noskip")
    ckpt, _ = make_v3_head(root / "v3.ckpt", lora_rank=4, lora_alpha=8.0)
    pretrained = make_tiny_pretrained_dir(root / "pretrained")
    shutil.rmtree(pretrained / LAYOUT["whisper"])
    code, _, err = run_cli_captured(["export", ckpt, "--out", root / "v3.rtsvc", "--pretrained-dir",
                                     pretrained])
    assert code == 0, err
    return root / "v3.rtsvc", pretrained


@pytest.mark.slow
def test_skip_guidance_on_a_bundle_without_a_skip_pass_is_a_bad_setting(v3_bundle_without_skip):
    from rtsvc.engine import StreamConfig
    from rtsvc.serve.server import ServerConfig, StreamServer, model_source
    from rtsvc.voices.spec import VoiceSpec, open_voice

    bundle, pretrained = v3_bundle_without_skip
    voice = open_voice(VoiceSpec(model=bundle, pretrained_dir=pretrained, f0="pyworld", streaming=True))
    source = model_source(voice, bundle.name)

    async def main():
        server = StreamServer(ServerConfig(port=0), source, None, StreamConfig(block_ms=100, context_ms=100))
        await server.start()
        try:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps({**START, "skip_cfg_strength": 0.5, "cfg_skip_layers": 1}))
                refused = await expect_error(ws, "bad_setting", 1003)
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                ready = json.loads(await ws.recv())
                await ws.send(json.dumps({"type": "set", "skip_cfg_strength": 0.5}))
                answer = json.loads(await ws.recv())
                await ws.send(to_bytes(tone(16000, 0.3), "s16le"))
                audio = await asyncio.wait_for(ws.recv(), 60)
            return refused, ready, answer, audio
        finally:
            await server.close()

    refused, ready, answer, audio = run(main(), timeout=180)
    for error in (refused, answer):
        assert error["code"] == "bad_setting" and "rtsvc export --cfg-skip-layers" in error["message"], error
    assert answer["fatal"] is False and isinstance(audio, bytes)
    knobs = ready["supports"]["knobs"]
    assert "ds_cfg_strength" in knobs and "skip_cfg_strength" not in knobs and "cfg_skip_layers" not in knobs


# --- the transport seam: an in-process front end ----------------------------------------------------

class QueueTransport:
    """A `rtsvc.serve.transport.Transport` made of two queues: a front end with no socket at all."""

    def __init__(self):
        self.target, self.address = "/v1/stream", "in-process"
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.outbox: asyncio.Queue = asyncio.Queue()
        self.closed = None

    async def recv(self):
        from rtsvc.serve.transport import TransportClosed

        message = await self.inbox.get()
        if message is None:
            raise TransportClosed("client closed")
        return message

    async def send(self, data):
        await self.outbox.put(data)

    async def close(self, code, reason):
        self.closed = (code, reason)

    def abort(self):
        self.closed = (1006, "")

    def backlog(self):
        return 0, 0.0


def test_an_in_process_front_end_serves_a_session_through_the_transport_seam():
    audio = tone(16000, 0.5)

    async def main():
        async with running(identity_source()) as server:
            transport = QueueTransport()
            task = asyncio.create_task(server.serve_client(transport, ready_extra={"bridge": "obs"}))
            await transport.inbox.put(json.dumps({**START, "realtime": False}))
            ready = json.loads(await transport.outbox.get())
            parts = []
            for begin in range(0, len(audio), 320):
                await transport.inbox.put(to_bytes(audio[begin:begin + 320], "s16le"))
                parts.append(await transport.outbox.get())
            await transport.inbox.put(json.dumps({"type": "flush"}))
            parts.append(await transport.outbox.get())
            flushed = json.loads(await transport.outbox.get())
            await transport.inbox.put(None)  # the client leaves
            await asyncio.wait_for(task, 10)
            return ready, parts, flushed, server.state.history[-1]

    ready, parts, flushed, summary = run(main())
    assert ready["type"] == "ready" and ready["bridge"] == "obs" and ready["supports"]["knobs"]
    assert flushed == {"type": "flushed", "samples_in": 8000, "samples_out": 8000}
    assert sum(len(p) for p in parts) == 2 * 8000 and summary["error"] is None
