"""`rtsvc serve` under hostile clients, overload and shutdown (issue 15), over loopback only.

Every test here reproduces an attack or failure found by hand and stops by itself within seconds.
"""

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from rtsvc.errors import UserError
from rtsvc.serve.server import ServerConfig, VoiceSource, check_config
from tests.test_server import (
    START,
    TOKEN,
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


def strict_json(text: str) -> dict:
    """What a browser's JSON.parse accepts: no NaN / Infinity tokens."""
    def refuse(name):
        raise ValueError(f"non-standard JSON token {name}")
    return json.loads(text, parse_constant=refuse)


# --- values on the wire -------------------------------------------------------------------------

BAD_START = {
    "nan_pitch": ('{"type":"start","sample_rate":16000,"pitch_shift":NaN}', "bad_setting"),
    "inf_gain": ('{"type":"start","sample_rate":16000,"output_gain_db":Infinity}', "bad_setting"),
    "format_list": ('{"type":"start","sample_rate":16000,"format":["s16le"]}', "bad_format"),
    "seed_1e400": ('{"type":"start","sample_rate":16000,"seed":1e400}', "bad_setting"),
    "rate_1e400": ('{"type":"start","sample_rate":1e400}', "bad_rate"),
    "rate_float": ('{"type":"start","sample_rate":16000.0}', "bad_rate"),
    "pitch_string": ('{"type":"start","sample_rate":16000,"pitch_shift":"5"}', "bad_setting"),
    "steps_bool": ('{"type":"start","sample_rate":16000,"steps":true}', "bad_setting"),
    "speaker_number": ('{"type":"start","sample_rate":16000,"speaker":5}', "bad_setting"),
    "channels_bool": ('{"type":"start","sample_rate":16000,"channels":true}', "bad_channels"),
    "seed_huge": ('{"type":"start","sample_rate":16000,"seed":' + str(10**30) + "}", "bad_setting"),
    "realtime_string": ('{"type":"start","sample_rate":16000,"realtime":"no"}', "bad_message"),
}


@pytest.mark.parametrize("case", list(BAD_START))
def test_start_values_get_type_and_range_checks(case):
    text, code = BAD_START[case]

    async def main():
        async with running(identity_source()) as server:
            async with connect(url(server)) as ws:
                await ws.send(text)
                error = await expect_error(ws, code, 1003)
            await quick_round_trip(server)
            return error

    error = run(main())
    assert "internal" not in error["message"]


def test_set_refuses_non_finite_strings_booleans_and_huge_seeds_and_stream_goes_on():
    changes = ['{"type":"set","pitch_shift":"nan"}', '{"type":"set","gate_db":NaN}',
               '{"type":"set","input_gain_db":true}', '{"type":"set","steps":4.5}',
               '{"type":"set","seed":' + str(10**30) + "}", '{"type":"set","seed":-1}',
               '{"type":"set","pitch_shift":"5"}', '{"type":"set","speaker":["echo"]}',
               '{"type":"set","seed":7,"pitch_shift":-3.5}']

    async def main():
        async with running(identity_source()) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                ready = strict_json(await ws.recv())
                replies = []
                for change in changes:
                    await ws.send(change)
                    replies.append(strict_json(await ws.recv()))
                await ws.send(to_bytes(tone(16000, 0.5), "s16le"))
                audio = await ws.recv()
                await ws.send(json.dumps({"type": "stats"}))
                stats = strict_json(await ws.recv())
        return ready, replies, audio, stats

    ready, replies, audio, stats = run(main())
    assert ready["type"] == "ready"
    for reply in replies[:-1]:
        assert reply["type"] == "error" and reply["code"] == "bad_setting" and not reply["fatal"], reply
    assert "finite number" in replies[0]["message"] and "integer" in replies[3]["message"]
    assert "seed must be between 0 and" in replies[4]["message"]
    settings = replies[-1]["settings"]
    assert settings["seed"] == 7 and settings["pitch_shift"] == -3.5 and settings["gate_db"] == -50.0
    assert isinstance(audio, bytes) and len(audio) > 0  # still converting, no 1011
    assert stats["type"] == "stats"


def test_text_limit_counts_bytes_not_characters():
    text = json.dumps({"type": "set", "speaker": "é" * 3000}, ensure_ascii=False)  # 3026 chars, 6026 bytes
    assert len(text) < 4096 < len(text.encode())

    async def main():
        async with running(identity_source()) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                await ws.recv()
                await ws.send(text)
                return await expect_error(ws, "too_big", 1009)

    assert "bytes" in run(main())["message"]


# --- HTTP ---------------------------------------------------------------------------------------

def raw_http(port: int, request: str) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request.encode())
        data = b""
        while not data.startswith(b"HTTP/1.1 101") and (chunk := sock.recv(65536)):
            data += chunk  # to the end, except for a websocket (101: only the handshake)
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_http_duplicate_headers_methods_and_foreign_hosts():
    def ask(port, method="GET", path="/healthz", headers=None):
        lines = [f"{method} {path} HTTP/1.1"]
        lines += headers if headers is not None else [f"Host: 127.0.0.1:{port}"]
        return raw_http(port, "\r\n".join(lines) + "\r\n\r\n")

    async def main():
        results = {}
        async with running(identity_source()) as server:  # loopback mode: no token
            port = server.port
            q = lambda *a, **k: asyncio.to_thread(ask, port, *a, **k)  # noqa: E731
            results["get"] = await q()
            results["head"] = await q("HEAD", "/")
            for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
                results[method] = await q(method, "/healthz"), await q(method, "/")
            host = f"Host: 127.0.0.1:{port}"
            upgrade = ["Upgrade: websocket", "Connection: Upgrade", "Sec-WebSocket-Version: 13",
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ=="]
            results["two_hosts"] = await q(headers=[host, host])
            results["two_origins"] = await q(path="/v1/stream", headers=[
                host, "Origin: http://a.example", "Origin: http://b.example", *upgrade])
            results["rebound"] = await q(headers=["Host: attacker.example:8765"])
            results["no_host"] = await q(headers=[])
            results["localhost"] = await q(headers=[f"Host: localhost:{port}"])
            results["ipv6"] = await q(headers=[f"Host: [::1]:{port}"])
            results["ws_rebound"] = await q(path="/v1/stream", headers=["Host: attacker.example", *upgrade])
            results["ws_ok"] = await q(path="/v1/stream", headers=[host, *upgrade])
        async with running(identity_source(), token=TOKEN) as server:  # a token: any Host name
            results["token_any_host"] = await asyncio.to_thread(ask, server.port,
                                                                headers=["Host: studio.example"])
        return results

    results = run(main())
    assert results["get"][0] == 200 and json.loads(results["get"][1])["status"] == "ok"
    assert results["head"] == (200, b"")
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH"):
        assert [r[0] for r in results[method]] == [405, 405], method
    assert results["two_hosts"][0] == 400 and b"duplicate Host" in results["two_hosts"][1]
    assert results["two_origins"][0] == 400 and b"duplicate Origin" in results["two_origins"][1]
    assert results["rebound"][0] == 403 and results["no_host"][0] == 403
    assert results["ws_rebound"][0] == 403 and results["ws_ok"][0] == 101
    assert results["localhost"][0] == results["ipv6"][0] == results["token_any_host"][0] == 200


def test_blank_tokens_are_refused():
    for token in (" " * 12, "\t\n" * 8, "  abc   "):
        with pytest.raises(UserError, match="at least 8 characters"):
            check_config(ServerConfig(token=token))


# --- slots ---------------------------------------------------------------------------------------

def test_connections_without_start_cannot_starve_authenticated_clients():
    async def main():
        async with running(identity_source(), token=TOKEN, max_clients=2) as server:
            idle = [await connect(url(server)) for _ in range(3)]  # never send start
            await asyncio.sleep(0.2)
            async with connect(url(server)) as ws:  # the real client
                await ws.send(json.dumps({**START, "token": TOKEN}))
                ready = json.loads(await ws.recv())
            for ws in idle:
                await ws.close()
            return ready

    assert run(main())["type"] == "ready"


def test_pending_connections_are_limited_per_address_and_in_time():
    async def main():
        async with running(identity_source(), token=TOKEN, max_pending_per_address=2,
                           start_timeout_s=1.0) as server:
            idle = [await connect(url(server)) for _ in range(2)]
            async with connect(url(server)) as third:
                refused = await expect_error(third, "too_many_pending", 1013)
            began = time.monotonic()
            for ws in idle:  # the pre-start deadline closes them, freeing the places
                await expect_error(ws, "idle_timeout", 1008)
            waited = time.monotonic() - began
            await quick_round_trip(server, start_extra={"token": TOKEN})
            return refused, waited

    refused, waited = run(main())
    assert "127.0.0.1" in refused["message"] and waited < 3.0


def test_a_client_that_never_reads_is_dropped_after_the_send_timeout():
    frame = to_bytes(tone(48000, 1.0), "f32le")  # 192 kB in, 192 kB back per frame

    async def main():
        async with running(identity_source(), send_timeout_s=1.0, max_frame_bytes=1 << 20) as server:
            ws = await connect(url(server), max_size=None)
            await ws.send(json.dumps({**START, "sample_rate": 48000, "format": "f32le", "realtime": False}))
            await ws.recv()
            ws.transport.pause_reading()  # from now on this client reads nothing
            began = time.monotonic()
            sent = 0
            while time.monotonic() - began < 20 and not server.state.history:
                try:
                    await asyncio.wait_for(ws.send(frame), 0.5)
                    sent += 1
                except (TimeoutError, ConnectionClosed):
                    await asyncio.sleep(0.1)
            dropped_after = time.monotonic() - began
            ws.transport.abort()
            await settled(server)
            return server.state.history[-1] if server.state.history else None, dropped_after, sent

    summary, dropped_after, sent = run(main(), timeout=60)
    assert summary is not None and summary["error"] == "not_reading", summary
    assert dropped_after < 10.0 and sent >= 2


# --- overload -------------------------------------------------------------------------------------

class SlowVoice(IdentityVoice):
    """Takes half a block's duration per block, sleeping (no CPU): 3 clients on 1 worker need 1.5x
    real time, whatever the load of the test machine."""

    def convert(self, audio, knobs, start_sample=0, tail=None):
        time.sleep(0.5 * (tail or len(audio)) / self.sample_rate)
        return super().convert(audio, knobs, start_sample, tail)


async def paced_client(server, seconds: float, rate: int = 16000, frame_ms: float = 20.0) -> dict:
    """A microphone: one frame every frame_ms; returns each frame's round-trip time and the stats."""
    chunk = int(rate * frame_ms / 1000)
    pcm = to_bytes(tone(rate, seconds), "s16le")
    sent_at, latencies, warnings = [], [], []
    async with connect(url(server)) as ws:
        await ws.send(json.dumps({**START, "warnings": True}))
        assert json.loads(await ws.recv())["type"] == "ready"
        done = asyncio.Event()

        async def reader():
            async for message in ws:
                if isinstance(message, bytes):
                    latencies.append(time.monotonic() - sent_at[len(latencies)])
                else:
                    message = json.loads(message)
                    if message["type"] == "warning":
                        warnings.append(message)
                    elif message["type"] == "stats":
                        return message
                if len(latencies) == len(sent_at) and done.is_set():
                    await ws.send(json.dumps({"type": "stats"}))

        task = asyncio.create_task(reader())
        began = time.monotonic()
        for i, begin in enumerate(range(0, len(pcm), 2 * chunk)):
            await asyncio.sleep(max(0.0, began + i * frame_ms / 1000 - time.monotonic()))
            sent_at.append(time.monotonic())
            await ws.send(pcm[begin:begin + 2 * chunk])
        done.set()
        stats = await asyncio.wait_for(task, 30)
    return {"latencies": np.array(latencies), "warnings": warnings, "stats": stats}


def test_overload_keeps_every_clients_latency_bounded_and_says_what_it_dropped():
    async def main():
        async with running(VoiceSource("slow", ["echo"], SlowVoice), workers=1, max_lag_ms=300) as server:
            clients = [asyncio.create_task(paced_client(server, 4.0)) for _ in range(3)]
            await asyncio.sleep(2.5)  # the server is behind by now
            async with connect(url(server)) as late:
                await late.send(json.dumps(START))
                refused = await expect_error(late, "overloaded", 1013)
            health = json.loads(await asyncio.to_thread(
                lambda: raw_http(server.port, f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{server.port}"
                                 "\r\n\r\n")[1]))
            return await asyncio.gather(*clients), refused, health

    results, refused, health = run(main(), timeout=90)
    assert health["behind"] is True and "keep up" in refused["message"]
    total_dropped = 0.0
    for result in results:
        latencies, stats = result["latencies"], result["stats"]
        assert len(latencies) == 200
        print(f"round trip ms: p50 {1000 * np.median(latencies):.0f} max {1000 * latencies.max():.0f}; "
              f"dropped {stats['dropped_ms']} ms")
        # 300 ms allowed lag + a block's conversion behind two others' (3 x 75 ms) + scheduling slack
        assert latencies.max() < 1.0
        assert stats["samples_in"] == 4 * 16000  # every frame answered, converted or dropped
        total_dropped += stats["dropped_ms"]
        if stats["dropped_ms"]:
            assert result["warnings"][0]["code"] == "overloaded" and result["warnings"][0]["dropped_ms"] > 0
    assert total_dropped > 500  # 1.5x real time for 4 s: about a third of the audio cannot be converted


# --- shutdown ----------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_close_clients_with_1001_and_exit_0(signum):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "COLUMNS": "200",
           "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rtsvc.commands.cli",
                             "serve", "--port", "0"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(120, proc.kill)  # a hung server ends the test instead of CI
    watchdog.start()
    try:
        line = proc.stdout.readline()
        while line and "rtsvc serving" not in line:  # "rtsvc serving ... on http://127.0.0.1:PORT/ ..."
            line = proc.stdout.readline()
        assert line, "the server exited before listening"
        port = int(line.split("http://127.0.0.1:")[1].split("/")[0])

        async def main():
            async with connect(f"ws://127.0.0.1:{port}/v1/stream") as ws:
                await ws.send(json.dumps(START))
                assert json.loads(await ws.recv())["type"] == "ready"
                await ws.send(to_bytes(tone(16000, 0.5), "s16le"))
                await ws.recv()
                proc.send_signal(signum)
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()
                return ws.close_code

        close_code = run(main(), timeout=60)
        code = proc.wait(timeout=30)
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert close_code == 1001
    assert code == 0, proc.stdout.read()


def test_serve_cli_passes_the_overload_options_on(capsys, monkeypatch):
    from tests.test_server import serve_args_of

    code, err, seen = serve_args_of(["--max-lag-ms", "250", "--send-timeout", "3"], capsys, monkeypatch)
    assert code == 0, err
    assert seen["config"].max_lag_ms == 250.0 and seen["config"].send_timeout_s == 3.0
    code, err, _ = serve_args_of(["--max-lag-ms", "nan"], capsys, monkeypatch)
    assert code == 2 and "--max-lag-ms must be positive" in err
