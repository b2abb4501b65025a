"""`rtsvc serve`: the websocket streaming endpoint (protocol v1), /healthz and the browser page.

One asyncio event loop owns every socket; it only parses messages and moves bytes. Each client
gets a `Session` (its own RuntimeSettings, StreamingConverter and RateAdapter), and a session's
blocks run on `BlockScheduler` worker threads, so a slow client never stalls the loop or the
other clients. docs/protocol.md describes the wire format; rtsvc/apps/protocol.py parses it.

Batching seam: sessions never call the voice themselves from the loop; they hand a block to
`BlockScheduler.run(session.process, samples)` and await the result. A batching scheduler can
replace it with one that gathers the pending blocks of several sessions that share a model for a
few milliseconds and runs their DiT/vocoder calls as one batch, resolving each session's future
with its own rows; sessions and the socket code stay as they are.
"""

import asyncio
import hmac
import ipaddress
import json
import logging
import mimetypes
import os
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
from websockets.asyncio.server import ServerConnection
from websockets.asyncio.server import serve as ws_serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from rtsvc import __version__
from rtsvc.apps.protocol import (
    CLOSE_INTERNAL,
    CLOSE_POLICY,
    CLOSE_TOO_BIG,
    CLOSE_TRY_LATER,
    MAX_TEXT_BYTES,
    PROTOCOL_VERSION,
    STREAM_PATH,
    ProtocolError,
    StartRequest,
    decode_pcm,
    encode_pcm,
    parse_set,
    parse_start,
    parse_text,
    ready_message,
    settings_error,
)
from rtsvc.errors import UserError
from rtsvc.settings import DENOISE_CHOICES, Knobs, RuntimeSettings, knob_controls
from rtsvc.voice import Voice

log = logging.getLogger("rtsvc.apps.server")

WEB_DIR = Path(__file__).parent / "web"
DEFAULT_PORT = 8765
DEFAULT_MAX_CLIENTS = 8
DEFAULT_MAX_FRAME_BYTES = 1 << 20  # 1 MiB: ~5.5 s of 48 kHz f32le mono per frame
DEFAULT_IDLE_TIMEOUT_S = 30.0
HARD_FRAME_FACTOR = 4  # frames past this multiple of the limit are cut by the websocket layer itself
START_TIMEOUT_S = 10.0  # a connection must send `start` this soon (at most the idle timeout)
INFO_PATH = "/v1/info"  # voice, speakers, defaults, controls and latency for the page, before Start
HISTORY = 256  # finished-session summaries kept for /healthz and tests (bounded: memory stays flat)


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT  # 0 picks a free port (tests)
    token: str | None = None
    max_clients: int = DEFAULT_MAX_CLIENTS
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    allowed_origins: tuple[str, ...] = ()  # besides the page's own origin; "*" allows any
    workers: int = 0  # inference threads; 0: one per CPU core, at most 8


@dataclass
class VoiceSource:
    """Where sessions get their voice: `make()` returns a Voice for one client's stream.

    Voices may cache features per stream, so each session gets its own; a model-backed source
    shares the loaded weights between the voices it makes.
    """

    name: str
    speakers: list[str]
    make: Callable[[], Voice]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def check_config(config: ServerConfig) -> None:
    """Refuse unsafe or impossible settings before binding (UserError, one line)."""
    if not is_loopback(config.host) and not config.token:
        raise UserError(f"refusing to listen on {config.host} without --token: anyone on the network could "
                        "use the server (use --host 127.0.0.1 or set --token)")
    if config.token is not None and len(config.token) < 8:
        raise UserError("--token must be at least 8 characters")
    if not 0 <= config.port <= 65535:
        raise UserError(f"--port must be between 0 and 65535, got {config.port}")
    if config.max_clients < 1:
        raise UserError(f"--max-clients must be at least 1, got {config.max_clients}")
    if config.max_frame_bytes < 1024:
        raise UserError(f"--max-frame-bytes must be at least 1024, got {config.max_frame_bytes}")
    if config.idle_timeout_s <= 0:
        raise UserError(f"--idle-timeout must be positive, got {config.idle_timeout_s}")


class BlockScheduler:
    """Runs session work off the event loop on a thread pool (the seam for cross-client batching)."""

    def __init__(self, workers: int = 0):
        workers = workers or min(8, os.cpu_count() or 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="rtsvc-block")
        self.workers = workers

    async def run(self, fn: Callable, *args):
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


class Session:
    """One client's stream: settings, engine and rate adapter. Methods run on a worker thread."""

    def __init__(self, voice: Voice, knobs: Knobs, rate: int, fmt: str, stream_config=None):
        from rtsvc.engine import RateAdapter, StreamingConverter  # the engine pulls in the heavy parts

        self.rate, self.format = rate, fmt
        self.settings = RuntimeSettings(knobs)
        self.engine = StreamingConverter(voice, self.settings, stream_config)
        self.adapter = RateAdapter(self.engine, rate)
        self.samples_in = 0
        self.samples_out = 0
        self.frames_in = 0
        self.started = time.monotonic()

    @property
    def latency_ms(self) -> float:
        return float(self.adapter.latency_ms)

    def process(self, samples: np.ndarray) -> np.ndarray:
        out = self.adapter.process(samples)
        self.samples_in += samples.shape[0]
        self.samples_out += out.shape[0]
        self.frames_in += 1
        return out

    def flush(self) -> np.ndarray:
        """Every sample still held back; then the stream starts afresh (counters keep running)."""
        out = self.adapter.flush()  # the adapter and engine reset themselves for a new stream
        self.samples_out += out.shape[0]
        return out

    def stats(self) -> dict:
        engine = {k: v for k, v in self.engine.stats().items() if isinstance(v, int | float | str | None)}
        return {**engine, "samples_in": self.samples_in, "samples_out": self.samples_out,
                "frames_in": self.frames_in, "latency_ms": round(self.latency_ms, 3),
                "uptime_s": round(time.monotonic() - self.started, 3)}


def knobs_dict(knobs: Knobs) -> dict:
    return asdict(knobs)


@dataclass
class ServerState:
    """Counters shared by every connection (touched only on the event loop thread)."""

    active: int = 0
    sessions_total: int = 0
    history: deque = field(default_factory=lambda: deque(maxlen=HISTORY))


class StreamServer:
    """The websocket server. `await start()`, then `await serve_forever()` or `await close()`."""

    def __init__(self, config: ServerConfig, source: VoiceSource, knobs: Knobs | None = None,
                 stream_config=None):
        check_config(config)
        self.config = config
        self.source = source
        self.knobs = knobs or Knobs()
        self.stream_config = stream_config
        self.state = ServerState()
        self.scheduler = BlockScheduler(config.workers)
        self._server = None
        self._static = {p.name: p for p in WEB_DIR.iterdir() if p.is_file()} if WEB_DIR.is_dir() else {}

    # --- life cycle -------------------------------------------------------------------------
    async def start(self) -> None:
        try:
            self._server = await ws_serve(
                self._handle, self.config.host, self.config.port,
                process_request=self._process_request,
                max_size=self.config.max_frame_bytes * HARD_FRAME_FACTOR + MAX_TEXT_BYTES,
                compression=None,  # PCM does not deflate well; saves CPU and a zip-bomb vector
                ping_interval=20, ping_timeout=20, server_header=f"rtsvc/{__version__}",
            )
        except OSError as err:
            where = f"{self.config.host}:{self.config.port}"
            raise UserError(f"cannot listen on {where}: {err.strerror or err}") from None

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    async def serve_forever(self) -> None:
        await self._server.serve_forever()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        self.scheduler.close()

    # --- HTTP: /healthz, the page, origin check for the stream ---------------------------------
    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        url = urlsplit(request.path)
        if url.path == STREAM_PATH:
            origin = request.headers.get("Origin")
            if origin is not None and not self._origin_allowed(origin, request.headers.get("Host")):
                return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
            return None  # go on with the websocket handshake
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return connection.respond(HTTPStatus.NOT_FOUND, f"the websocket endpoint is {STREAM_PATH}\n")
        if url.path == "/healthz":
            return self._json_response(self.health())
        if url.path == INFO_PATH:  # speaker names: for token holders only, like the stream
            given = (parse_qs(url.query).get("token") or [""])[0]
            if self.config.token and not hmac.compare_digest(given.encode(), self.config.token.encode()):
                return connection.respond(HTTPStatus.UNAUTHORIZED, "token required (?token=)\n")
            return self._json_response(self.info())
        name = "index.html" if url.path == "/" else unquote(url.path)[1:]
        path = self._static.get(name)  # only the files directly inside rtsvc/apps/web, by exact name
        if path is None:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        return self._file_response(path)

    def _origin_allowed(self, origin: str, host: str | None) -> bool:
        allowed = self.config.allowed_origins
        if "*" in allowed or origin in allowed:
            return True
        # the page this server itself serves connects from its own origin
        return host is not None and origin in (f"http://{host}", f"https://{host}")

    def health(self) -> dict:
        return {"status": "ok", "version": __version__, "protocol": PROTOCOL_VERSION, "endpoint": STREAM_PATH,
                "voice": self.source.name, "clients": self.state.active,
                "max_clients": self.config.max_clients, "sessions_total": self.state.sessions_total,
                "auth": bool(self.config.token)}

    def info(self) -> dict:
        """What the page shows before Start: voice, speakers, default settings, the controls that apply,
        and the engine latency (the denoiser's, per choice, is added when it is on)."""
        from rtsvc.dsp.audio import SAMPLE_RATE
        from rtsvc.dsp.denoise import denoise_latency_samples
        from rtsvc.engine import StreamConfig, StreamLayout
        from rtsvc.voices.defaults import DSP_BLOCK_MS, MODEL_BLOCK_MS

        kind = "dsp" if self.source.name == "dsp" else "model"
        config = self.stream_config or StreamConfig()
        if config.block_ms is None:  # auto, as the voice would resolve it
            config = replace(config, block_ms=DSP_BLOCK_MS if kind == "dsp" else MODEL_BLOCK_MS)
        latency = StreamLayout.from_config(config, SAMPLE_RATE).latency
        return {"voice": self.source.name, "speakers": list(self.source.speakers),
                "settings": knobs_dict(self.knobs), "auth": bool(self.config.token),
                "latency_ms": round(latency * 1000 / SAMPLE_RATE, 1),
                "denoise_latency_ms": {name: round(denoise_latency_samples(name, SAMPLE_RATE) * 1000
                                                   / SAMPLE_RATE, 1) for name in DENOISE_CHOICES[1:]},
                "controls": [asdict(c) for c in knob_controls(kind)]}

    @staticmethod
    def _json_response(payload: dict) -> Response:
        return _response(HTTPStatus.OK, json.dumps(payload).encode(), "application/json")

    @staticmethod
    def _file_response(path: Path) -> Response:
        kind = {".js": "text/javascript", ".html": "text/html"}.get(path.suffix) or \
            mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if kind.startswith("text/"):
            kind += "; charset=utf-8"
        return _response(HTTPStatus.OK, path.read_bytes(), kind)

    # --- websocket --------------------------------------------------------------------------
    async def _handle(self, ws: ServerConnection) -> None:
        self.state.active += 1
        summary = {"format": None, "sample_rate": None, "samples_in": 0, "samples_out": 0,
                   "error": None, "out_peak": 0.0}
        try:
            if self.state.active > self.config.max_clients:
                raise ProtocolError("too_many_clients", f"the server is full ({self.config.max_clients} "
                                    "clients); try again later", CLOSE_TRY_LATER)
            session = await self._open(ws, summary)
            self.state.sessions_total += 1
            await self._stream(ws, session, summary)
        except ProtocolError as err:
            summary["error"] = err.code
            await _fail(ws, err)
        except ConnectionClosed as err:
            # the client went away (cleanly or not); its session just ends. The connection keeps
            # this exception: drop its traceback so our frames (and the session) are freed now,
            # not at the next garbage collection
            err.__traceback__ = None
        except Exception as err:  # a bug must not take the server down: report and close this client only
            log.exception("session failed")
            summary["error"] = "internal"
            message = f"internal error: {type(err).__name__}"
            await _fail(ws, ProtocolError("internal", message, CLOSE_INTERNAL))
        finally:
            self.state.active -= 1
            self.state.history.append(summary)

    async def _recv(self, ws: ServerConnection, timeout: float | None = None):
        timeout = timeout or self.config.idle_timeout_s
        try:
            return await asyncio.wait_for(ws.recv(), timeout=timeout)
        except TimeoutError:
            raise ProtocolError("idle_timeout", f"no message for {timeout:g} s", CLOSE_POLICY) from None

    async def _open(self, ws: ServerConnection, summary: dict) -> Session:
        # unauthenticated connections hold a client slot only briefly
        message = await self._recv(ws, min(START_TIMEOUT_S, self.config.idle_timeout_s))
        if isinstance(message, bytes):
            raise ProtocolError("not_started", "send a start message before audio", CLOSE_POLICY)
        message = parse_text(message)
        if message["type"] in ("flush", "set", "stats"):
            raise ProtocolError("not_started", f"send a start message before {message['type']}", CLOSE_POLICY)
        if message["type"] != "start":
            raise ProtocolError("unknown_type", f"unknown message type {message['type']!r}; expected start")
        self._authorize(ws, message.get("token"))
        request = parse_start(message)
        summary.update(format=request.format, sample_rate=request.sample_rate)
        session = await self.scheduler.run(self._make_session, request)
        await ws.send(json.dumps(ready_message(
            request.sample_rate, request.format, session.latency_ms, self.source.speakers,
            knobs_dict(session.settings.snapshot()), self.config.max_frame_bytes)))
        return session

    def _authorize(self, ws: ServerConnection, token: object) -> None:
        if not self.config.token:
            return
        if token is None:  # the page passes it in the URL: ws://host/v1/stream?token=...
            token = parse_qs(urlsplit(ws.request.path).query).get("token", [None])[0]
        if not isinstance(token, str) or not hmac.compare_digest(token.encode(), self.config.token.encode()):
            raise ProtocolError("unauthorized", "missing or wrong token", CLOSE_POLICY)

    def _make_session(self, request: StartRequest) -> Session:
        self._check_speaker(request.knobs.get("speaker"), fatal=True)
        try:
            knobs = RuntimeSettings(self.knobs).update(**request.knobs)
        except UserError as err:
            raise ProtocolError("bad_setting", str(err)) from None
        return Session(self.source.make(), knobs, request.sample_rate, request.format, self.stream_config)

    def _check_speaker(self, speaker: object, fatal: bool) -> None:
        if speaker is not None and speaker not in self.source.speakers:
            raise ProtocolError("unknown_speaker", f"unknown speaker {speaker!r}; this server has: "
                                f"{', '.join(self.source.speakers)}", fatal=fatal)

    async def _stream(self, ws: ServerConnection, session: Session, summary: dict) -> None:
        while True:
            message = await self._recv(ws)
            if isinstance(message, bytes):
                if len(message) > self.config.max_frame_bytes:
                    raise ProtocolError("too_big", f"binary frame of {len(message)} bytes is over the "
                                        f"{self.config.max_frame_bytes}-byte limit", CLOSE_TOO_BIG)
                samples = decode_pcm(message, session.format)
                out = await self.scheduler.run(session.process, samples)
                await self._send_audio(ws, out, session, summary)
                continue
            message = parse_text(message)
            kind = message["type"]
            if kind == "flush":
                out = await self.scheduler.run(session.flush)
                await self._send_audio(ws, out, session, summary)
                await ws.send(json.dumps({"type": "flushed", "samples_in": session.samples_in,
                                          "samples_out": session.samples_out}))
            elif kind == "set":
                await self._set(ws, session, message)
            elif kind == "stats":
                await ws.send(json.dumps({"type": "stats", **session.stats()}))
            elif kind == "start":
                raise ProtocolError("already_started", "the stream is already started", CLOSE_POLICY)
            else:
                raise ProtocolError("unknown_type", f"unknown message type {kind!r}; expected flush, set "
                                    "or stats")

    async def _set(self, ws: ServerConnection, session: Session, message: dict) -> None:
        try:
            changes = parse_set(message)
            self._check_speaker(changes.get("speaker"), fatal=False)
            try:
                knobs = session.settings.update(**changes)
            except UserError as err:
                raise settings_error(err) from None
        except ProtocolError as err:  # a bad value is reported; the stream goes on unchanged
            await ws.send(json.dumps(err.to_message()))
            return
        await ws.send(json.dumps({"type": "settings", "settings": knobs_dict(knobs)}))

    @staticmethod
    async def _send_audio(ws: ServerConnection, out: np.ndarray, session: Session, summary: dict) -> None:
        """Exactly one binary frame per input frame (empty while the resamplers fill up), so even a
        lockstep client that sends one frame and reads one frame never waits forever."""
        summary["samples_in"], summary["samples_out"] = session.samples_in, session.samples_out
        if out.shape[0]:
            summary["out_peak"] = max(summary["out_peak"], float(np.max(np.abs(out))))
        await ws.send(encode_pcm(out, session.format))


def _response(status: HTTPStatus, body: bytes, content_type: str) -> Response:
    headers = Headers([
        ("Date", time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime())),
        ("Connection", "close"),
        ("Content-Length", str(len(body))),
        ("Content-Type", content_type),
        ("Cache-Control", "no-store"),
        ("X-Content-Type-Options", "nosniff"),
    ])
    return Response(status.value, status.phrase, headers, body)


async def _fail(ws: ServerConnection, err: ProtocolError) -> None:
    """Send the error message, then close with its code (the peer may already be gone)."""
    try:
        await ws.send(json.dumps(err.to_message()))
        await ws.close(err.close, err.code)
    except ConnectionClosed:
        pass


def dsp_source(f0_method: str = "dio") -> VoiceSource:
    from rtsvc.voices.dsp import DspVoice

    voice = DspVoice(f0_method)  # stateless: one instance serves every session
    return VoiceSource("dsp", list(voice.speakers), lambda: voice)


def model_source(voice: Voice, name: str = "model") -> VoiceSource:
    """Sessions of a loaded model share its weights; each gets its own per-stream caches.

    A voice with `fork()` makes the per-session copy itself; otherwise a shallow copy (same
    backend and encoders) is reset so that its caches are its own.
    """
    import copy

    def make() -> Voice:
        fork = getattr(voice, "fork", None)
        if fork is not None:
            return fork()
        clone = copy.copy(voice)
        clone.reset()
        return clone

    return VoiceSource(name, list(voice.speakers), make)


def serve(config: ServerConfig, source: VoiceSource, knobs: Knobs | None = None, stream_config=None,
          on_ready: Callable[[StreamServer], None] | None = None) -> None:
    """Run the server until Ctrl-C (the `rtsvc serve` command)."""

    async def main() -> None:
        server = StreamServer(config, source, knobs, stream_config)
        await server.start()
        if on_ready is not None:
            on_ready(server)
        try:
            await server.serve_forever()
        finally:
            await server.close()

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass


__all__ = ["BlockScheduler", "ServerConfig", "Session", "StreamServer", "VoiceSource", "check_config",
           "dsp_source", "model_source", "serve"]
