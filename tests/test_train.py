"""`rtsvc train`: loss goes down, checkpoints in the upstream layout, exact resume, Ctrl-C,
fine-tuning with new speakers, validation output, export-then-convert of the result.

One dataset is prepared for the whole module through the real CLI with tiny random encoders in
the official formats (tests/tiny_encoders.py) and WORLD F0; models are tiny (dim 64, depth 2).
"""

import contextlib
import io
import json
import math
import os
import re
import signal
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf
import torch
from rtsvc.training import loss as loss_module
from rtsvc.training import progress as progress_module
from rtsvc.training.dataset import ClipDataset, StepBatchSampler, collate
from rtsvc.training.loss import flow_loss, sample_time
from rtsvc.training.model import extend_speakers, from_scratch
from rtsvc.training.optim import make_optimizer, param_groups
from rtsvc.training.prepare import cache_root, load_metadata
from rtsvc.training.progress import TrainProgress
from rtsvc.training.train import TrainConfig, train

from rtsvc.commands import cli
from rtsvc.errors import UserError
from rtsvc.models.loading import load_dit
from tests.cli_helpers import run_cli
from tests.test_prepare import SECONDS, VOICES, make_voices, voice
from tests.tiny_models import make_tiny_dit_checkpoint

TINY = dict(model="dit-64-2", batch_size=4, lr=3e-3, log_every=5, num_workers=0, device="cpu",
            progress=False)


def _cli(args: list) -> tuple[int, str]:
    """The real entry point in-process, usable from module-scoped fixtures."""
    stream = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stderr(stream), \
            contextlib.redirect_stdout(stream), pytest.raises(SystemExit) as exc:
        mp.setattr(sys, "argv", ["rtsvc", *map(str, args)])
        cli.main()
    return exc.value.code or 0, " ".join(stream.getvalue().split())


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def pretrained(tiny_pretrained):
    return tiny_pretrained


@pytest.fixture(scope="module")
def data(tmp_path_factory, pretrained):
    root = tmp_path_factory.mktemp("data")
    make_voices(root)  # 3 takes per voice + a corrupt and a silent file
    code, output = _cli(["prepare", root, "--pretrained-dir", pretrained, "--f0", "pyworld", "--workers", "2",
                         "--device", "cpu"])
    assert code == 0, output
    assert "skipped" in output and "broken.wav" in output and "quiet.wav" in output
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """60 steps from scratch through the CLI, checkpoints every 30, validation at 60."""
    out = tmp_path_factory.mktemp("run") / "run"
    code, output = _cli(["train", "--data", data, "--out", out, "--model", "dit-64-2", "--max-steps", 60,
                         "--batch-size", 4, "--lr", 3e-3, "--save-every", 30, "--eval-every", 60,
                         "--log-every", 1, "--num-workers", 0, "--eval-samples", 1, "--device", "cpu"])
    assert code == 0, output
    return out


def _metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# --- the prepared dataset (real tiny encoders) -----------------------------------------------------

def test_prepared_features_follow_the_voices(data):
    meta = load_metadata(data)
    assert meta["speakers"] == ["high", "low"] and len(meta["clips"]) == 6
    assert meta["settings"]["f0"] == "pyworld" and meta["settings"]["pretrained_dir"]
    for clip in meta["clips"]:
        feats = torch.load(cache_root(data) / clip["file"], weights_only=True)
        voiced = feats["f0"][feats["f0"] > 0]
        assert len(voiced) > 0.8 * clip["frames"]
        assert abs(float(voiced.median()) / VOICES[clip["speaker"]][0] - 1) < 0.05
        assert float(feats["cvec"].float().std(dim=0).mean()) > 0  # content varies over time
        assert torch.isfinite(feats["whisper"].float()).all()


# --- training through the CLI ----------------------------------------------------------------------

def test_train_loss_goes_down_and_metrics_are_logged(trained):
    rows = _metrics(trained)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 61))
    for r in train_rows:
        assert {"step", "loss", "lr", "steps_per_s", "grad_norm"} <= set(r)
        assert math.isfinite(r["loss"]) and r["steps_per_s"] > 0
    first = np.mean([r["loss"] for r in train_rows[:3]])
    last = np.mean([r["loss"] for r in train_rows[-5:]])
    assert last < 0.8 * first, (first, last)  # measured here: 1.17 -> 0.80
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [60] and val[0]["val_loss"] < first


def test_checkpoint_is_upstream_layout_and_loads(trained):
    assert (trained / "step-30.ckpt").is_file() and (trained / "step-60.ckpt").is_file()
    ckpt = torch.load(trained / "last.ckpt", map_location="cpu", weights_only=True)  # plain types only
    assert ckpt["global_step"] == 60 and ckpt["optimizer_states"]
    cfg = ckpt["hyper_parameters"]["cfg"]
    assert cfg["spk2idx"] == {"high": 0, "low": 1}
    assert cfg["model"]["cfg"] == {"dim": 64, "depth": 2, "head_dim": 64, "ff_mult": 4}
    assert cfg["dataset"]["sample_rate"] == 44100 and cfg["dataset"]["max_frame_len"] == 256
    assert all(k.startswith("model.transformer.") for k in ckpt["state_dict"])
    loaded = load_dit(trained / "last.ckpt")
    assert loaded.speakers == {"high": 0, "low": 1}
    assert (loaded.config.dim, loaded.config.depth) == (64, 2)
    assert torch.equal(loaded.model.output.weight, ckpt["state_dict"]["model.transformer.output.weight"])
    assert loaded.model.output.weight.abs().sum() > 0  # trained away from the zero init


def test_validation_writes_audio_and_plots(trained, data):
    step_dir = trained / "val" / "step-60"
    wavs = sorted(p.name for p in step_dir.glob("*.wav"))
    assert len(wavs) == 2 and any("recon" in w for w in wavs) and any("-to-" in w for w in wavs)
    assert len(list(step_dir.glob("*.png"))) == 1
    clip = next(c for c in load_metadata(data)["clips"] if c["split"] == "val")
    audio, rate = sf.read(step_dir / wavs[0])
    assert rate == 44100 and len(audio) == clip["frames"] * 512


def test_export_then_convert_the_trained_checkpoint(trained, pretrained, tmp_path, capsys, monkeypatch):
    bundle = tmp_path / "voice.rtsvc"
    code, _, err = run_cli(["export", trained / "last.ckpt", "--out", bundle, "--pretrained-dir", pretrained],
                           capsys, monkeypatch)
    assert code == 0, err
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert "low" in json.dumps(manifest) and "high" in json.dumps(manifest)
    assert manifest["defaults"]["speaker"] == "high"  # the first voice the run added
    source = tmp_path / "in.wav"
    sf.write(source, voice(200.0, 0.6, 1.5, seed=5, sr=44100), 44100)
    out = tmp_path / "out.wav"
    args = ["convert", source, out, "--model", bundle, "--speaker", "low", "--pretrained-dir", pretrained,
            "--f0", "pyworld", "--steps", "4", "--device", "cpu"]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 0, err
    converted, rate = sf.read(out)
    assert rate == 44100 and abs(len(converted) - int(1.5 * 44100)) <= 512
    assert np.all(np.isfinite(converted))


# --- resume, Ctrl-C, fine-tuning (library calls) ---------------------------------------------------

def test_resume_continues_at_the_exact_step(data, tmp_path):
    straight = train(TrainConfig(data=str(data), out=str(tmp_path / "a"), max_steps=30, save_every=10,
                                 eval_every=0, **TINY))
    train(TrainConfig(data=str(data), out=str(tmp_path / "b"), max_steps=20, save_every=10, eval_every=0,
                      **TINY))
    resumed = train(TrainConfig(data=str(data), out=str(tmp_path / "b"), max_steps=30, save_every=10,
                                eval_every=0, resume=True, **TINY))
    assert resumed.global_step == 30
    assert resumed.losses == straight.losses[20:]  # same batches, noise, dropout, optimizer state
    a = torch.load(tmp_path / "a" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.ckpt", weights_only=True)
    assert b["global_step"] == 30
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    assert [r["step"] for r in _metrics(tmp_path / "b")] == [5, 10, 15, 20, 25, 30]
    with pytest.raises(UserError, match="already at step 30"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "b"), max_steps=30, resume=True, **TINY))
    with pytest.raises(UserError, match="--resume"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "b"), max_steps=40, **TINY))


def test_train_says_what_it_trains_and_prints_plain_lines_without_a_terminal(data, tmp_path, capsys,
                                                                               monkeypatch):
    """In a log file or CI (no terminal): a start line (family, clips, speakers, device), then one plain
    line per logged step (rate-limited to 0 s here), never a loss before one was logged."""
    monkeypatch.setattr(progress_module, "PLAIN_EVERY_S", 0.0)
    capsys.readouterr()
    train(TrainConfig(data=str(data), out=str(tmp_path / "run"), max_steps=6, save_every=100, eval_every=0,
                      **{**TINY, "log_every": 2, "progress": True}))
    err = capsys.readouterr().err
    lines = err.splitlines()
    start = re.fullmatch(r"train: V2 model, (\d+) clips from 2 speakers \((.+)\), device cpu, steps 0 to 6",
                         lines[0])
    assert start, lines[0]
    assert int(start[1]) == sum(c.get("split", "train") == "train" for c in load_metadata(data)["clips"]) > 0
    assert sorted(start[2].split(", ")) == sorted(VOICES)
    steps = re.findall(r"^train step (\d)/6  loss (\d+\.\d{4})  \d+\.\d\d steps/s  ETA \d+:\d\d:\d\d$",
                       err, re.MULTILINE)
    assert [int(step) for step, _ in steps] == [2, 4, 6], err
    assert all(math.isfinite(float(loss)) for _, loss in steps)
    assert "nan" not in err and "\x1b" not in err and "━" not in err  # no bar, no colour codes in a log


def test_the_bar_shows_loss_only_once_it_exists():
    from rich.console import Console

    screen = Console(file=io.StringIO(), force_terminal=True, width=120)
    progress = TrainProgress("train", True, screen)

    def drawn() -> str:
        frame = Console(file=io.StringIO(), width=120)
        frame.print(progress.bar.get_renderable())
        return frame.file.getvalue()

    with progress:
        task = progress.add_task("train", total=10, completed=0, loss=float("nan"), sps=0.0)
        progress.update(task, completed=1)
        assert "loss" not in drawn() and "nan" not in drawn() and "1/10" in drawn()
        progress.update(task, loss=0.123456, sps=2.0)
        progress.update(task, completed=2)
        assert "loss 0.1235" in drawn() and "2/10" in drawn()
    assert "train step" not in screen.file.getvalue()  # a terminal gets the bar, not plain lines


def test_ctrl_c_saves_the_current_step_and_resume_finishes(data, tmp_path, monkeypatch):
    calls = []
    real = loss_module.flow_loss

    def interrupting(*args, **kwargs):
        calls.append(1)
        if len(calls) == 7:
            os.kill(os.getpid(), signal.SIGINT)  # what Ctrl-C sends; the step still completes
        return real(*args, **kwargs)

    monkeypatch.setattr("rtsvc.training.train.flow_loss", interrupting)
    run = tmp_path / "run"
    result = train(TrainConfig(data=str(data), out=str(run), max_steps=50, save_every=100, eval_every=0,
                               **TINY))
    assert result.interrupted and result.global_step == 7 and len(result.losses) == 7
    assert torch.load(run / "last.ckpt", weights_only=True)["global_step"] == 7
    monkeypatch.setattr("rtsvc.training.train.flow_loss", real)
    finished = train(TrainConfig(data=str(data), out=str(run), max_steps=10, save_every=100, eval_every=0,
                                 resume=True, **TINY))
    assert not finished.interrupted and finished.global_step == 10 and len(finished.losses) == 3


def test_finetune_from_an_upstream_checkpoint_adds_new_speakers(data, tmp_path):
    upstream = make_tiny_dit_checkpoint(tmp_path / "pretrain.ckpt", speakers=("alice", "bob"), dim=64,
                                        depth=2)
    before = load_dit(upstream).model.spk_embed.weight.detach().clone()
    result = train(TrainConfig(data=str(data), out=str(tmp_path / "ft"), pretrained=str(upstream),
                               max_steps=4, save_every=4, eval_every=0, model=None,
                               **{k: v for k, v in TINY.items() if k != "model"}))
    assert result.new_speakers == ["high", "low"]
    loaded = load_dit(tmp_path / "ft" / "last.ckpt")
    assert loaded.speakers == {"alice": 0, "bob": 1, "high": 2, "low": 3}
    assert list(loaded.speakers)[0] == "high"  # the new voice is the default (first) speaker
    assert (loaded.config.head_dim, loaded.config.ff_mult) == (32, 2)  # the pretrained size is kept
    assert loaded.model.spk_embed.weight.shape == (4, 64)
    # old speakers keep their rows (small moves from 4 steps of weight decay only)
    assert torch.allclose(loaded.model.spk_embed.weight[:2], before, atol=1e-3)
    ckpt = torch.load(tmp_path / "ft" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["cfg"]["model"]["pretrained_path"] == str(upstream)
    assert ckpt["hyper_parameters"]["cfg"]["default_speaker"] == "high"
    assert list(load_dit(upstream).speakers) == ["alice", "bob"]  # upstream: no default, table order
    with pytest.raises(UserError, match="does not match the pretrained checkpoint"):
        train(TrainConfig(data=str(data), out=str(tmp_path / "ft2"), pretrained=str(upstream), max_steps=4,
                          **dict(TINY, model="dit-128-2")))


# --- units: optimizer groups, time sampling, crops, masked loss -------------------------------------

def test_param_groups_follow_upstream_spectral_rule():
    dit = from_scratch("dit-64-2", ["a", "b"]).dit
    groups = {g["name"]: g for g in param_groups(dit, lr=1e-3, weight_decay=0.01)}
    by_param = {id(p): g for g in groups.values() for p in g["params"]}
    for name, p in dit.named_parameters():
        g = by_param[id(p)]
        if p.dim() < 2:
            assert g["name"] == "no_decay" and g["weight_decay"] == 0.0, name
        elif name.endswith(("out.weight", "proj.weight")):
            assert g["lr"] == pytest.approx(1e-3 * round(p.shape[0] / p.shape[1], 2)), name
            assert g["weight_decay"] == 0.01, name
        else:
            assert g["name"] == "decay" and g["lr"] == 1e-3, name
    assert groups["specp_decay_6.00"]["lr"] == pytest.approx(6e-3)  # attn_norm.proj: [6 dim, dim]
    opt = make_optimizer(dit, 1e-3, 0.01, max_steps=1000)
    assert opt.param_groups[0]["warmup_steps"] == 50 and opt.param_groups[0]["betas"] == (0.9, 0.95)


def test_lognorm_time_is_stratified():
    b = 64
    t = sample_time(b, torch.Generator().manual_seed(0), torch.device("cpu"))
    # back to the uniforms: u = Phi(logit t) must fall in its own 1/b slice
    u = 0.5 * (1 + torch.erf(torch.logit(t.double()) / math.sqrt(2)))
    slot = torch.floor(u * b).long()
    assert torch.equal(slot, torch.arange(b))
    assert 0.45 < float(t.median()) < 0.55


def test_crop_avoids_unvoiced_windows(tmp_path):
    n = 2000
    f0 = torch.zeros(n)
    f0[1500:] = 200.0  # only the last quarter is voiced
    feats = {"mel": torch.zeros(n, 128), "f0": f0, "rms": torch.zeros(n), "cvec": torch.zeros(n, 768).half(),
             "whisper": torch.zeros(n, 1280).half()}
    (cache_root(tmp_path) / "s").mkdir(parents=True)
    torch.save(feats, cache_root(tmp_path) / "s" / "c.pt")
    meta = {"clips": [{"speaker": "s", "file": "s/c.pt", "frames": n, "split": "train"}]}
    ds = ClipDataset(tmp_path, meta, {"s": 0})
    starts = [ds.crop_start(f0, torch.Generator().manual_seed(seed)) for seed in range(50)]
    windows = [(f0[s:s + 256] > 0).float().mean() for s in starts]
    # a random window is voiced >10% with p ~ 0.3; ten tries make a fully unvoiced pick rare
    assert np.mean([w > 0.1 for w in windows]) > 0.9
    item = ds[(0, 3)]
    assert item["mel"].shape == (256, 128) and item["frame_len"] == 256


def test_batches_depend_only_on_seed_and_step():
    a = StepBatchSampler(10, 4, seed=1, start_step=0, max_steps=6)
    b = StepBatchSampler(10, 4, seed=1, start_step=3, max_steps=6)
    assert list(a)[3:] == list(b)
    epoch0 = [i for batch in list(a)[:2] for i, _ in batch] + [i for i, _ in a.batch(2)[:2]]
    assert sorted(epoch0) == list(range(10))  # every clip once per epoch
    ranks = [StepBatchSampler(10, 2, 1, 0, 5, rank=r, world_size=2).batch(0) for r in range(2)]
    assert not {i for i, _ in ranks[0]} & {i for i, _ in ranks[1]}


def test_flow_loss_ignores_padding():
    class Zero(torch.nn.Module):
        def forward(self, x, **kw):
            return torch.zeros_like(x)

    mel = torch.randn(2, 10, 128) - 5
    batch = {"mel": mel, "frame_len": torch.tensor([10, 4]), "spk_id": torch.zeros(2, dtype=torch.long),
             "f0": torch.zeros(2, 10), "rms": torch.zeros(2, 10), "cvec": torch.zeros(2, 10, 768),
             "whisper": torch.zeros(2, 10, 1280)}
    got = flow_loss(Zero(), batch, torch.Generator().manual_seed(0))
    padded = dict(batch, mel=mel.clone())
    padded["mel"][1, 4:] = 1e6  # garbage in the padding must not count
    assert float(flow_loss(Zero(), padded, torch.Generator().manual_seed(0))) == pytest.approx(float(got))
    # with a zero prediction the loss is the mean square of the target velocity over valid frames
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(mel.shape, generator=g)
    x1 = (mel + 12) / 14 * 2 - 1
    target = torch.cat([(x1 - x0)[0].reshape(-1), (x1 - x0)[1, :4].reshape(-1)])
    assert float(got) == pytest.approx(float(target.pow(2).mean()), rel=1e-5)


def test_extend_speakers_keeps_indices_and_starts_new_rows_at_the_mean():
    tm = from_scratch("dit-64-2", ["a", "b"])
    old = tm.dit.spk_embed.weight.detach().clone()
    dit, mapping, new = extend_speakers(tm.dit, tm.spk2idx, ["b", "c", "a", "d"])
    assert mapping == {"a": 0, "b": 1, "c": 2, "d": 3} and new == ["c", "d"]
    assert torch.equal(dit.spk_embed.weight[:2], old)
    assert torch.allclose(dit.spk_embed.weight[2:], old.mean(0).expand(2, -1))


def test_collate_pads_and_counts_frames(data):
    meta = load_metadata(data)
    ds = ClipDataset(data, meta, {"high": 0, "low": 1}, max_frame_len=100)
    batch = collate([ds[(0, 1)], ds[(1, 2)]])
    assert batch["mel"].shape == (2, 100, 128) and batch["whisper"].shape == (2, 100, 1280)
    assert batch["frame_len"].tolist() == [100, 100] and batch["spk_id"].dtype == torch.long


def test_train_rejects_unprepared_data(tmp_path):
    with pytest.raises(UserError, match="rtsvc prepare"):
        train(TrainConfig(data=str(tmp_path), out=str(tmp_path / "run"), **TINY))
    assert SECONDS > 0


@pytest.mark.slow
def test_torchrun_two_process_ddp_on_cpu(data, tmp_path):
    """The same command under torchrun (gloo, 2 CPU processes): rank 0 alone writes, DDP steps."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "cli.py",
           "train", "--data", str(data), "--out", str(out), "--model", "dit-64-2", "--max-steps", "6",
           "--batch-size", "2", "--lr", "3e-3", "--save-every", "3", "--eval-every", "0", "--log-every", "2",
           "--num-workers", "0", "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stderr.count("finished at step 6") == 1  # one report, from rank 0
    assert [r["step"] for r in _metrics(out)] == [2, 4, 6]
    ckpt = torch.load(out / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 6 and ckpt["hyper_parameters"]["cfg"]["training"]["world_size"] == 2
    assert (out / "step-3.ckpt").is_file()
    assert load_dit(out / "last.ckpt").speakers == {"high": 0, "low": 1}


def test_metrics_go_to_tensorboard_when_installed(tmp_path, monkeypatch):
    """tensorboard is optional (not installed here): a stand-in SummaryWriter receives the scalars."""
    import types

    scalars = []
    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = lambda logdir: types.SimpleNamespace(
        add_scalar=lambda tag, value, step: scalars.append((tag, value, step)), close=lambda: None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    from rtsvc.training.train import MetricsLog

    log = MetricsLog(tmp_path, None)
    log.write({"step": 10, "loss": 0.5, "lr": 1e-4, "time": 123.0})
    log.write({"step": 10, "val_loss": 0.4, "val_mel_mse": float("nan")})
    log.close()
    assert scalars == [("train/loss", 0.5, 10), ("train/lr", 1e-4, 10), ("val/loss", 0.4, 10)]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[1], parse_constant=lambda c: pytest.fail(f"non-JSON {c}")) == {
        "step": 10, "val_loss": 0.4, "val_mel_mse": None}
