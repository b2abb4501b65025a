"""Stream a WAV file through a running `rtsvc serve` and write the converted audio.

    rtsvc serve &                                   # DSP voice on 127.0.0.1:8765
    python examples/stream_client.py in.wav out.wav --pitch 5

A minimal but complete protocol v1 client (docs/protocol.md): start -> ready, binary PCM frames
sent while converted frames are read back, `set` mid-stream if asked, flush -> flushed. Only
needs numpy, soundfile and websockets. By default the output is aligned with the input (the
server's reported latency is cut from the start and the end padded), so in.wav and out.wav
line up sample for sample; `--raw` keeps the stream as it came.
"""

import argparse
import asyncio
import json
from pathlib import Path

import numpy as np
import soundfile as sf
from websockets.asyncio.client import connect
from websockets.exceptions import WebSocketException

DTYPES = {"s16le": "<i2", "f32le": "<f4"}


def encode(samples: np.ndarray, fmt: str) -> bytes:
    if fmt == "s16le":
        return np.round(np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    return samples.astype("<f4").tobytes()


def decode(data: bytes, fmt: str) -> np.ndarray:
    samples = np.frombuffer(data, DTYPES[fmt]).astype(np.float32)
    return samples / 32768.0 if fmt == "s16le" else samples


async def stream_file(audio: np.ndarray, rate: int, url: str = "ws://127.0.0.1:8765/v1/stream",
                      fmt: str = "s16le", chunk_ms: float = 20.0, token: str | None = None,
                      knobs: dict | None = None, realtime: bool = False) -> tuple[np.ndarray, dict]:
    """Convert mono float `audio` at `rate`; returns (output of the same length, the ready message)."""
    # a file sent as fast as possible waits for a busy server; a paced (live) one is kept live
    start = {"type": "start", "sample_rate": rate, "format": fmt, "channels": 1, "realtime": realtime,
             **(knobs or {})}
    if token:
        start["token"] = token
    async with connect(url, max_size=None) as ws:
        await ws.send(json.dumps(start))
        ready = json.loads(await ws.recv())
        if ready["type"] != "ready":
            raise SystemExit(f"server refused the stream: {ready.get('code')}: {ready.get('message')}")
        parts: list[np.ndarray] = []

        async def read() -> dict:
            async for message in ws:
                if isinstance(message, bytes):
                    parts.append(decode(message, fmt))
                    continue
                message = json.loads(message)
                if message["type"] == "error":
                    raise SystemExit(f"server error {message['code']}: {message['message']}")
                if message["type"] == "flushed":
                    return message
            raise SystemExit(f"server closed the stream (code {ws.close_code})")

        reader = asyncio.create_task(read())
        chunk = max(1, int(rate * chunk_ms / 1000))
        for begin in range(0, len(audio), chunk):
            await ws.send(encode(audio[begin:begin + chunk], fmt))
            if realtime:  # pace like a microphone would
                await asyncio.sleep(chunk / rate)
        await ws.send(json.dumps({"type": "flush"}))
        flushed = await reader
    out = np.concatenate(parts) if parts else np.zeros(0, np.float32)
    assert flushed["samples_in"] == flushed["samples_out"] == len(out) == len(audio)
    return out, ready


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="input audio file (any soundfile format; mixed to mono)")
    parser.add_argument("output", help="output WAV, at the input's sample rate")
    parser.add_argument("--url", default="ws://127.0.0.1:8765/v1/stream",
                        help="server endpoint (default: %(default)s)")
    parser.add_argument("--token", help="the server's --token, if it has one (default: none)")
    parser.add_argument("--format", choices=sorted(DTYPES), default="s16le",
                        help="wire format (default: %(default)s)")
    parser.add_argument("--chunk-ms", type=float, default=20.0,
                        help="milliseconds of audio per frame (default: %(default)g)")
    parser.add_argument("--speaker", help="target speaker (default: the server's)")
    parser.add_argument("--pitch", type=float, default=0.0,
                        help="pitch shift in semitones (default: %(default)g)")
    parser.add_argument("--realtime", action="store_true",
                        help="send at the audio's own pace (default: as fast as possible)")
    parser.add_argument("--raw", action="store_true", help="keep the server's latency in the output")
    args = parser.parse_args()

    try:
        if not Path(args.input).is_file():
            raise FileNotFoundError("no such file")
        audio, rate = sf.read(args.input, dtype="float32", always_2d=True)
    except (sf.SoundFileError, OSError) as err:
        parser.exit(2, f"error: cannot read {args.input}: {err}\n")
    audio = audio.mean(axis=1)
    knobs = {"pitch_shift": args.pitch, **({"speaker": args.speaker} if args.speaker else {})}
    try:
        out, ready = asyncio.run(stream_file(audio, rate, args.url, args.format, args.chunk_ms, args.token,
                                             knobs, args.realtime))
    except (OSError, WebSocketException) as err:  # refused, unreachable, bad URL, dropped connection
        parser.exit(2, f"error: cannot stream to {args.url} ({err}); is `rtsvc serve` running there?\n")
    except SystemExit as err:  # the server refused or ended the stream: its reason, exit 2
        if isinstance(err.code, str):
            parser.exit(2, f"error: {err.code}\n")
        raise
    if not args.raw:
        lag = int(round(ready["latency_ms"] * rate / 1000))
        out = np.concatenate((out[lag:], np.zeros(min(lag, len(out)), np.float32)))
    sf.write(args.output, out, rate)
    latency = ready["latency_ms"]
    print(f"wrote {args.output}: {len(out)} samples at {rate} Hz, server latency {latency:.1f} ms")


if __name__ == "__main__":
    main()
