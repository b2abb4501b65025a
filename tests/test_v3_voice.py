"""A V3 voice (tiny, random, official layout, with LoRA) through the commands a V2 voice runs,
with a pretrained folder that has no Whisper."""


import numpy as np
import pytest
import soundfile as sf
import torch

from rtsvc.models.guidance import Guidance
from rtsvc.settings import Knobs
from rtsvc.voices.spec import VoiceSpec, open_voice
from tests.cli_helpers import SR, harmonic_tone, run_cli, write_wav
from tests.upstream.fixtures import make_v3_head


@pytest.fixture(scope="module")
def v3(tmp_path_factory, tiny_pretrained_v3):
    root = tmp_path_factory.mktemp("v3")
    ckpt, _ = make_v3_head(root / "v3-lora.ckpt", lora_rank=4, lora_alpha=8.0)
    return ckpt, tiny_pretrained_v3  # V3 needs no Whisper: the folder is complete without it


def test_v3_needs_no_whisper(v3):
    ckpt, pretrained = v3
    spec = VoiceSpec(model=ckpt, pretrained_dir=pretrained, f0="pyworld")
    assert "whisper" not in spec.needed_components()
    voice = open_voice(spec.with_(backend="torch", device="cpu", streaming=False))
    assert voice.backend.family == "v3" and voice.features.whisper_encoder is None
    assert voice.features.content_resize == "linear"


def test_v3_voice_guidance_knobs_change_the_output(v3):
    ckpt, pretrained = v3
    voice = open_voice(VoiceSpec(model=ckpt, pretrained_dir=pretrained, f0="pyworld", backend="torch",
                                 device="cpu", streaming=False))
    audio = harmonic_tone(0.6, 180.0)
    base = Knobs(steps=3, seed=1, speaker="bob")
    ref = voice.convert(audio, base)
    assert ref.shape == audio.shape and np.isfinite(ref).all()
    # the V2 knob does nothing to a V3 voice; each V3 knob does something
    np.testing.assert_array_equal(voice.convert(audio, Knobs(**{**base.__dict__, "cfg_strength": 0.0})), ref)
    for change in ({"ds_cfg_strength": 0.0}, {"spk_cfg_strength": 2.0}, {"cfg_rescale": 0.0},
                   {"skip_cfg_strength": 1.0, "cfg_skip_layers": 1}):
        out = voice.convert(audio, Knobs(**{**base.__dict__, **change}))
        assert np.abs(out - ref).max() > 1e-4, change


def test_v3_backend_guided_velocity_is_the_guidance_module(v3):
    from rtsvc.models.flow import Conditioning
    from rtsvc.models.guidance import v3_velocity
    ckpt, pretrained = v3
    voice = open_voice(VoiceSpec(model=ckpt, pretrained_dir=pretrained, f0="pyworld", backend="torch",
                                 device="cpu", streaming=False))
    g = torch.Generator().manual_seed(0)
    cond = Conditioning(spk=torch.tensor([1]), f0=200 + torch.rand(1, 20, generator=g) * 50,
                        rms=torch.rand(1, 20, generator=g) * 0.1, cvec=torch.randn(1, 20, 768, generator=g))
    x = torch.randn(1, 20, 128, generator=g)
    guidance = Guidance(ds_cfg_strength=0.3, spk_cfg_strength=0.5, skip_cfg_strength=0.2,
                        cfg_skip_layers=(0,))
    with torch.no_grad():
        want = v3_velocity(voice.backend.model, x, torch.tensor(0.3), cond, guidance)
    torch.testing.assert_close(voice.backend.guided_velocity(x, torch.tensor(0.3), cond, guidance), want)


@pytest.mark.parametrize("stream", [False, True])
def test_v3_convert_through_the_cli(v3, tmp_path, capsys, monkeypatch, stream):
    ckpt, pretrained = v3
    audio = harmonic_tone(1.0, 160.0)
    src = write_wav(tmp_path / "in.wav", audio)
    args = ["convert", src, tmp_path / "out.wav", "--model", ckpt, "--pretrained-dir", pretrained,
            "--f0", "pyworld", "--steps", "3", "--speaker", "alice", "--device", "cpu",
            "--ds-cfg-strength", "0.3", "--spk-cfg-strength", "1.0", "--skip-cfg-strength", "0.5",
            "--cfg-skip-layers", "1", "--cfg-rescale", "0.5"] + (["--stream"] if stream else [])
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    out, sr = sf.read(tmp_path / "out.wav", dtype="float32")
    assert sr == SR and out.shape == audio.shape and np.isfinite(out).all()
    assert np.sqrt(np.mean(out[int(0.3 * SR):] ** 2)) > 1e-3


def test_bad_v3_knob_is_one_line(v3, tmp_path, capsys, monkeypatch):
    ckpt, pretrained = v3
    src = write_wav(tmp_path / "in.wav", harmonic_tone(0.3))
    args = ["convert", src, tmp_path / "o.wav", "--model", ckpt, "--pretrained-dir", pretrained,
            "--cfg-rescale", "1.5"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "--cfg-rescale must be between 0 and 1" in err and err.count("\n") == 1


def test_v3_knobs_are_live_settings():
    from rtsvc.errors import UserError
    from rtsvc.settings import RuntimeSettings
    settings = RuntimeSettings()
    knobs = settings.update(ds_cfg_strength="0.5", spk_cfg_strength=1, cfg_skip_layers=4, cfg_rescale=0.0)
    assert (knobs.ds_cfg_strength, knobs.spk_cfg_strength, knobs.cfg_skip_layers, knobs.cfg_rescale) == \
        (0.5, 1.0, 4, 0.0)
    with pytest.raises(UserError, match="skip_cfg_strength must be between 0 and 10"):
        settings.update(skip_cfg_strength=-1)
    with pytest.raises(UserError, match="cfg_skip_layers must be"):
        settings.update(cfg_skip_layers=-2)
    assert settings.snapshot() == knobs  # a refused update changes nothing


def test_doctor_says_a_folder_without_whisper_is_complete_for_v3(v3, capsys, monkeypatch):
    from rtsvc.doctor import _components
    _, pretrained = v3
    rows = {row.name: row for row in _components(pretrained)}
    assert rows["for V3 models"].ok and rows["for V3 models"].value == "complete"
    assert not rows["for V2 models"].ok and "missing whisper" in rows["for V2 models"].value
    assert "--family v2" in rows["for V2 models"].value
    assert rows["whisper (V2)"].ok is False and rows["contentvec (V2/V3)"].ok


def test_download_v3_fetches_no_whisper(tmp_path, monkeypatch, capsys):
    import huggingface_hub
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: calls.append(kw))
    args = ["download", "--to", tmp_path / "pre", "--voice", "none"]
    code, _, err = run_cli([*args, "--family", "v3"], capsys, monkeypatch)
    assert code == 0, err
    assert calls and all(c["repo_id"] != "openai/whisper-large-v3" for c in calls)
    assert {p.split("/")[0] for c in calls for p in c["allow_patterns"]} == {
        "content-vec-best", "nsf_hifigan_44.1k_hop512_128bin_2024.02", "rmvpe"}
    calls.clear()
    assert run_cli(args, capsys, monkeypatch)[0] == 0
    assert "openai/whisper-large-v3" in [c["repo_id"] for c in calls]


def test_v3_voice_is_served_and_its_guidance_is_live(v3, capsys, monkeypatch):
    import asyncio
    import json

    from rtsvc.serve.server import ServerConfig, StreamServer
    from tests.test_server import fast_voices, run, serve_args_of, stream, tone
    ckpt, pretrained = v3
    code, err, seen = serve_args_of(["--model", ckpt, "--pretrained-dir", pretrained, "--f0", "pyworld",
                                     "--device", "cpu", "--steps", "2", "--block-ms", "100",
                                     "--context-ms", "100", "--spk-cfg-strength", "1.5"], capsys, monkeypatch)
    assert code == 0, err
    source = seen["source"]
    assert seen["knobs"].spk_cfg_strength == 1.5
    fast_voices(source)
    rate, audio = 16000, tone(16000, 0.4, f0=180.0)

    async def between(ws, sent):
        if sent == rate // 5:
            await ws.send(json.dumps({"type": "set", "ds_cfg_strength": 0.0, "cfg_rescale": 0.5}))

    async def main():
        server = StreamServer(ServerConfig(port=0), source, seen["knobs"], seen["stream_config"])
        await server.start()
        try:
            return await asyncio.gather(stream(server, audio, rate, "f32le", chunk_ms=100, between=between))
        finally:
            await server.close()

    (result,) = run(main())
    assert result["ready"]["settings"]["spk_cfg_strength"] == 1.5
    settings = next(m for m in result["messages"] if m["type"] == "settings")["settings"]
    assert (settings["ds_cfg_strength"], settings["cfg_rescale"]) == (0.0, 0.5)
    assert result["flushed"]["samples_in"] == result["flushed"]["samples_out"] == audio.shape[0]
    assert np.isfinite(result["out"]).all() and np.abs(result["out"]).max() > 1e-4


def test_v3_voice_benches(v3):
    from rtsvc.bench.blocks import bench_case, make_cases
    from rtsvc.engine import StreamConfig
    ckpt, pretrained = v3
    spec = VoiceSpec(model=ckpt, pretrained_dir=pretrained, f0="pyworld")
    cases = make_cases([StreamConfig(block_ms=150.0).validate()], spec, [2], ["torch"], ["cpu"])
    model_cases = [c for c in cases if c.label.startswith("v3-lora.ckpt")]
    assert len(model_cases) == 1 and model_cases[0].voice.backend.family == "v3"
    row = bench_case(model_cases[0], seconds=0.5)
    assert row["blocks"] >= 3 and row["mean_ms"] > 0 and row["steps"] == 2
