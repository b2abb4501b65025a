"""Schedules, students and `rtsvc distill`: zero-init parity with the teacher, the baked-guidance
target, exact resume, the checkpoint marker, and students in the voice, the backends and export."""

import copy
import math
import shutil

import numpy as np
import pytest
import torch
from rtsvc.training.distill import DistillConfig, distill
from rtsvc.training.distill_loss import deployment_pairs, teacher_trajectory
from rtsvc.training.prepare import prepare_dataset

from rtsvc.errors import UserError
from rtsvc.models.dit import DiT
from rtsvc.models.families import teacher_velocity
from rtsvc.models.flow import Conditioning
from rtsvc.models.guidance import Guidance
from rtsvc.models.loading import load_dit
from rtsvc.models.schedules import EPSS_TABLE, time_grid
from rtsvc.models.student import StudentInfo, is_student, make_student, v2_student_velocity
from tests.test_prepare import cheap_extract, make_voices
from tests.tiny_models import _randomise, make_tiny_dit_checkpoint, tiny_dit_config

TINY = dict(batch_size=2, pairs=2, lr=1e-3, log_every=2, num_workers=0, device="cpu", progress=False,
            max_frame_len=64)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _cond(b: int = 2, n: int = 20, seed: int = 0) -> Conditioning:
    g = torch.Generator().manual_seed(seed)
    return Conditioning(spk=torch.tensor([0, 1][:b]), f0=torch.rand(b, n, generator=g) * 300 + 100,
                        rms=torch.rand(b, n, generator=g) * 0.1, cvec=torch.randn(b, n, 768, generator=g),
                        whisper=torch.randn(b, n, 1280, generator=g))


def _dit() -> DiT:
    torch.manual_seed(0)
    model = DiT(tiny_dit_config()).eval()
    _randomise(model)
    return model


# --- schedules --------------------------------------------------------------------------------

def test_schedules_are_increasing_grids_from_0_to_1():
    for name in ("uniform", "sway", "epss"):
        for points in (2, 3, 4, 8, 32):
            grid = time_grid(points, name)
            assert len(grid) == points and grid[0] == 0 and grid[-1] == 1
            assert bool((grid[1:] > grid[:-1]).all()), (name, points, grid)
    assert torch.allclose(time_grid(3, "sway"), torch.tensor([0.0, 1 - math.cos(math.pi / 4), 1.0]))
    assert time_grid(8, "epss").tolist() == [t / 32 for t in EPSS_TABLE[7]]
    assert time_grid(4, "epss").tolist() == [0.0, 0.25, 0.5, 1.0]  # dyadic outside F5's table
    with pytest.raises(UserError, match="unknown --schedule 'cosine'"):
        time_grid(4, "cosine")


# --- the student network ----------------------------------------------------------------------

def test_zero_initialised_student_is_exactly_its_teacher():
    teacher, cond = _dit(), _cond()
    student = make_student(_dit())
    assert is_student(student) and not is_student(teacher)
    x, t = torch.randn(2, 20, 128), torch.tensor([0.1, 0.7])
    want = teacher(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper, time=t,
                   drop_whisper=False)
    for dt in (torch.tensor([0.0, 0.0]), torch.tensor([1.0, 0.3])):
        got = v2_student_velocity(student, x, t, dt, cond)
        assert torch.equal(got, want)
    # upstream keys keep their names; the second time input adds its own
    extra = set(student.state_dict()) - set(teacher.state_dict())
    assert extra and all(k.startswith("time_embed.interval.") for k in extra)
    assert set(teacher.state_dict()) <= set(student.state_dict())
    with torch.no_grad():  # once trained, dt changes the output
        student.time_embed.interval.proj.bias.add_(0.5)
    assert not torch.equal(v2_student_velocity(student, x, t, torch.tensor([1.0, 0.3]), cond), want)


def test_baked_guidance_target_equals_an_explicit_guided_evaluation():
    model, cond = _dit(), _cond()
    noise = torch.randn(2, 20, 128, generator=torch.Generator().manual_seed(1))
    grid = time_grid(32)
    loaded = type("Loaded", (), {"model": model, "family": "v2"})()
    traj = teacher_trajectory(teacher_velocity(loaded, {"cfg_strength": 2.5}), noise, cond, grid)
    assert traj.shape == (32, 2, 20, 128)
    k = 7
    target = (traj[k + 1] - traj[k]) / (grid[k + 1] - grid[k])
    kw = dict(spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, whisper=cond.whisper,
              time=grid[k].expand(2))
    with torch.no_grad():  # two separate forwards, combined by hand
        v_null = model(x=traj[k], drop_whisper=True, **kw)
        v_full = model(x=traj[k], drop_whisper=False, **kw)
    assert torch.allclose(target, v_null + 2.5 * (v_full - v_null), atol=1e-4)
    assert not torch.allclose(target, v_full, atol=1e-3)  # the guidance is really in it


def test_deployment_intervals_and_student_grids():
    info = StudentInfo(nfe=1, grid=[0.0, 1.0])
    assert deployment_pairs(info).tolist() == [[0, 16], [0, 31], [16, 31]]
    assert info.grid_for(2) == [0.0, 1.0] and info.grid_for(3) == [0.0, 16 / 31, 1.0]
    with pytest.raises(UserError, match="grid has 3 points for nfe 1"):
        StudentInfo.from_dict({"nfe": 1, "grid": [0, 0.5, 1]})


# --- rtsvc distill ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_voices(root, broken=False)
    prepare_dataset(root, cheap_extract, {"f0": "test"}, workers=1)
    return root


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    return make_tiny_dit_checkpoint(tmp_path_factory.mktemp("teacher") / "t.ckpt", speakers=("high", "low"))


def _distill(teacher, data, out, **changes):
    settings = {**TINY, "max_steps": 6, "save_every": 3, "cfg_strength": 1.5, **changes}
    return distill(DistillConfig(teacher=str(teacher), data=str(data), out=str(out), **settings))


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, data, teacher):
    out = tmp_path_factory.mktemp("run") / "student"
    result = _distill(teacher, data, out, max_steps=6)
    return out, result


def test_distill_writes_a_student_that_load_dit_recognises(distilled, teacher):
    out, result = distilled
    assert result.global_step == 6 and (out / "last.ckpt").is_file() and (out / "step-3.ckpt").is_file()
    assert all(math.isfinite(v) for v in result.losses) and len(result.losses) == 6
    loaded = load_dit(out / "last.ckpt")
    assert loaded.student is not None and loaded.student.nfe == 1 and loaded.student.grid == [0.0, 1.0]
    assert loaded.student.guidance == {"cfg_strength": 1.5}
    assert is_student(loaded.model) and load_dit(teacher).student is None
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert all(k.startswith("model.transformer.") for k in ckpt["state_dict"])  # upstream layout
    assert (out / "metrics.jsonl").read_text().count("\n") == 3


def test_distill_resume_is_exact(distilled, data, teacher, tmp_path):
    out, _ = distilled
    first = _distill(teacher, data, tmp_path / "r", max_steps=3)
    resumed = _distill(teacher, data, tmp_path / "r", max_steps=6, resume=True)
    assert first.global_step == 3 and resumed.global_step == 6
    straight = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    again = torch.load(tmp_path / "r" / "last.ckpt", weights_only=True)["state_dict"]
    assert straight.keys() == again.keys()
    assert all(torch.equal(straight[k], again[k]) for k in straight)


def test_distill_user_errors(distilled, data, teacher, tmp_path):
    out, _ = distilled
    with pytest.raises(UserError, match="--nfe must be 1 or 2"):
        _distill(teacher, data, tmp_path / "x", nfe=3)
    with pytest.raises(UserError, match="already a distilled student"):
        _distill(out / "last.ckpt", data, tmp_path / "y")
    stranger = make_tiny_dit_checkpoint(tmp_path / "s.ckpt", speakers=("alice", "bob"))
    with pytest.raises(UserError, match="speaker\\(s\\) the teacher does not know: high, low"):
        _distill(stranger, data, tmp_path / "z")


# --- students in the voice, the backends and export ------------------------------------------------

@pytest.fixture(scope="module")
def vocoder(tmp_path_factory):
    from tests.tiny_models import make_tiny_vocoder

    return make_tiny_vocoder(tmp_path_factory.mktemp("vocoder"))


def test_student_runs_one_single_branch_evaluation_per_update(distilled, vocoder):
    from rtsvc.backends.torch_backend import TorchBackend
    from rtsvc.settings import Knobs
    from rtsvc.voices.model import ModelVoice
    from rtsvc.voices.spec import sampling_steps

    out, _ = distilled
    backend = TorchBackend.from_checkpoint(out / "last.ckpt", vocoder, torch.device("cpu"))
    batches = []
    backend.model.register_forward_pre_hook(lambda m, args, kwargs: batches.append(kwargs["x"].shape[0]),
                                            with_kwargs=True)
    cond, x = _cond(1), torch.randn(1, 20, 128)
    got = backend.step_velocity(x, torch.tensor(0.0), torch.tensor(1.0), cond, Guidance())
    assert batches == [1]  # no guidance batch
    assert torch.equal(got, v2_student_velocity(backend.model, x, torch.tensor(0.0), torch.tensor(1.0), cond))
    voice = ModelVoice(backend, features=None)
    assert voice.default_steps == 2
    assert sampling_steps(Knobs(), voice, None).steps == 2  # the student's own count
    assert sampling_steps(Knobs(steps=5), voice, 5).steps == 5  # --steps overrides
    assert voice.sampling_grid(Knobs(steps=3)).tolist() == pytest.approx([0.0, 16 / 31, 1.0])


def test_student_bundle_has_no_guidance_input_and_matches_torch(distilled, vocoder, tmp_path):
    from rtsvc.export.onnx_export import export_bundle

    from rtsvc.backends.bundle import STUDENT_DIT_INPUTS
    from rtsvc.backends.onnx_backend import OnnxBackend
    from rtsvc.backends.torch_backend import TorchBackend

    out, _ = distilled
    result = export_bundle(out / "last.ckpt", tmp_path / "s.rtsvc", pretrained_dir=None, vocoder=vocoder,
                           lengths=(17, 40))
    assert result.ok, [r for r in result.rows if not r.ok]
    onnx = OnnxBackend.open(tmp_path / "s.rtsvc", device="cpu")
    manifest = onnx.bundle.manifest
    assert manifest["dit"]["inputs"] == list(STUDENT_DIT_INPUTS) and "cfg_strength" not in STUDENT_DIT_INPUTS
    assert manifest["defaults"] == {"steps": 2, "cfg_strength": 1.5, "speaker": "high"}
    assert manifest["student"]["nfe"] == 1
    assert onnx.student is not None and onnx.student.grid == [0.0, 1.0]
    torch_backend = TorchBackend.from_checkpoint(out / "last.ckpt", vocoder, torch.device("cpu"))
    cond, x = _cond(1, 33), torch.randn(1, 33, 128)
    for t, dt in ((0.0, 1.0), (0.3, 0.2)):
        want = torch_backend.step_velocity(x, torch.tensor(t), torch.tensor(dt), cond, Guidance())
        got = onnx.step_velocity(x, torch.tensor(t), torch.tensor(dt), cond, Guidance())
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))


def test_convert_and_stream_a_student_through_the_cli(distilled, tmp_path, capsys, monkeypatch,
                                                      tiny_pretrained):
    import soundfile as sf

    from rtsvc.voices import model as voice_model
    from tests.cli_helpers import harmonic_tone, run_cli, write_wav

    out, _ = distilled
    grids, original = [], voice_model.sampling_grid  # what every block's sampling asks for
    monkeypatch.setattr(voice_model, "sampling_grid", lambda backend, knobs: grids.append(knobs.steps) or
                        original(backend, knobs))
    pretrained = tiny_pretrained
    tone = write_wav(tmp_path / "tone.wav", harmonic_tone(0.6))
    base = ["--model", out / "last.ckpt", "--pretrained-dir", pretrained, "--f0", "pyworld",
            "--device", "cpu"]
    for extra, steps in (([], 2), (["--stream"], 2), (["--steps", "3"], 3)):  # no --steps: the student's own
        grids.clear()
        target = tmp_path / f"out{len(extra)}.wav"
        code, stdout, stderr = run_cli(["convert", tone, target, *base, *extra], capsys, monkeypatch)
        assert code == 0, stdout + stderr
        audio, rate = sf.read(target)
        assert rate == 44100 and len(audio) == int(0.6 * 44100) and bool(abs(audio).max() > 0)
        assert grids and set(grids) == {steps}


def test_zero_initialised_v3_student_is_exactly_its_teacher():
    from rtsvc.models.dit_v3 import DiTV3, DiTV3Config
    from rtsvc.models.student import v3_student_velocity

    torch.manual_seed(0)
    teacher = DiTV3(DiTV3Config(dim=64, depth=2, head_dim=32, ff_mult=2, num_speaker=2)).eval()
    _randomise(teacher)
    student = make_student(copy.deepcopy(teacher))
    assert is_student(student)
    cond, x, t = _cond(), torch.randn(2, 20, 128), torch.tensor([0.2, 0.9])
    want = teacher(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=t)
    assert torch.equal(v3_student_velocity(student, x, t, torch.tensor([1.0, 0.1]), cond), want)
    extra = set(student.state_dict()) - set(teacher.state_dict())
    assert extra and all(k.startswith("tembed.interval.") for k in extra)


# --- V3 teachers: distill -> checkpoint round trip -> export -> convert ------------------------------

def _cheap_extract_v3(audio):
    feats = cheap_extract(audio)
    del feats["whisper"]
    return feats


@pytest.fixture(scope="module")
def v3_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data3")
    make_voices(root, broken=False)
    prepare_dataset(root, _cheap_extract_v3, {"f0": "test", "family": "v3", "resize": "linear"}, workers=1)
    return root


@pytest.fixture(scope="module")
def v3_teacher(tmp_path_factory):
    """An upstream-layout V3 LoRA fine-tune that knows the data's speakers."""
    from tests.upstream.fixtures import make_v3_head

    path, _ = make_v3_head(tmp_path_factory.mktemp("teacher3") / "t3.ckpt", lora_rank=4, lora_alpha=8.0)
    ckpt = torch.load(path, weights_only=False)
    ckpt["hyper_parameters"]["cfg"]["spk2idx"] = {"high": 0, "low": 1}
    torch.save(ckpt, path)
    return path


V3_GUIDANCE = {"ds_cfg_strength": 0.3, "spk_cfg_strength": 0.6, "skip_cfg_strength": 0.4,
               "cfg_skip_layers": [1]}


@pytest.fixture(scope="module")
def v3_distilled(tmp_path_factory, v3_data, v3_teacher):
    out = tmp_path_factory.mktemp("run3") / "student"
    settings = {**TINY, "max_steps": 4, "save_every": 2, "log_every": 1, **V3_GUIDANCE}
    return out, distill(DistillConfig(teacher=str(v3_teacher), data=str(v3_data), out=str(out), **settings))


def test_v3_batch_conditioning_has_no_whisper_and_a_per_item_bad_cvec():
    from rtsvc.training.distill_loss import batch_conditioning

    from rtsvc.models.guidance import degrade_content

    g = torch.Generator().manual_seed(0)
    batch = {"mel": torch.randn(2, 30, 128, generator=g), "spk_id": torch.tensor([0, 1]),
             "f0": torch.full((2, 30), 200.0), "rms": torch.full((2, 30), 0.1),
             "cvec": torch.randn(2, 30, 768, generator=g), "frame_len": torch.tensor([30, 19])}
    cond = batch_conditioning(batch, "v3", {"ds_cfg_strength": 0.2})
    assert cond.whisper is None and cond.mask[1].sum() == 19
    # item 1's blur sees only its 19 valid frames, as convert's per-window bad_cvec does
    assert torch.equal(cond.bad_cvec[1, :19], degrade_content(batch["cvec"][1:2, :19])[0])
    assert not torch.allclose(cond.bad_cvec[1, :19], degrade_content(batch["cvec"][1:2])[0, :19])
    assert torch.equal(cond.bad_cvec[0], degrade_content(batch["cvec"][:1])[0])
    assert batch_conditioning(batch, "v3", {"ds_cfg_strength": 0.0}).bad_cvec is None


def test_v3_student_checkpoint_round_trips_through_load_dit(v3_distilled, v3_teacher):
    from rtsvc.models.families import student_velocity

    out, result = v3_distilled
    assert result.global_step == 4 and len(result.losses) == 4
    assert all(math.isfinite(v) for v in result.losses)
    loaded = load_dit(out / "last.ckpt")
    assert loaded.family == "v3" and is_student(loaded.model) and loaded.config.lora_rank is None
    assert loaded.student.nfe == 1 and loaded.student.grid == [0.0, 1.0]
    assert loaded.student.guidance == {**V3_GUIDANCE, "cfg_rescale": 0.7}
    state = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    assert any(k.startswith("model.transformer.tembed.interval.") for k in state)
    assert not any("lora" in k for k in state)  # the teacher's adapters are merged into the student
    teacher = load_dit(v3_teacher)
    assert teacher.config.lora_rank == 4 and teacher.student is None
    # the trained student differs from its teacher, and dt now matters
    cond, x, t = _cond(1, 24), torch.randn(1, 24, 128), torch.tensor(0.0)
    cond.whisper = None
    u = student_velocity(loaded)
    with torch.no_grad():
        one, half = u(x, t, torch.tensor(1.0), cond), u(x, t, torch.tensor(0.5), cond)
        plain = teacher.model(x=x, spk=cond.spk, f0=cond.f0, rms=cond.rms, cvec=cond.cvec, time=t.expand(1))
    assert not torch.allclose(one, half) and not torch.allclose(one, plain)


def test_v3_distill_user_errors(v3_teacher, v3_data, data, tmp_path):
    with pytest.raises(UserError, match="prepared for V2 models but the teacher is V3"):
        distill(DistillConfig(teacher=str(v3_teacher), data=str(data), out=str(tmp_path / "x"), **TINY))
    with pytest.raises(UserError, match="--cfg-strength does not apply to a V3 teacher"):
        _distill(v3_teacher, v3_data, tmp_path / "y")
    with pytest.raises(UserError, match="--cfg-skip-layers must name blocks 0..1, got \\[5\\]"):
        distill(DistillConfig(teacher=str(v3_teacher), data=str(v3_data), out=str(tmp_path / "z"),
                              cfg_skip_layers=[5], **TINY))


def test_v3_student_exports_and_converts_at_one_evaluation(v3_distilled, tmp_path, capsys, monkeypatch,
                                                         tiny_pretrained):
    import soundfile as sf
    from rtsvc.export.quantize import quantize_bundle

    from rtsvc.backends.bundle import STUDENT_V3_DIT_INPUTS
    from rtsvc.backends.onnx_backend import OnnxBackend
    from rtsvc.backends.torch_backend import TorchBackend
    from rtsvc.pretrained import LAYOUT
    from rtsvc.voices import model as voice_model
    from tests.cli_helpers import harmonic_tone, run_cli, write_wav

    out, _ = v3_distilled
    pretrained = tiny_pretrained
    bundle = tmp_path / "student.rtsvc"
    code, stdout, stderr = run_cli(["export", out / "last.ckpt", "--out", bundle, "--pretrained-dir",
                                    pretrained], capsys, monkeypatch)
    assert code == 0, stdout + stderr
    onnx = OnnxBackend.open(bundle, device="cpu")
    manifest = onnx.bundle.manifest
    assert manifest["family"] == "v3" and manifest["dit"]["inputs"] == list(STUDENT_V3_DIT_INPUTS)
    assert {i.name for i in onnx.dit.get_inputs()} == set(STUDENT_V3_DIT_INPUTS)
    assert manifest["student"]["nfe"] == 1 and manifest["student"]["guidance"]["skip_cfg_strength"] == 0.4
    assert manifest["defaults"]["steps"] == 2 and manifest["defaults"]["ds_cfg_strength"] == 0.3
    assert manifest["export"]["parity"]["dit"]["max_rel"] < 1e-4
    torch_backend = TorchBackend.from_checkpoint(out / "last.ckpt", pretrained / LAYOUT["vocoder"],
                                                 torch.device("cpu"))
    cond, x = _cond(1, 33), torch.randn(1, 33, 128)
    cond.whisper = None
    for t, dt in ((0.0, 1.0), (0.3, 0.2)):
        want = torch_backend.step_velocity(x, torch.tensor(t), torch.tensor(dt), cond, Guidance())
        got = onnx.step_velocity(x, torch.tensor(t), torch.tensor(dt), cond, Guidance())
        assert torch.allclose(got, want, atol=1e-4 * float(want.abs().max()))

    int8 = tmp_path / "student-int8.rtsvc"
    shutil.copytree(bundle, int8)
    rows = {r.graph: r for r in quantize_bundle(int8)}  # dynamic int8 DiT, fed the student's inputs
    assert 0.0 <= rows["dit.onnx"].rel_l2 < 0.1

    grids, original = [], voice_model.sampling_grid  # what every block's sampling asks for
    monkeypatch.setattr(voice_model, "sampling_grid", lambda backend, knobs: grids.append(knobs.steps) or
                        original(backend, knobs))
    tone = write_wav(tmp_path / "tone.wav", harmonic_tone(0.6))
    for model in (bundle, out / "last.ckpt"):  # ONNX, then the checkpoint on torch
        grids.clear()
        target = tmp_path / f"{model.stem}.wav"
        args = ["convert", tone, target, "--model", model, "--pretrained-dir", pretrained, "--f0", "pyworld",
                "--device", "cpu"]
        code, stdout, stderr = run_cli(args, capsys, monkeypatch)
        assert code == 0, stdout + stderr
        audio, rate = sf.read(target)
        assert rate == 44100 and len(audio) == int(0.6 * 44100)
        assert bool(np.isfinite(audio).all()) and bool(abs(audio).max() > 0)
        assert grids and set(grids) == {2}  # 2 grid points: one evaluation per block


def test_v3_distill_resume_is_exact(v3_distilled, v3_data, v3_teacher, tmp_path):
    out, _ = v3_distilled
    # stopped at a save point of the straight run (saving round-trips schedule-free's weights)
    settings = {**TINY, "save_every": 2, "log_every": 1, **V3_GUIDANCE}
    run = dict(teacher=str(v3_teacher), data=str(v3_data), out=str(tmp_path / "r"))
    distill(DistillConfig(**run, max_steps=2, **settings))
    resumed = distill(DistillConfig(**run, max_steps=4, resume=True, **settings))
    assert resumed.global_step == 4
    straight = torch.load(out / "last.ckpt", weights_only=True)["state_dict"]
    again = torch.load(tmp_path / "r" / "last.ckpt", weights_only=True)["state_dict"]
    assert straight.keys() == again.keys() and all(torch.equal(straight[k], again[k]) for k in straight)
