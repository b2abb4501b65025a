"""`rtsvc export` on tiny models in the official formats: parity, the ONNX backend, and a bundle
round trip through `rtsvc convert` that must sound like the checkpoint it came from."""

import shutil

import numpy as np
import onnxruntime as ort
import pytest
import soundfile as sf
import torch
from rtsvc.export.onnx_export import export_bundle, export_dit
from rtsvc.export.parity import check_dit

from rtsvc.backends.bundle import bundle_components, read_bundle, sha256_file
from rtsvc.backends.onnx_backend import (
    CPU,
    OnnxBackend,
    OnnxFcpeNet,
    choose_providers,
    parse_providers,
    provider_works,
)
from rtsvc.backends.torch_backend import TorchBackend
from rtsvc.dsp.audio import resample
from rtsvc.errors import UserError
from rtsvc.features.extractor import FeatureExtractor
from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance
from rtsvc.models.loading import load_dit
from rtsvc.models.vocoder import draw_source_randomness
from rtsvc.pretrained import LAYOUT, resolve_pretrained
from tests.cli_helpers import harmonic_tone, run_cli, run_cli_captured, write_wav
from tests.tiny_models import make_tiny_dit_checkpoint

LENGTHS = (17, 64, 203)  # mel frames


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tiny_pretrained):
    root = tmp_path_factory.mktemp("export")
    ckpt = make_tiny_dit_checkpoint(root / "tiny.ckpt", speakers=("alice", "bob"))
    return root, ckpt, tiny_pretrained


@pytest.fixture(scope="module")
def exported(tiny):
    """`rtsvc export --with-encoders` through the real entry point (module scope: one export for the
    file; the encoders make the bundle independent of ContentVec/Whisper in the pretrained dir)."""
    root, ckpt, pretrained = tiny
    code, out, err = run_cli_captured(["export", ckpt, "--out", root / "tiny.rtsvc", "--pretrained-dir",
                                       pretrained, "--with-encoders"])
    assert code == 0, err
    return root / "tiny.rtsvc", out


def test_export_writes_a_verified_bundle_and_prints_parity(exported, tiny):
    bundle_path, stdout = exported
    _, ckpt, pretrained = tiny
    for graph in ("dit", "vocoder", "contentvec", "whisper"):
        assert stdout.count(graph) >= len(LENGTHS), stdout  # one table row per length
    bundle = read_bundle(bundle_path)
    m = bundle.manifest
    assert m["speakers"] == {"alice": 0, "bob": 1}
    assert (m["dit"]["dim"], m["dit"]["depth"], m["dit"]["num_speaker"]) == (64, 2, 2)
    assert (m["audio"]["sample_rate"], m["audio"]["hop_length"], m["audio"]["n_mels"]) == (44100, 512, 128)
    assert m["features"]["pretrained_layout"]["contentvec"] == LAYOUT["contentvec"]
    assert m["source"]["checkpoint_sha256"] == sha256_file(ckpt)
    assert m["export"]["parity"]["dit"]["max_rel"] < 1e-4
    assert sorted(m["files"]) == ["contentvec.onnx", "dit.onnx", "fcpe.onnx", "vocoder.onnx",
                                  "whisper_encoder.onnx", "whisper_preprocessor/preprocessor_config.json"]
    assert m["features"]["whisper"]["onnx"] == "whisper_encoder.onnx"
    session = ort.InferenceSession(str(bundle.file("dit.onnx")), providers=[CPU])
    dims = {i.name: i.shape for i in session.get_inputs()}
    assert dims["x"] == ["batch", "frames", 128] and dims["cfg_strength"] == []
    assert not (bundle_path.parent / ".tiny.rtsvc.partial").exists()


def test_parity_at_several_lengths(exported, tiny):
    bundle_path, _ = exported
    _, ckpt, _ = tiny
    rows = check_dit(bundle_path / "dit.onnx", load_dit(ckpt).model, LENGTHS)
    assert [r.frames for r in rows] == list(LENGTHS)
    assert {r.batch for r in rows} == {1, 2}  # the dynamic batch axis is exercised too
    for r in rows:
        assert r.ref_max > 0.5  # velocities are not trivially zero
        assert r.rel < 1e-4, r
    # the vocoder was checked the same way during export (torch's first call per shape is slow on
    # CPU, so it is not repeated here); the manifest records it
    vocoder = read_bundle(bundle_path).manifest["export"]["parity"]["vocoder"]
    assert vocoder["frames"] == list(LENGTHS) and 0 < vocoder["max_rel"] < 1e-4


def _cond(b: int, n: int) -> Conditioning:
    g = torch.Generator().manual_seed(7)
    return Conditioning(spk=torch.tensor([1] * b), f0=180 + 80 * torch.rand(b, n, generator=g),
                        rms=0.1 * torch.rand(b, n, generator=g), cvec=torch.randn(b, n, 768, generator=g),
                        whisper=torch.randn(b, n, 1280, generator=g))


def test_onnx_backend_matches_torch_backend(exported, tiny):
    bundle_path, _ = exported
    _, ckpt, pretrained = tiny
    torch_be = TorchBackend.from_checkpoint(ckpt, pretrained / LAYOUT["vocoder"], torch.device("cpu"))
    onnx_be = OnnxBackend.open(bundle_path, device="cpu")
    assert onnx_be.speakers == torch_be.speakers and onnx_be.providers == [CPU]
    b, n = 2, 33
    cond = _cond(b, n)
    x = torch.randn(b, n, 128, generator=torch.Generator().manual_seed(1))
    for cfg in (0.0, 2.0):
        want = torch_be.guided_velocity(x, torch.tensor(0.4), cond, Guidance(cfg_strength=cfg))
        got = onnx_be.guided_velocity(x, torch.tensor(0.4), cond, Guidance(cfg_strength=cfg))
        assert got.shape == (b, n, 128)
        assert (got - want).abs().max() < 2e-5 * want.abs().max()
    phase, noise = draw_source_randomness(b, n * 512, torch.Generator().manual_seed(2))
    mel = torch.randn(b, 128, n, generator=torch.Generator().manual_seed(3)) - 5
    want = torch_be.vocode(mel, cond.f0, phase, noise)
    got = onnx_be.vocode(mel, cond.f0, phase, noise)
    assert got.shape == (b, n * 512) and want.abs().max() > 0.01
    assert (got - want).abs().max() < 1e-5


def test_bundle_round_trip_through_convert_matches_checkpoint(exported, tiny, tmp_path, capsys, monkeypatch):
    bundle_path, _ = exported
    _, ckpt, pretrained = tiny
    wav = write_wav(tmp_path / "in.wav", harmonic_tone(1.2, 180.0, vibrato=0.01))
    outs = {}
    empty = tmp_path / "empty"  # the bundle brings its vocoder and encoders; pyworld needs no weights
    empty.mkdir()
    for name, model, where in (("ckpt", ckpt, pretrained), ("bundle", bundle_path, empty)):
        outs[name] = tmp_path / f"{name}.flac"
        args = ["convert", wav, outs[name], "--model", model, "--pretrained-dir", where,
                "--f0", "pyworld", "--steps", "4", "--seed", "3", "--speaker", "bob"]
        code, _, err = run_cli(args, capsys, monkeypatch)
        assert code == 0, err
    a, _ = sf.read(outs["ckpt"], dtype="float32")
    b, _ = sf.read(outs["bundle"], dtype="float32")
    assert len(a) == len(b) == int(1.2 * 44100)
    rms = float(np.sqrt(np.mean(a ** 2)))
    assert rms > 1e-3  # real audio came out
    gap = float(np.max(np.abs(a - b)))
    # measured: ~3e-5 (one 16-bit step of the FLAC files); torch and ORT agree to ~1e-6 before writing
    assert gap < 2e-4, gap


def test_tampered_real_bundle_is_refused(exported, tiny, tmp_path, capsys, monkeypatch):
    bundle_path, _ = exported
    _, _, pretrained = tiny
    copy = shutil.copytree(bundle_path, tmp_path / "copy.rtsvc")
    data = bytearray((copy / "dit.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (copy / "dit.onnx").write_bytes(bytes(data))
    wav = write_wav(tmp_path / "in.wav", harmonic_tone(0.3))
    code, _, err = run_cli(["convert", wav, tmp_path / "o.wav", "--model", copy,
                            "--pretrained-dir", pretrained, "--f0", "pyworld"], capsys, monkeypatch)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "dit.onnx sha256 mismatch" in err, err


def test_parity_failure_exits_2_and_leaves_no_bundle(tiny, capsys, monkeypatch):
    root, ckpt, pretrained = tiny
    out = root / "strict.rtsvc"
    code, stdout, err = run_cli(["export", ckpt, "--out", out, "--pretrained-dir", pretrained,
                                 "--tolerance", "1e-12"], capsys, monkeypatch)
    assert code == 2
    assert "NO" in stdout  # the table marks the failing rows
    last = err.strip().splitlines()[-1]  # the progress bar is above it on stderr
    assert last.startswith("error: parity check failed") and "tolerance 1e-12" in last, err
    assert not out.exists() and not list(root.glob(".strict.rtsvc*"))  # nor its work folder


def test_export_refuses_bad_out_and_opset(tiny, tmp_path):
    _, ckpt, pretrained = tiny
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "notabundle" / "keep.txt").write_text("user data")
    with pytest.raises(UserError, match="not a bundle"):
        export_bundle(ckpt, tmp_path / "notabundle", pretrained_dir=pretrained)
    with pytest.raises(UserError, match="--opset must be between"):
        export_bundle(ckpt, tmp_path / "x.rtsvc", pretrained_dir=pretrained, opset=3)
    with pytest.raises(UserError, match="vocoder"):
        export_bundle(ckpt, tmp_path / "x.rtsvc", pretrained_dir=tmp_path / "empty")
    assert (tmp_path / "notabundle" / "keep.txt").read_text() == "user data"


def test_fp16_dit_export_within_its_tolerance(tiny, tmp_path):
    _, ckpt, _ = tiny
    dit = load_dit(ckpt).model
    export_dit(dit, tmp_path / "dit16.onnx", fp16=True)
    assert next(dit.parameters()).dtype == torch.float32  # the caller's model is left as it was
    (row,) = check_dit(tmp_path / "dit16.onnx", dit, (64,), tolerance=2e-2)
    assert 1e-6 < row.rel < 2e-2, row  # fp16 rounding is visible but small


def test_provider_choice():
    auto = choose_providers()
    assert auto[-1] == CPU and len(auto) == len(set(auto))
    assert choose_providers("cpu") == [CPU]
    assert parse_providers("CUDA, cpu") == ["CUDAExecutionProvider", CPU]
    assert parse_providers("auto") is None
    with pytest.raises(UserError, match="unknown ONNX Runtime provider 'vulkan'"):
        choose_providers("vulkan")
    if not provider_works("CUDAExecutionProvider"):  # listed by onnxruntime-gpu, but cannot start here
        assert "CUDAExecutionProvider" not in auto
        with pytest.raises(UserError, match="provider cuda was asked for but cannot start: cuda"):
            choose_providers("cuda,cpu")


def test_bundle_encoders_replace_the_torch_encoders(exported, tiny):
    bundle_path, _ = exported
    _, _, pretrained = tiny
    parity = read_bundle(bundle_path).manifest["export"]["parity"]
    assert parity["contentvec"]["max_rel"] < 1e-4 and parity["whisper"]["max_rel"] < 1e-4
    assert bundle_components(bundle_path) == {"vocoder", "contentvec", "whisper"}
    onnx_features = OnnxBackend.open(bundle_path, device="cpu").feature_extractor(None, "pyworld",
                                                                                  torch.device("cpu"))
    torch_features = FeatureExtractor.from_pretrained(resolve_pretrained(pretrained), f0="pyworld")
    audio = harmonic_tone(0.8, 200.0)
    audio_16k = resample(audio, 44100, 16000)
    n = len(audio) // 512
    for name in ("content", "whisper"):
        want, got = getattr(torch_features, name)(audio_16k, n), getattr(onnx_features, name)(audio_16k, n)
        assert got.shape == want.shape == (n, 768 if name == "content" else 1280)
        assert (got - want).abs().max() < 1e-4 * want.abs().max(), name
    # the streaming form: an unpadded window whose position embeddings start further in
    want = torch_features.whisper_encoder.encode(audio_16k, n, pad_to_30s=False, position_offset=40)
    got = onnx_features.whisper_encoder.encode(audio_16k, n, pad_to_30s=False, position_offset=40)
    assert (got - want).abs().max() < 1e-4 * want.abs().max()


def test_bundle_fcpe_graph_gives_torchfcpe_f0(exported, tiny):
    """--f0 fcpe on a bundle exported --with-encoders runs FCPE's network from fcpe.onnx: the F0 equals
    torchfcpe's own (real bundled weights) on a gliding sung tone, voiced frames included."""
    from rtsvc.features.f0 import make_f0_extractor

    bundle_path, stdout = exported
    manifest = read_bundle(bundle_path).manifest
    assert manifest["features"]["fcpe"]["onnx"] == "fcpe.onnx" and stdout.count("fcpe") >= 3
    assert manifest["export"]["parity"]["fcpe"]["max_rel"] < 1e-4
    backend = OnnxBackend.open(bundle_path, device="cpu")
    features = backend.feature_extractor(None, "fcpe", torch.device("cpu"))
    assert isinstance(features.f0_extractor.network, OnnxFcpeNet)  # fcpe.onnx, not torchfcpe's network
    t = np.arange(16000) / 16000
    glide = (0.3 * np.sin(2 * np.pi * (180 * t + 60 * t ** 2))).astype(np.float32)  # 180 -> 300 Hz
    want = make_f0_extractor("fcpe")(glide)
    got = features.f0_extractor(glide)
    assert got.shape == want.shape == (101,)
    voiced, expected = want > 0, 180 + 120 * np.arange(101) * 0.01  # instantaneous frequency per 10 ms frame
    assert voiced.sum() > 80 and np.all(np.abs(want[voiced][5:-5] - expected[voiced][5:-5]) < 15)
    assert np.array_equal(got > 0, voiced) and np.abs(got - want).max() < 1e-2  # Hz


def test_encoders_take_one_thread_each_while_f0_runs_beside_them(exported, tiny):
    """Streaming on a CPU with F0 beside the encoders, the bundle's ContentVec and Whisper sessions run on
    one thread (F0 has the other core; measured fastest, issue 14); DiT and vocoder keep ONNX Runtime's
    default; an explicit --threads, or F0 one after the other, leaves every session as asked."""
    from rtsvc.voices.spec import VoiceSpec, open_voice

    bundle_path, _ = exported
    _, _, pretrained = tiny

    def threads(voice):
        sessions = (voice.features.contentvec.session, voice.features.whisper_encoder.session,
                    voice.backend.dit, voice.backend.vocoder)
        return [s.get_session_options().intra_op_num_threads for s in sessions]

    spec = VoiceSpec(model=bundle_path, pretrained_dir=pretrained, f0="pyworld", device="cpu")
    beside = open_voice(spec.with_(concurrent_f0=True))
    assert threads(beside) == [1, 1, 0, 0] and beside.cache.side_thread is not None
    assert threads(open_voice(spec)) == [0, 0, 0, 0]
    assert threads(open_voice(spec.with_(concurrent_f0=True, threads=2))) == [2, 2, 2, 2]
    # FCPE on the bundle's graph is short: it takes the one thread, the encoders keep the default
    fcpe = open_voice(spec.with_(f0="fcpe", concurrent_f0=True))
    net = fcpe.features.f0_extractor.network
    assert threads(fcpe) == [0, 0, 0, 0] and net.session.get_session_options().intra_op_num_threads == 1
