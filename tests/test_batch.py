"""Batched model-voice blocks (rtsvc/voices/batch.py) equal one-at-a-time conversion, per stream.

Streams differ in input pitch, pitch shift, speaker, seed, start time (so noise frames, cache
states, cold starts and Whisper position offsets differ), guidance strength (its own DiT group)
and, for one, window length (its own encoder, DiT and vocoder groups). Each round the active
streams' whole blocks run as one `run_blocks` call (features in lockstep with batched encoder
calls, then DiT and vocoder); a second set of voices converts the same windows one at a time. Both
keep their own per-stream caches across rounds.
V2 on torch and ONNX Runtime; V3 with and without its batch-wide guidance rescale.
"""

import time

import numpy as np
import pytest

from rtsvc.dsp.signals import sung_tone
from rtsvc.engine import StreamConfig, StreamLayout
from rtsvc.models.families import V2
from rtsvc.pretrained import resolve_pretrained
from rtsvc.settings import Knobs
from rtsvc.voices.batch import BatchedVoice, Block, dit_key, run_blocks, run_jobs, vocoder_key
from rtsvc.voices.model import ModelVoice
from rtsvc.voices.spec import VoiceSpec, open_model, open_voice
from tests.tiny_models import make_tiny_dit_checkpoint

SR = 44100
LAYOUT = StreamLayout.from_config(StreamConfig(150.0, 300.0, 25.0, 10.0), SR)  # a model's lengths
SHORT = StreamLayout.from_config(StreamConfig(100.0, 200.0, 25.0, 10.0), SR)
# (input f0 Hz, knobs, first round, layout)
STREAMS = [
    (150.0, Knobs(speaker="alice", pitch_shift=0.0, cfg_strength=2.0, steps=3, seed=0), 0, LAYOUT),
    (220.0, Knobs(speaker="bob", pitch_shift=5.0, cfg_strength=2.0, steps=3, seed=1), 1, LAYOUT),
    (310.0, Knobs(speaker="bob", pitch_shift=-7.0, cfg_strength=2.0, steps=3, seed=7), 2, LAYOUT),
    (260.0, Knobs(speaker="alice", pitch_shift=3.0, cfg_strength=0.0, steps=3, seed=2), 1, LAYOUT),
    (180.0, Knobs(speaker="alice", pitch_shift=2.0, cfg_strength=2.0, steps=3, seed=0), 0, SHORT),
]
ROUNDS = 3


@pytest.fixture(scope="module")
def tiny_files(tmp_path_factory, tiny_pretrained):
    root = tmp_path_factory.mktemp("batch_model")
    return make_tiny_dit_checkpoint(root / "tiny.ckpt"), tiny_pretrained


@pytest.fixture(scope="module")
def tiny(tiny_files):
    ckpt, pretrained = tiny_files
    paths = resolve_pretrained(pretrained, need=("contentvec", "whisper", "vocoder"))
    return open_model(VoiceSpec(model=ckpt, backend="torch", device="cpu", f0="dio", streaming=True), paths)


class CountingBackend:
    """The voice's backend, recording the batch size of every DiT and vocoder call."""

    def __init__(self, backend):
        self.backend, self.speakers, self.device = backend, backend.speakers, backend.device
        self.family = getattr(backend, "family", "v2")
        self.student = getattr(backend, "student", None)
        self.dit_batches, self.vocoder_batches = [], []

    def guided_velocity(self, x, t, cond, guidance):
        self.dit_batches.append(x.shape[0])
        return self.backend.guided_velocity(x, t, cond, guidance)

    def step_velocity(self, x, t, dt, cond, guidance):
        self.dit_batches.append(x.shape[0])
        return self.backend.step_velocity(x, t, dt, cond, guidance)

    def vocode(self, mel, f0, phase, noise):
        self.vocoder_batches.append(f0.shape[0])
        return self.backend.vocode(mel, f0, phase, noise)


def windows(f0: float, layout: StreamLayout, rounds: int):
    """(start_sample, window) per block, as the engine slides them over a sung tone."""
    audio = np.concatenate((np.zeros(layout.window - layout.block, np.float32),
                            sung_tone(rounds * layout.block / SR + 0.1, SR, f0=f0)))
    return [(k * layout.block, audio[k * layout.block: k * layout.block + layout.window])
            for k in range(rounds)]


class CountingEncoders:
    """The voice's ContentVec and Whisper, recording the batch size of every call."""

    def __init__(self, features):
        self.contentvec, self.whisper = features.contentvec, features.whisper_encoder
        self.sizes = []

    def counted(self, features):
        from rtsvc.features.extractor import FeatureExtractor

        outer = self

        class Content:
            def hidden(self, audio):
                outer.sizes.append(("contentvec", 1))
                return outer.contentvec.hidden(audio)

            def hidden_batch(self, audios):
                outer.sizes.append(("contentvec", len(audios)))
                return outer.contentvec.hidden_batch(audios)

        class Whisper:
            def hidden(self, audio, pad_to_30s=True, position_offset=0):
                outer.sizes.append(("whisper", 1))
                return outer.whisper.hidden(audio, pad_to_30s, position_offset)

            def hidden_batch(self, audios, offsets):
                outer.sizes.append(("whisper", len(audios)))
                return outer.whisper.hidden_batch(audios, offsets)

        return FeatureExtractor(Content(), Whisper() if self.whisper is not None else None,
                                features.f0_extractor, features.device, features.content_resize,
                                features.encoder_sinc_width)


def batched_vs_alone(tiny, backend, streams=STREAMS) -> tuple[float, CountingBackend, dict]:
    """Every round, the active streams' whole blocks as one `run_blocks` call (features in lockstep,
    DiT and vocoder on `backend`), and the same windows through separate voices one at a time;
    (max abs difference, call sizes, outputs). `counting.encoder_batches` holds the encoder calls."""
    counting = CountingBackend(backend)
    encoders = CountingEncoders(tiny.features)
    features = encoders.counted(tiny.features)
    counting.encoder_batches = encoders.sizes
    batched = [tiny.fork() for _ in streams]
    for voice in batched:
        voice.backend = counting
        voice.features = voice.cache.features = features
    alone = [tiny.fork() for _ in streams]
    for voice in alone:
        voice.backend = backend
    plans = [windows(f0, layout, ROUNDS) for f0, _, _, layout in streams]
    worst, outputs = 0.0, {}
    for r in range(ROUNDS + 2):
        active = [i for i, (_, _, first, _) in enumerate(streams) if 0 <= r - first < ROUNDS]
        blocks = []
        for i in active:
            start, window = plans[i][r - streams[i][2]]
            blocks.append(Block(batched[i], window, streams[i][1], start, streams[i][3].tail))
        results = run_blocks(blocks)
        for i, out in zip(active, results, strict=True):
            start, window = plans[i][r - streams[i][2]]
            ref = alone[i].convert(window, streams[i][1], start, streams[i][3].tail)
            assert out.shape == ref.shape == (streams[i][3].tail,)
            assert np.abs(ref).max() > 1e-3  # a real signal, not silence on both sides
            worst = max(worst, float(np.abs(out - ref).max()))
            outputs.setdefault(i, []).append(out)
    return worst, counting, outputs


def test_batched_blocks_equal_one_at_a_time_per_stream(tiny):
    worst, counting, outputs = batched_vs_alone(tiny, tiny.backend)
    print(f"batched vs one-at-a-time: max abs difference {worst:.2e}")
    assert worst < 1e-5
    # the streams really were batched (three streams of one shape and guidance share a DiT call,
    # four of one vocoded length a vocoder call; the encoders' segments have one length only for
    # streams of one layout as many blocks into their streams (segments start on the stream's
    # 20 ms grid): the two streams that joined in round 1 share every encoder call) ...
    assert max(counting.dit_batches) == 3
    assert max(counting.vocoder_batches) == 4
    assert max(n for kind, n in counting.encoder_batches if kind == "contentvec") == 2
    assert max(n for kind, n in counting.encoder_batches if kind == "whisper") == 2
    # ... and their outputs are their own
    assert np.abs(outputs[0][2] - outputs[2][0]).max() > 1e-2


@pytest.mark.slow
def test_onnx_backend_batches_equal_one_at_a_time(tiny, tiny_files, tmp_path):
    from rtsvc.export.onnx_export import export_bundle

    from rtsvc.backends.onnx_backend import OnnxBackend

    ckpt, pretrained = tiny_files
    bundle = export_bundle(ckpt, tmp_path / "tiny.rtsvc", pretrained_dir=pretrained, lengths=(17,),
                           with_encoders=True).path
    onnx = OnnxBackend.open(bundle, device="cpu")
    # the bundle's ContentVec and Whisper graphs as the voice's encoders: everything on ONNX Runtime
    features = onnx.feature_extractor(resolve_pretrained(pretrained, need=("contentvec", "whisper")),
                                      "dio", onnx.device)
    voice = ModelVoice(onnx, features, streaming=True)
    worst, counting, _ = batched_vs_alone(voice, onnx)
    print(f"onnx batched vs one-at-a-time: max abs difference {worst:.2e}")
    assert worst < 1e-4
    assert max(counting.vocoder_batches) == 4  # four streams of one shape in one vocoder run
    assert max(n for kind, n in counting.encoder_batches if kind == "whisper") == 2
    # per-item Whisper offsets through a graph that takes one offset per run, and batched ContentVec
    audios = [sung_tone(0.6, 16000, f0=f0) for f0 in (120.0, 200.0, 280.0)]
    offsets = [0, 37, 37]
    for row, audio, offset in zip(features.whisper_encoder.hidden_batch(audios, offsets), audios, offsets,
                                  strict=True):
        alone = features.whisper_encoder.hidden(audio, pad_to_30s=False, position_offset=offset)
        np.testing.assert_allclose(row.numpy(), alone.numpy(), atol=1e-4)
    for row, audio in zip(features.contentvec.hidden_batch(audios), audios, strict=True):
        np.testing.assert_allclose(row.numpy(), features.contentvec.hidden(audio).numpy(), atol=1e-4)


def test_jobs_of_different_windows_are_separate_groups(tiny):
    a, b = tiny.fork(), tiny.fork()
    (sa, wa), (sb, wb) = windows(150.0, LAYOUT, 1)[0], windows(150.0, SHORT, 1)[0]
    ja = a.prepare(wa, STREAMS[0][1], sa, LAYOUT.tail)
    jb = b.prepare(wb, STREAMS[0][1], sb, SHORT.tail)
    assert dit_key(ja, V2, 0) != dit_key(jb, V2, 1) and vocoder_key(ja) != vocoder_key(jb)
    counting = CountingBackend(tiny.backend)
    out = run_jobs(counting, [ja, jb])
    assert [o.shape[0] for o in out] == [LAYOUT.tail, SHORT.tail]
    assert counting.vocoder_batches == [1, 1]


V3_STREAMS = [  # V3 guidance: ds / speaker / skip strengths and rescale, as the knobs carry them
    (150.0, Knobs(speaker="alice", pitch_shift=0.0, steps=3, seed=0, cfg_rescale=0.0), 0, LAYOUT),
    (220.0, Knobs(speaker="bob", pitch_shift=5.0, steps=3, seed=1, cfg_rescale=0.0), 1, LAYOUT),
    (310.0, Knobs(speaker="bob", pitch_shift=-7.0, steps=3, seed=7, cfg_rescale=0.7), 0, LAYOUT),
]


def test_v3_batches_equal_one_at_a_time_and_rescale_runs_alone(tmp_path_factory, tiny_files):
    from tests.upstream.fixtures import make_v3_head

    root = tmp_path_factory.mktemp("batch_v3")
    ckpt, _ = make_v3_head(root / "v3.ckpt", lora_rank=4, lora_alpha=8.0)
    v3 = open_voice(VoiceSpec(model=ckpt, pretrained_dir=tiny_files[1], f0="pyworld", backend="torch",
                              device="cpu", streaming=True))
    assert v3.backend.family == "v3"
    worst, counting, _ = batched_vs_alone(v3, v3.backend, V3_STREAMS)
    print(f"v3 batched vs one-at-a-time: max abs difference {worst:.2e}")
    assert worst < 1e-5
    assert max(counting.dit_batches) == 2  # the two streams without rescale share DiT calls
    assert max(counting.vocoder_batches) == 3  # the vocoder batches all three


def test_batched_voice_submits_its_whole_block_with_the_block_budget(tiny):
    class Recorder:
        def __init__(self):
            self.calls = []

        def submit(self, block, due, stream=None):
            self.calls.append((block, due, stream))
            out = run_blocks([block])[0]
            if isinstance(out, BaseException):
                raise out
            return out

    recorder = Recorder()
    voice = BatchedVoice(tiny.fork(), recorder, budget_s=0.15)
    ref = tiny.fork()
    start, window = windows(200.0, LAYOUT, 1)[0]
    before = time.monotonic()
    out = voice.convert(window, STREAMS[0][1], start, LAYOUT.tail)
    np.testing.assert_allclose(out, ref.convert(window, STREAMS[0][1], start, LAYOUT.tail), atol=1e-6)
    block, due, stream = recorder.calls[0]
    assert block.voice is voice.voice and block.start_sample == start and block.tail == LAYOUT.tail
    assert stream is voice and before + 0.15 <= due <= time.monotonic() + 0.15
    with pytest.raises(Exception, match="unknown speaker"):  # the block's own error reaches its stream
        voice.convert(window, Knobs(speaker="nobody"), start, LAYOUT.tail)
    with pytest.raises(ValueError, match="streaming ModelVoice"):
        BatchedVoice(ModelVoice(tiny.backend, tiny.features, streaming=False), recorder, 0.1)


def test_a_failing_block_fails_alone_in_its_batch(tiny):
    good, bad = tiny.fork(), tiny.fork()
    start, window = windows(200.0, LAYOUT, 1)[0]
    out = run_blocks([Block(good, window, STREAMS[0][1], start, LAYOUT.tail),
                      Block(bad, window, Knobs(speaker="nobody"), start, LAYOUT.tail),
                      Block(good.fork(), window, STREAMS[0][1], start, 0)])  # nothing to convert
    ref = tiny.fork().convert(window, STREAMS[0][1], start, LAYOUT.tail)
    np.testing.assert_allclose(out[0], ref, atol=1e-6)
    assert "unknown speaker" in str(out[1]) and out[2].shape == (0,)


# --- through the server: batched serving equals one-at-a-time serving, per client ------------------

CLIENTS = [  # start message knobs per client; they join 0, 1 and 2 blocks apart
    {"speaker": "alice", "pitch_shift": 0, "cfg_strength": 2.0, "seed": 0},
    {"speaker": "bob", "pitch_shift": 7, "cfg_strength": 0.0, "seed": 3},
    {"speaker": "bob", "pitch_shift": -5, "cfg_strength": 1.0, "seed": 5},
]


def serve_clients(tiny, max_batch: int):
    """Each client streams its own tone (f32le at 44.1 kHz, one block per frame) through a fresh
    server; returns the outputs and the batch sizes the server ran."""
    import asyncio
    import json

    from websockets.asyncio.client import connect

    from rtsvc.serve.server import ServerConfig, StreamServer, model_source

    block = LAYOUT.block
    knobs = Knobs(steps=3, gate_db=-120.0)
    config = StreamConfig(block_ms=150.0, context_ms=300.0)

    async def client(server, i, t0):
        audio = sung_tone(0.7, SR, f0=150.0 + 60 * i)
        async with connect(f"ws://127.0.0.1:{server.port}/v1/stream", max_size=None) as ws:
            await ws.send(json.dumps({"type": "start", "sample_rate": SR, "format": "f32le", **CLIENTS[i]}))
            assert json.loads(await ws.recv())["type"] == "ready"
            parts = []
            for k, begin in enumerate(range(0, len(audio), block)):
                # real-time pace, client i one block behind client i - 1: blocks of equal shape (once the
                # windows are full) come due together, as a live server's clients' blocks do
                await asyncio.sleep(max(0.0, t0 + (i + k) * block / SR - asyncio.get_running_loop().time()))
                await ws.send(audio[begin:begin + block].astype("<f4").tobytes())
                parts.append(np.frombuffer(await ws.recv(), "<f4"))
            await ws.send(json.dumps({"type": "flush"}))
            parts.append(np.frombuffer(await ws.recv(), "<f4"))
            assert json.loads(await ws.recv())["type"] == "flushed"
            return np.concatenate(parts)

    async def main():
        server = StreamServer(ServerConfig(port=0, max_batch=max_batch, batch_deadline_ms=100.0),
                              model_source(tiny), knobs, config)
        await server.start()
        try:
            t0 = asyncio.get_running_loop().time() + 0.5  # every client connected by then
            clients = [client(server, i, t0) for i in range(len(CLIENTS))]
            outs = await asyncio.wait_for(asyncio.gather(*clients), 240)
        finally:
            await server.close()
        sizes = [s for b in getattr(server.scheduler, "batchers", []) for s in b.batch_sizes]
        return outs, sizes

    return asyncio.run(main())


def test_batched_server_equals_one_at_a_time_server_per_client(tiny):
    alone, no_batches = serve_clients(tiny, max_batch=1)
    assert no_batches == []
    tries = []
    for _ in range(3):  # whether blocks meet in a batch depends on the scheduler's timing: every try
        together, sizes = serve_clients(tiny, max_batch=4)  # must equal one-at-a-time, one must batch
        tries.append(max(sizes))
        for a, b in zip(alone, together, strict=True):
            assert a.shape == b.shape and np.abs(a).max() > 1e-3
            np.testing.assert_allclose(b, a, atol=1e-5)
        assert np.abs(together[0] - together[1]).max() > 1e-2
        if tries[-1] >= 2:
            break
    assert max(tries) >= 2, tries  # the batched server really batched
