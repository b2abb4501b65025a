"""`rtsvc serve`: protocol v1 over real loopback sockets (DSP voice), limits, auth, bad input."""

import asyncio
import contextlib
import gc
import http.client
import json
import threading
import tracemalloc
import warnings

import numpy as np
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rtsvc.engine import StreamConfig, StreamLayout
from rtsvc.errors import UserError
from rtsvc.serve.server import ServerConfig, StreamServer, VoiceSource, check_config, dsp_source
from rtsvc.settings import Knobs
from rtsvc.voices.defaults import DSP_STREAM, MODEL_STREAM

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import pyworld

TOKEN = "s3cret-token"


class IdentityVoice:
    """Returns its input (cheap): for tests about the protocol rather than the sound."""

    sample_rate = 44100
    speakers = ["echo", "other"]
    stream_defaults = MODEL_STREAM  # what `auto` gives any voice but the DSP voice

    def convert(self, audio, knobs, start_sample=0, tail=None):
        return audio[-tail:].copy() if tail else audio.copy()

    def reset(self):
        pass


def identity_source() -> VoiceSource:
    return VoiceSource("identity", list(IdentityVoice.speakers), IdentityVoice)


def tone(rate: int, seconds: float, f0: float = 200.0, level: float = 0.15) -> np.ndarray:
    """A voice-like harmonic tone (harmonics up to ~3 kHz, slight vibrato)."""
    t = np.arange(int(rate * seconds)) / rate
    phase = 2 * np.pi * np.cumsum(f0 * (1 + 0.01 * np.sin(2 * np.pi * 5 * t))) / rate
    x = sum(level / k * np.sin(k * phase) for k in range(1, int(3000 // f0) + 1))
    return x.astype(np.float32)


def to_bytes(x: np.ndarray, fmt: str) -> bytes:
    if fmt == "s16le":
        return np.round(np.clip(x, -1, 1) * 32767).astype("<i2").tobytes()
    return x.astype("<f4").tobytes()


def from_bytes(data: bytes, fmt: str) -> np.ndarray:
    if fmt == "s16le":
        return np.frombuffer(data, "<i2").astype(np.float32) / 32768
    return np.frombuffer(data, "<f4").astype(np.float32)


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


@contextlib.asynccontextmanager
async def running(source=None, knobs=None, **config):
    server = StreamServer(ServerConfig(port=0, **config), source or dsp_source(), knobs)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def settled(server, timeout: float = 5.0) -> None:
    """Wait until every connection handler has finished (they end just after the client closes)."""
    for _ in range(int(timeout / 0.02)):
        if server.state.active == 0:
            return
        await asyncio.sleep(0.02)


def url(server, query: str = "") -> str:
    return f"ws://127.0.0.1:{server.port}/v1/stream{query}"


async def stream(server, audio: np.ndarray, rate: int, fmt: str = "s16le", chunk_ms: float = 20.0,
                 start_extra: dict | None = None, between=None, query: str = "") -> dict:
    """Start, send `audio` in chunks while reading, flush; returns output, ready, flushed, messages.

    `between(ws, sent_samples)` is awaited after each chunk (to send `set` mid-stream). The audio
    goes as fast as possible, like a file (`realtime: false`: nothing is dropped however long the
    conversion of many clients on a busy CI machine takes).
    """
    async with connect(url(server, query), max_size=None) as ws:
        await ws.send(json.dumps({"type": "start", "sample_rate": rate, "format": fmt, "channels": 1,
                                  "realtime": False, **(start_extra or {})}))
        ready = json.loads(await ws.recv())
        assert ready["type"] == "ready", ready
        parts, messages = [], []

        async def reader():
            async for message in ws:
                if isinstance(message, bytes):
                    parts.append(from_bytes(message, fmt))
                    continue
                message = json.loads(message)
                messages.append(message)
                if message["type"] == "flushed":
                    return message

        task = asyncio.create_task(reader())
        chunk = max(1, int(rate * chunk_ms / 1000))
        for begin in range(0, audio.shape[0], chunk):
            await ws.send(to_bytes(audio[begin:begin + chunk], fmt))
            if between is not None:
                await between(ws, begin + chunk)
        await ws.send(json.dumps({"type": "flush"}))
        flushed = await task
    out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    return {"out": out, "ready": ready, "flushed": flushed, "messages": messages}


def median_f0(x: np.ndarray, rate: int) -> float:
    f0, _ = pyworld.harvest(x.astype(np.float64), rate, f0_floor=60, f0_ceil=900, frame_period=10)
    voiced = f0[f0 > 0]
    return float(np.median(voiced)) if voiced.size else 0.0


# --- protocol round trip --------------------------------------------------------------------

@pytest.mark.parametrize("fmt,rate", [("s16le", 48000), ("f32le", 16000), ("f32le", 48000), ("s16le", 16000)])
def test_round_trip_accounts_for_every_sample(fmt, rate):
    audio = tone(rate, 0.8)

    async def main():
        async with running() as server:
            result = await stream(server, audio, rate, fmt, chunk_ms=30)
            await settled(server)
            stats = server.state.history[-1]
        return result, stats

    result, summary = run(main())
    ready, flushed, out = result["ready"], result["flushed"], result["out"]
    assert ready["sample_rate"] == rate and ready["format"] == fmt and ready["speakers"] == ["dsp"]
    dsp = DSP_STREAM  # auto, DSP; at 44.1 kHz
    config = StreamConfig(dsp.block_ms, 300.0, dsp.crossfade_ms, dsp.sola_search_ms)
    default = StreamLayout.from_config(config, 44100)
    assert ready["latency_ms"] == pytest.approx(default.latency * 1000 / 44100, abs=0.01)
    assert flushed["samples_in"] == flushed["samples_out"] == audio.shape[0] == out.shape[0]
    assert summary["samples_in"] == summary["samples_out"] == audio.shape[0]
    # the output is the input's voice, delayed by the reported latency
    lag = int(round(ready["latency_ms"] * rate / 1000))
    body = out[lag + rate // 10: lag + int(0.6 * rate)]
    assert 0.05 < np.sqrt(np.mean(body ** 2)) < 0.5
    assert median_f0(body, rate) == pytest.approx(200.0, rel=0.03)


def test_pitch_shift_12_doubles_output_f0():
    rate = 48000
    audio = tone(rate, 1.0, f0=180.0)

    async def main():
        async with running() as server:
            return await stream(server, audio, rate, "f32le", start_extra={"pitch_shift": 12})

    result = run(main())
    assert result["ready"]["settings"]["pitch_shift"] == 12.0
    lag = int(round(result["ready"]["latency_ms"] * rate / 1000))
    body = result["out"][lag + rate // 10: lag + int(0.9 * rate)]
    assert median_f0(body, rate) / median_f0(audio, rate) == pytest.approx(2.0, rel=0.03)


def test_live_set_changes_gain_and_pitch_mid_stream():
    rate = 16000
    audio = tone(rate, 2.0, f0=200.0)
    replies = []

    async def between(ws, sent):
        if sent == rate:  # after exactly one second of input
            await ws.send(json.dumps({"type": "set", "output_gain_db": -20, "pitch_shift": 7}))
            await ws.send(json.dumps({"type": "set", "pitch_shift": 99}))  # refused, stream goes on
            await ws.send(json.dumps({"type": "stats"}))

    async def main():
        async with running() as server:
            return await stream(server, audio, rate, "s16le", chunk_ms=50, between=between)

    result = run(main())
    replies = result["messages"]
    settings = next(m for m in replies if m["type"] == "settings")["settings"]
    assert settings["output_gain_db"] == -20.0 and settings["pitch_shift"] == 7.0
    error = next(m for m in replies if m["type"] == "error")
    assert error["code"] == "bad_setting" and not error["fatal"] and "pitch_shift" in error["message"]
    stats = next(m for m in replies if m["type"] == "stats")
    assert stats["samples_in"] == rate and stats["blocks"] >= 5 and stats["compute_ms_mean"] > 0
    # the page shows this: algorithmic latency plus the recent compute per block
    assert stats["e2e_ms"] == pytest.approx(stats["latency_ms"] + stats["compute_ms_recent"], abs=0.1)
    assert stats["e2e_ms"] > stats["latency_ms"] and stats["limited_samples"] == 0
    out, lag = result["out"], int(round(result["ready"]["latency_ms"] * rate / 1000))
    before, after = out[lag + 3200: lag + 12800], out[lag + 22400: lag + 30400]
    drop_db = 20 * np.log10(np.sqrt(np.mean(after ** 2)) / np.sqrt(np.mean(before ** 2)))
    assert drop_db == pytest.approx(-20.0, abs=2.5)
    assert median_f0(after, rate) / median_f0(before, rate) == pytest.approx(2 ** (7 / 12), rel=0.03)
    assert result["flushed"]["samples_in"] == result["flushed"]["samples_out"] == audio.shape[0]


def test_eight_concurrent_clients_get_identical_independent_streams():
    rate = 16000
    audio = tone(rate, 0.6)

    async def main():
        async with running(max_clients=8) as server:
            results = await asyncio.gather(*[
                stream(server, audio, rate, "f32le", start_extra={"pitch_shift": 12 if i % 2 else 0})
                for i in range(8)])
            await settled(server)
            return results, server.state.sessions_total, server.state.active

    results, total, active = run(main())
    assert total == 8 and active == 0
    for i, result in enumerate(results):
        assert result["flushed"]["samples_in"] == result["flushed"]["samples_out"] == audio.shape[0]
        # each client's knobs are its own: same input and pitch -> the same output
        np.testing.assert_allclose(result["out"], results[i % 2]["out"], atol=1e-6)
    assert np.abs(results[0]["out"] - results[1]["out"]).max() > 0.05


def test_a_stalled_client_does_not_stall_the_others():
    """One client's conversion blocks in its worker thread until the others are done: if the
    event loop waited for it, the other client (and /healthz) could never finish."""
    release = threading.Event()

    class StallingVoice(IdentityVoice):
        def convert(self, audio, knobs, start_sample=0, tail=None):
            if knobs.pitch_shift:  # the stalled client's blocks
                assert release.wait(60)
            return super().convert(audio, knobs, start_sample, tail)

    source = VoiceSource("stalling", ["echo"], StallingVoice)
    audio = tone(16000, 0.5)

    async def main():
        async with running(source, workers=2) as server:
            stalled = asyncio.create_task(stream(server, audio, 16000, start_extra={"pitch_shift": 1}))
            await asyncio.sleep(0.3)  # its first block is now stuck in a worker thread
            await quick_round_trip(server)
            health = json.loads((await asyncio.to_thread(http_get, server.port, "/healthz"))[2])
            assert not stalled.done() and health["status"] == "ok" and health["clients"] >= 1
            release.set()
            return await stalled

    result = run(main())
    assert result["flushed"]["samples_in"] == result["flushed"]["samples_out"] == audio.shape[0]


# --- bad input: error JSON + close code, and the server keeps serving ------------------------

START = {"type": "start", "sample_rate": 16000, "format": "s16le"}
START_F32 = {**START, "format": "f32le"}
BAD_CASES = {
    "malformed_json": (["{not json"], "bad_json", 1003),
    "not_an_object": (["[1, 2]"], "bad_message", 1003),
    "unknown_type_first": ([{"type": "hello"}], "unknown_type", 1003),
    "unknown_type_later": ([START, {"type": "dance"}], "unknown_type", 1003),
    "bad_format": ([{**START, "format": "pcm24"}], "bad_format", 1003),
    "rate_too_low": ([{**START, "sample_rate": 4000}], "bad_rate", 1003),
    "rate_too_high": ([{**START, "sample_rate": 400000}], "bad_rate", 1003),
    "rate_not_a_number": ([{**START, "sample_rate": "48000"}], "bad_rate", 1003),
    "stereo": ([{**START, "channels": 2}], "bad_channels", 1003),
    "bad_knob_at_start": ([{**START, "pitch_shift": 100}], "bad_setting", 1003),
    "unknown_speaker": ([{**START, "speaker": "nobody"}], "unknown_speaker", 1003),
    "unknown_field": ([{**START, "volume": 3}], "bad_message", 1003),
    "odd_bytes_s16": ([START, b"\x00\x01\x02"], "bad_length", 1003),
    "odd_bytes_f32": ([START_F32, b"\x00" * 6], "bad_length", 1003),
    "nan_samples": ([START_F32, np.array([0.1, np.nan], "<f4").tobytes()], "bad_samples", 1003),
    "inf_samples": ([START_F32, np.array([np.inf, 0.0], "<f4").tobytes()], "bad_samples", 1003),
    "binary_before_start": ([b"\x00\x00"], "not_started", 1008),
    "flush_before_start": ([{"type": "flush"}], "not_started", 1008),
    "start_twice": ([START, START], "already_started", 1008),
    "oversize_frame": ([START, b"\x00" * 8192], "too_big", 1009),
    "huge_text": (["x" * 5000], "too_big", 1009),
}


async def expect_error(ws, code: str, close_code: int) -> dict:
    """Read until the error message, then check the close code."""
    error = None
    with contextlib.suppress(ConnectionClosed):
        async for message in ws:
            if isinstance(message, str) and json.loads(message)["type"] == "error":
                error = json.loads(message)
    assert error is not None, "no error message before the close"
    assert error["code"] == code and error["fatal"] and error["message"]
    assert ws.close_code == close_code, (ws.close_code, ws.close_reason)
    return error


async def quick_round_trip(server, **kw) -> None:
    audio = tone(16000, 0.3)
    result = await stream(server, audio, 16000, "s16le", **kw)
    assert result["flushed"]["samples_in"] == result["flushed"]["samples_out"] == audio.shape[0]


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_gets_error_and_close_code_and_server_goes_on(case):
    messages, code, close_code = BAD_CASES[case]

    async def main():
        async with running(identity_source(), max_frame_bytes=4096) as server:
            async with connect(url(server)) as ws:
                for message in messages:
                    await ws.send(json.dumps(message) if isinstance(message, dict) else message)
                await expect_error(ws, code, close_code)
            await quick_round_trip(server)
            await settled(server)
            return server.state.active

    assert run(main()) == 0


def test_a_failing_voice_closes_only_its_client_with_1011():
    class BrokenVoice(IdentityVoice):
        def convert(self, audio, knobs, start_sample=0, tail=None):
            if knobs.pitch_shift == 5:
                raise RuntimeError("model blew up")
            return super().convert(audio, knobs, start_sample, tail)

    async def main():
        async with running(VoiceSource("broken", ["echo"], BrokenVoice)) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps({**START, "pitch_shift": 5}))
                await ws.recv()
                await ws.send(to_bytes(tone(16000, 0.5), "s16le"))
                error = await expect_error(ws, "internal", 1011)
            await quick_round_trip(server)
            return error

    assert "RuntimeError" in run(main())["message"]


def test_frame_past_the_hard_cap_is_cut_with_1009():
    async def main():
        async with running(identity_source(), max_frame_bytes=1024) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                await ws.recv()
                await ws.send(b"\x00" * 1024 * 16)
                with pytest.raises(ConnectionClosed):
                    while True:
                        await ws.recv()
                assert ws.close_code == 1009
            await quick_round_trip(server)

    run(main())


def test_abrupt_disconnects_mid_stream_leave_the_server_serving():
    async def main():
        async with running() as server:
            for _ in range(3):
                ws = await connect(url(server))
                await ws.send(json.dumps(START))
                await ws.recv()
                await ws.send(to_bytes(tone(16000, 0.5), "s16le"))  # a block is being converted...
                ws.transport.abort()  # ...when the client vanishes without a close frame
            await asyncio.sleep(0.5)
            await quick_round_trip(server)
            await settled(server)
            return server.state.active

    assert run(main()) == 0


def test_idle_client_is_closed():
    async def main():
        async with running(identity_source(), idle_timeout_s=0.3) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                await ws.recv()
                await expect_error(ws, "idle_timeout", 1008)

    run(main())


def test_client_limit_refuses_with_1013_and_frees_the_slot():
    async def main():
        async with running(identity_source(), max_clients=2) as server:
            first, second = await connect(url(server)), await connect(url(server))
            for ws in (first, second):  # a slot is taken by a started stream
                await ws.send(json.dumps(START))
                assert json.loads(await ws.recv())["type"] == "ready"
            async with connect(url(server)) as third:
                await third.send(json.dumps(START))
                await expect_error(third, "too_many_clients", 1013)
            await first.close()
            await second.close()
            await settled(server)
            await quick_round_trip(server)

    run(main())


def test_bad_set_values_are_refused_without_ending_the_stream():
    async def main():
        async with running(identity_source()) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                await ws.recv()
                replies = []
                for change in ({"speaker": "nobody"}, {"steps": "many"}, {"volume": 1}, {},
                               {"gate_db": float("nan")}, {"speaker": "other", "input_gain_db": 6}):
                    await ws.send(json.dumps({"type": "set", **change}))
                    replies.append(json.loads(await ws.recv()))
                await ws.send(to_bytes(tone(16000, 0.1), "s16le"))
                audio = await ws.recv()
        return replies, audio

    replies, audio = run(main())
    assert [r.get("code") for r in replies[:5]] == ["unknown_speaker", "bad_setting", "bad_setting",
                                                    "bad_setting", "bad_setting"]
    assert "valid:" in replies[2]["message"] and not any(r.get("fatal") for r in replies[:5])
    assert replies[5] == {"type": "settings", "settings": {**replies[5]["settings"], "speaker": "other",
                                                           "input_gain_db": 6.0}}
    assert isinstance(audio, bytes) and 0 < len(audio) <= 3200 and len(audio) % 2 == 0  # still streaming


# --- auth, origins, bind ----------------------------------------------------------------------

def test_token_is_required_and_checked():
    async def main():
        async with running(identity_source(), token=TOKEN) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                await expect_error(ws, "unauthorized", 1008)
            async with connect(url(server)) as ws:
                await ws.send(json.dumps({**START, "token": TOKEN[:-1] + "X"}))
                await expect_error(ws, "unauthorized", 1008)
            async with connect(url(server)) as ws:  # auth comes before any other check
                await ws.send(json.dumps({**START, "token": 5, "sample_rate": 1}))
                await expect_error(ws, "unauthorized", 1008)
            await quick_round_trip(server, start_extra={"token": TOKEN})
            await quick_round_trip(server, query=f"?token={TOKEN}")  # how the page passes it

    run(main())


def test_non_loopback_bind_needs_a_token():
    with pytest.raises(UserError, match="without --token"):
        check_config(ServerConfig(host="0.0.0.0"))
    with pytest.raises(UserError, match="without --token"):
        StreamServer(ServerConfig(host="192.168.1.20"), identity_source())
    with pytest.raises(UserError, match="at least 8"):
        check_config(ServerConfig(host="0.0.0.0", token="short"))
    check_config(ServerConfig(host="0.0.0.0", token=TOKEN))
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
        check_config(ServerConfig(host=host))


def test_foreign_origins_are_refused_at_the_handshake():
    async def main():
        async with running(identity_source(), allowed_origins=("https://studio.example",)) as server:
            with pytest.raises(InvalidStatus) as refused:
                await connect(url(server), origin="https://evil.example")
            assert refused.value.response.status_code == 403
            for origin in ("https://studio.example", f"http://127.0.0.1:{server.port}", None):
                async with connect(url(server), origin=origin) as ws:
                    await ws.send(json.dumps(START))
                    assert json.loads(await ws.recv())["type"] == "ready"

    run(main())


# --- HTTP: /healthz, the page, traversal --------------------------------------------------------

def http_get(port: int, path: str) -> tuple[int, str, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path)
    response = conn.getresponse()
    result = response.status, response.getheader("Content-Type", ""), response.read()
    conn.close()
    return result


def test_healthz_page_and_no_path_traversal():
    async def main():
        async with running(token=TOKEN) as server:
            get = lambda path: asyncio.to_thread(http_get, server.port, path)  # noqa: E731
            results = {p: await get(p) for p in ("/healthz", "/", "/app.js", "/worklet.js", "/nope.js",
                                                 "/../server.py", "/%2e%2e/server.py", "/..%2fserver.py",
                                                 "/web/../server.py", "//etc/passwd", "/%2fetc%2fpasswd")}
        return results

    results = run(main())
    status, kind, body = results["/healthz"]
    health = json.loads(body)
    assert status == 200 and kind == "application/json"
    assert health["status"] == "ok" and health["protocol"] == 1 and health["auth"] is True
    assert health["voice"] == "dsp" and health["clients"] == 0 and health["max_clients"] == 8
    status, kind, body = results["/"]
    assert status == 200 and kind.startswith("text/html") and b'src="app.js"' in body
    assert results["/app.js"][0] == 200 and results["/app.js"][1].startswith("text/javascript")
    assert b"/v1/stream" in results["/app.js"][2] and b"f32le" in results["/app.js"][2]
    assert b"registerProcessor" in results["/worklet.js"][2]
    for path in ("/nope.js", "/../server.py", "/%2e%2e/server.py", "/..%2fserver.py", "/web/../server.py",
                 "//etc/passwd", "/%2fetc%2fpasswd"):
        assert results[path][0] == 404 and b"import" not in results[path][2], path


# --- memory ------------------------------------------------------------------------------------

def test_memory_stays_flat_over_200_connect_disconnect_cycles():
    frame = to_bytes(tone(16000, 0.2), "s16le")

    async def cycle(server, n):
        for i in range(n):
            async with connect(url(server)) as ws:
                await ws.send(json.dumps(START))
                await ws.recv()
                await ws.send(frame)
                await ws.recv()
                if i % 2:
                    ws.transport.abort()  # half of them vanish abruptly

    async def main():
        async with running(identity_source(), knobs=Knobs(gate_db=-120.0)) as server:
            await cycle(server, 20)  # warm-up: pools, caches, imports
            await settled(server)
            gc.collect()  # (sessions are freed without it; this clears unrelated garbage)
            tracemalloc.start()
            before = tracemalloc.take_snapshot()
            await cycle(server, 200)
            await settled(server)
            gc.collect()  # (sessions are freed without it; this clears unrelated garbage)
            after = tracemalloc.take_snapshot()
            tracemalloc.stop()
            return server.state, after.compare_to(before, "filename")

    state, diff = run(main(), timeout=300)
    growth = sum(d.size_diff for d in diff)
    assert state.active == 0 and state.sessions_total == 220
    print(f"traced memory growth over 200 sessions: {growth / 1024:.1f} KiB")
    assert growth < 512 * 1024, f"{growth} bytes more after 200 sessions: {diff[:5]}"


# --- a model voice (tiny checkpoint through open_model) and the CLI ------------------------------

@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tiny_pretrained):
    from tests.tiny_models import make_tiny_dit_checkpoint

    root = tmp_path_factory.mktemp("model")
    return make_tiny_dit_checkpoint(root / "tiny.ckpt"), tiny_pretrained


def serve_args_of(args: list, capsys, monkeypatch) -> tuple[int, str, dict]:
    """`rtsvc serve ARGS` with the blocking server loop replaced by a recorder."""
    import rtsvc.serve.server
    from tests.cli_helpers import run_cli

    seen = {}
    monkeypatch.setattr(rtsvc.serve.server, "serve",
                        lambda config, source, knobs, stream_config, on_ready=None:
                        seen.update(config=config, source=source, knobs=knobs, stream_config=stream_config))
    code, _, err = run_cli(["serve", *args], capsys, monkeypatch)
    return code, err, seen


def test_serve_cli_checks_options_and_passes_them_on(capsys, monkeypatch):
    code, err, _ = serve_args_of(["--host", "0.0.0.0"], capsys, monkeypatch)
    assert code == 2 and "without --token" in err
    code, err, _ = serve_args_of(["--pitch", "50"], capsys, monkeypatch)
    assert code == 2 and "--pitch must be within ±36 semitones" in err and "pitch_shift" not in err
    code, err, _ = serve_args_of(["--speaker", "nobody"], capsys, monkeypatch)
    assert code == 2 and "unknown speaker 'nobody'" in err and "dsp" in err
    code, err, seen = serve_args_of(["--host", "0.0.0.0", "--token", TOKEN, "--port", "9000", "--max-clients",
                                     "3", "--idle-timeout", "5", "--allowed-origin", "https://a.example",
                                     "--pitch", "4", "--output-gain", "-3", "--block-ms", "100"],
                                    capsys, monkeypatch)
    assert code == 0, err
    config = seen["config"]
    assert (config.host, config.port, config.token, config.max_clients, config.idle_timeout_s) == \
        ("0.0.0.0", 9000, TOKEN, 3, 5.0)
    assert config.allowed_origins == ("https://a.example",) and seen["source"].name == "dsp"
    assert seen["knobs"].pitch_shift == 4.0 and seen["knobs"].output_gain_db == -3.0
    assert seen["stream_config"].block_ms == 100.0


def fast_voices(source: VoiceSource) -> VoiceSource:
    """The server path is under test here, not Whisper's 30 s padding (the slow part on CPU)."""
    make = source.make

    def make_fast():
        voice = make()
        voice.whisper_pad_30s = False
        return voice

    source.make = make_fast
    return source


@pytest.mark.slow
def test_bundle_is_served_through_onnx_runtime(tiny_model, tmp_path, capsys, monkeypatch):
    from rtsvc.export.onnx_export import export_bundle

    ckpt, pretrained = tiny_model
    bundle = tmp_path / "tiny.rtsvc"
    export_bundle(ckpt, bundle, pretrained, lengths=(17,))
    code, err, seen = serve_args_of(["--model", bundle, "--pretrained-dir", pretrained, "--f0", "pyworld",
                                     "--speaker", "alice", "--steps", "2", "--block-ms", "100",
                                     "--context-ms", "100"], capsys, monkeypatch)
    assert code == 0, err
    source = fast_voices(seen["source"])
    assert source.name == "tiny.rtsvc" and source.speakers == ["alice", "bob"]
    assert type(source.make().backend).__name__ == "OnnxBackend"
    audio = tone(16000, 0.3, f0=180.0)

    async def main():
        server = StreamServer(ServerConfig(port=0), source, seen["knobs"], seen["stream_config"])
        await server.start()
        try:
            return await stream(server, audio, 16000, "s16le", chunk_ms=100)
        finally:
            await server.close()

    result = run(main())
    assert result["flushed"]["samples_in"] == result["flushed"]["samples_out"] == audio.shape[0]
    assert np.isfinite(result["out"]).all() and np.abs(result["out"]).max() > 1e-4


def test_model_voice_serves_several_clients_with_their_own_speakers(tiny_model, capsys, monkeypatch):
    ckpt, pretrained = tiny_model
    code, err, seen = serve_args_of(["--model", ckpt, "--pretrained-dir", pretrained, "--f0", "pyworld",
                                     "--device", "cpu", "--speaker", "bob", "--steps", "2",
                                     "--block-ms", "100", "--context-ms", "100"],
                                    capsys, monkeypatch)
    assert code == 0, err
    source = seen["source"]
    assert source.speakers == ["alice", "bob"] and seen["knobs"].speaker == "bob"
    first, second = source.make(), source.make()
    assert first is not second and first.backend is second.backend  # weights shared, voices per client
    fast_voices(source)
    rate, audio = 16000, tone(16000, 0.4, f0=180.0)
    switch = []

    async def between(ws, sent):
        if sent == rate // 5:
            await ws.send(json.dumps({"type": "set", "speaker": "alice"}))
            switch.append(True)

    async def main():
        server = StreamServer(ServerConfig(port=0), source, seen["knobs"], seen["stream_config"])
        await server.start()
        try:
            return await asyncio.gather(
                stream(server, audio, rate, "f32le", chunk_ms=100),
                stream(server, audio, rate, "s16le", chunk_ms=100, between=between))
        finally:
            await server.close()

    plain, switched = run(main())
    assert switch and plain["ready"]["speakers"] == ["alice", "bob"]
    assert plain["ready"]["settings"]["speaker"] == "bob"
    settings = next(m for m in switched["messages"] if m["type"] == "settings")["settings"]
    assert settings["speaker"] == "alice"
    for result in (plain, switched):
        assert result["flushed"]["samples_in"] == result["flushed"]["samples_out"] == audio.shape[0]
        assert np.isfinite(result["out"]).all() and np.abs(result["out"]).max() > 1e-4


def test_example_client_converts_a_file(tmp_path):
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).parents[1] / "examples" / "stream_client.py"
    spec = importlib.util.spec_from_file_location("stream_client", path)
    client = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(client)
    rate, audio = 22050, tone(22050, 0.6, f0=150.0)

    async def main():
        async with running() as server:
            return await client.stream_file(audio, rate, url(server), "f32le", knobs={"pitch_shift": -12})

    out, ready = run(main())
    lag = int(round(ready["latency_ms"] * rate / 1000))
    assert out.shape == audio.shape
    assert median_f0(out[lag + 2000: lag + 12000], rate) == pytest.approx(75.0, rel=0.04)


def test_every_frame_is_answered_by_one_frame_so_lockstep_clients_work():
    """The simple client of docs/protocol.md section 8: send a frame, read a frame."""
    pcm = np.round(tone(16000, 0.5) * 32767).astype("<i2")

    async def main():
        async with running(identity_source()) as server:
            async with connect(url(server)) as ws:
                await ws.send(json.dumps({"type": "start", "sample_rate": 16000, "format": "s16le"}))
                json.loads(await ws.recv())
                out = []
                for i in range(0, len(pcm), 320):
                    await ws.send(pcm[i:i + 320].tobytes())
                    out.append(np.frombuffer(await ws.recv(), "<i2"))
                await ws.send(json.dumps({"type": "flush"}))
                out.append(np.frombuffer(await ws.recv(), "<i2"))
                return out, json.loads(await ws.recv())

    out, flushed = run(main())
    assert len(out) == 26 and out[0].size == 0  # the first answer is empty: resamplers filling up
    assert flushed == {"type": "flushed", "samples_in": 8000, "samples_out": 8000}
    assert sum(part.size for part in out) == 8000


def test_info_gives_the_page_speakers_controls_and_latency_before_start():
    async def main():
        async with running(token=TOKEN) as server:
            refused = await asyncio.to_thread(http_get, server.port, "/v1/info")
            status, kind, body = await asyncio.to_thread(http_get, server.port, f"/v1/info?token={TOKEN}")
            return refused, status, kind, json.loads(body)

    refused, status, kind, info = run(main())
    assert refused[0] == 401
    assert status == 200 and kind.startswith("application/json")
    assert info["voice"] == "dsp" and info["speakers"] == ["dsp"] and info["settings"]["denoise"] == "off"
    assert info["latency_ms"] == pytest.approx(39.2, abs=0.5)  # DSP auto: 23.2 + 12 + 8 / 2
    names = [c["name"] for c in info["controls"]]
    assert "formant_shift" in names and "cfg_strength" not in names  # only what the DSP voice uses
    denoise = next(c for c in info["controls"] if c["name"] == "denoise")
    assert denoise["choices"] == ["off", "deepfilternet", "rnnoise"]
    assert 45 < info["denoise_latency_ms"]["deepfilternet"] < 60
    assert 35 < info["denoise_latency_ms"]["rnnoise"] < 50


def test_page_controls_follow_the_model_family():
    """/v1/info's controls: V2 guidance for V2 voices, the V3 strengths for V3 voices, neither for DSP."""
    from types import SimpleNamespace

    from rtsvc.serve.server import dsp_source, model_source
    from rtsvc.settings import knob_spec

    names = {kind: [c["name"] for c in knob_spec(kind)] for kind in ("dsp", "v2", "v3")}
    assert "cfg_strength" in names["v2"] and "ds_cfg_strength" not in names["v2"]
    assert {"ds_cfg_strength", "spk_cfg_strength", "cfg_rescale"} <= set(names["v3"])
    assert "cfg_strength" not in names["v3"] and "steps" in names["v3"] and "formant_shift" in names["v3"]
    assert not {"cfg_strength", "ds_cfg_strength", "steps"} & set(names["dsp"])
    v3_voice = SimpleNamespace(speakers=["a"], backend=SimpleNamespace(family="v3"), fork=lambda: None,
                               stream_defaults=MODEL_STREAM)
    assert model_source(v3_voice).family == "v3" and dsp_source().family == "dsp"
